"""Persistent reservations from the Linux guest through two gateway processes of one RBD LUN
whose reservations live in RADOS, both on the session's throw-away Ceph cluster
(tests/interop/guest/gateways_pr.sh): the guest logs in to each gateway without multipathd, so
it has two I_T nexuses to LUN 0. Write Exclusive taken through gateway 1 makes the WRITE of the
unregistered nexus through gateway 2 end in RESERVATION CONFLICT; PREEMPT through gateway 2
reaches gateway 1's nexus as UNIT ATTENTION, REGISTRATIONS PREEMPTED, and sg_persist through
gateway 1 then reports the new keys and holder. A part of lane.py's shared boot.

Skipped when ../shared/interop/linux-initiator is missing or cannot run here, or Ceph is not
installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from pytarget.cluster.rados import remove_state

from ..conftest import gateway_targets, run
from .gateways import rbd_image
from .lane import GUEST, PartContext, PartOutcome, PartPlan
from .run import GuestPart
from .test_linux_initiator import target_trouble

pytestmark = [pytest.mark.interop, pytest.mark.ceph, pytest.mark.slow]


@contextmanager
def _gateways_pr(context: PartContext) -> Iterator[PartPlan]:
    ceph_cluster = context.fixture("ceph_cluster")
    name = f"guest-pr-{uuid.uuid4().hex[:12]}"
    client = ceph_cluster.client
    lun = {"id": 0, "backstore": "rbd", "pool": ceph_cluster.pool, "image": name,
           "size": "64MiB", **client,
           "reservations": {"store": "rados", "pool": ceph_cluster.pool,
                            "object": f"{name}.reservations", **client}}
    with ExitStack() as stack:
        stack.enter_context(rbd_image(ceph_cluster, name))
        stack.callback(lambda: run(remove_state(ceph_cluster.pool, f"{name}.reservations",
                                                **client)))
        gateways = stack.enter_context(gateway_targets(context.directory, [lun]))
        yield PartPlan(GuestPart("gateways_pr", "gateways_pr.sh",
                                 [target.port for target in gateways], gateways[0].iqn, 400,
                                 target_log=gateways[0].log), gateways)


guest_gateways_pr = GUEST.part("gateways_pr", _gateways_pr)


def test_reservation_and_preempt_across_gateways(guest_gateways_pr: PartOutcome) -> None:
    run_, gateways = guest_gateways_pr.run, guest_gateways_pr.state
    if not run_.ok:
        pytest.fail(run_.report() + "\n--- gateway 2 log (tail) ---\n"
                    + gateways[1].log_text()[-2000:], pytrace=False)
    out = run_.stdout
    assert "-> UNIT ATTENTION, Registrations preempted, as expected" in out
    # gateway 2's unregistered nexus under Write Exclusive, gateway 1's once preempted
    assert out.count("-> SCSI status 'Reservation Conflict', exit status 24") == 2, out[-3000:]
    assert "PRGENERATION 3, as expected" in out and "key 0xb2b2b2b2, LU_SCOPE" in out
    for target in gateways:
        assert not target_trouble(target), target.log_text()[-3000:]
