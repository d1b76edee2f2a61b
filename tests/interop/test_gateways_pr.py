"""Persistent reservations from the Linux guest through two gateway processes of one RBD LUN
whose reservations live in RADOS, both on the session's throw-away Ceph cluster
(tests/interop/guest/gateways_pr.sh): the guest logs in to each gateway without multipathd, so
it has two I_T nexuses to LUN 0. Write Exclusive taken through gateway 1 makes the WRITE of the
unregistered nexus through gateway 2 end in RESERVATION CONFLICT; PREEMPT through gateway 2
reaches gateway 1's nexus as UNIT ATTENTION, REGISTRATIONS PREEMPTED, and sg_persist through
gateway 1 then reports the new keys and holder.

Skipped when ../shared/interop/linux-initiator is missing or cannot run here, or Ceph is not
installed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pytarget.backstore.rbd import remove_image
from pytarget.cluster.rados import remove_state

from ..ceph_cluster import CephCluster
from ..conftest import TARGET_IQN, LiveTarget, run, start_target
from .run import run_guest, unavailable
from .test_linux_initiator import target_trouble

pytestmark = [pytest.mark.interop, pytest.mark.ceph, pytest.mark.slow]


@pytest.fixture
def gateways(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[list[LiveTarget]]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    name = f"guest-pr-{uuid.uuid4().hex[:12]}"
    client = {"conf": str(ceph_cluster.conf), "keyring": str(ceph_cluster.keyring),
              "client_id": ceph_cluster.client_id}
    lun = {"id": 0, "backstore": "rbd", "pool": ceph_cluster.pool, "image": name,
           "size": "64MiB", **client,
           "reservations": {"store": "rados", "pool": ceph_cluster.pool,
                            "object": f"{name}.reservations", **client}}
    config = tmp_path / "pytarget.yaml"
    config.write_text(yaml.safe_dump({
        "gateways": [{"name": "gw1", "portals": ["127.0.0.1:0"]},
                     {"name": "gw2", "portals": ["127.0.0.1:0"]}],
        "targets": [{"name": TARGET_IQN, "luns": [lun]}]}, sort_keys=False))
    started: list[LiveTarget] = []
    try:
        for gateway in ("gw1", "gw2"):
            started.append(start_target(config, "--gateway", gateway,
                                        log_name=f"{gateway}.log"))
        yield started
    finally:
        for target in started:
            target.stop()
        run(remove_state(ceph_cluster.pool, f"{name}.reservations", **client))
        with contextlib.suppress(FileNotFoundError):  # never created: start failed
            run(remove_image(ceph_cluster.pool, name, **client))


def test_reservation_and_preempt_across_gateways(gateways: list[LiveTarget],
                                                 tmp_path: Path) -> None:
    run_ = run_guest(gateways[0], "gateways_pr.sh", tmp_path / "guest-out", timeout=400,
                     extra_args=["-p", str(gateways[1].port)])
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
