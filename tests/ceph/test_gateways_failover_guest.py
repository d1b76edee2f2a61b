"""The acceptance test of gateway failover with the Linux initiator: two `pytarget serve
--gateway` processes over one RBD LUN of the session's throw-away cluster, dm-multipath in the
guest, ext4 and fio with verification on the map while the host kills the owning gateway with
SIGKILL, then starts it again (tests/interop/guest/gateways_failover.sh, one guest boot).

The guest says when to kill (host_sync kill, a few seconds into fio's writes) and when to
restart (host_sync restart, after fsck); this side kills, restarts on the same port (the
guest's forward points at it) and acknowledges. The longest I/O the guest measured is printed.
The script is a part of tests/interop/lane.py's shared boot.

Skipped when ../shared/interop/linux-initiator is missing or cannot run here.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import pytest
import yaml

from ..conftest import LiveTarget, gateway_targets, start_target
from ..interop.gateways import rbd_image
from ..interop.lane import GUEST, PartContext, PartOutcome, PartPlan
from ..interop.run import GuestPart

pytestmark = [pytest.mark.ceph, pytest.mark.interop, pytest.mark.slow]

FAILOVER = {"timeout": 4, "heartbeat": 1}
REPLACEMENT_TIMEOUT = 6  # > failover timeout + heartbeat: retries find gw2 fenced or fencing


@dataclass
class Failover:
    """The gateways (gw1, gw2, then gw1 started again) and when the host killed gw1."""

    started: list[LiveTarget]
    killed: list[float] = field(default_factory=list)

    def kill(self) -> None:
        self.killed.append(time.time())
        self.started[0].stop(signal.SIGKILL)

    def restart(self) -> None:
        # the same port: the guest's forward and its session's portal point at it
        gw1 = self.started[0]
        doc = yaml.safe_load(gw1.config.read_text())
        doc["gateways"][0]["portals"] = [f"127.0.0.1:{gw1.port}"]
        gw1.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        again = start_target(gw1.config, "--gateway", "gw1", log_name="gw1-again.log")
        self.started.append(again)
        assert again.port == gw1.port


@contextmanager
def _failover(context: PartContext) -> Iterator[PartPlan]:
    ceph_cluster = context.fixture("ceph_cluster")
    image = f"img-{uuid.uuid4().hex[:12]}"
    lun = {"id": 0, "backstore": "rbd", "pool": ceph_cluster.pool, "image": image,
           **ceph_cluster.client, "size": "128MiB"}
    with ExitStack() as stack:
        stack.enter_context(rbd_image(ceph_cluster, image, owner_record=True))
        started = stack.enter_context(gateway_targets(context.directory, [lun],
                                                      failover=FAILOVER))
        state = Failover(started)
        yield PartPlan(GuestPart("failover", "gateways_failover.sh",
                                 [target.port for target in started], started[0].iqn, 900,
                                 env={"REPLACEMENT_TIMEOUT": str(REPLACEMENT_TIMEOUT)},
                                 marks={"kill": state.kill, "restart": state.restart},
                                 multipath=True, target_log=started[0].log), state)


guest_failover = GUEST.part("failover", _failover)


def takeover(log: str) -> list[tuple[float, str]]:
    """(wall-clock time, message) of the survivor's takeover lines."""
    out = []
    for line in log.splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+: (.*)", line)
        if stamp and re.search(r"silent|fenced|owns the LU|owner is now", stamp.group(3)):
            when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))
            out.append((when + int(stamp.group(2)) / 1000, stamp.group(3)))
    return out


def test_owner_killed_under_fio_on_ext4_then_it_rejoins(guest_failover: PartOutcome) -> None:
    result, state = guest_failover.run, guest_failover.state
    gw2, killed = state.started[1], state.killed
    stall = result.text("stall.txt").strip()
    print(f"\n{stall}\nguest run: {result.wall:.0f} s; marks at {result.marks}")
    if killed:
        for when, what in takeover(gw2.log_text()):
            print(f"gw2, {when - killed[0]:+.2f} s after the kill: {what}")
    if not result.ok or result.mark_errors:
        pytest.fail(result.report() + "\n" + "\n".join(result.mark_errors)
                    + "\n--- gw2 log (tail) ---\n" + "\n".join(gw2.log_text().splitlines()[-30:]),
                    pytrace=False)
    assert set(result.marks) == {"kill", "restart"}
    assert "MAX I/O STALL" in stall
    assert "fenced gw1" in gw2.log_text()
