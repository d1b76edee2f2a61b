"""The acceptance test of gateway failover with the Linux initiator: two `pytarget serve
--gateway` processes over one RBD LUN of the session's throw-away cluster, dm-multipath in the
guest, ext4 and fio with verification on the map while the host kills the owning gateway with
SIGKILL, then starts it again (tests/interop/guest/gateways_failover.sh, one guest boot).

The guest says when to kill (host_sync kill, a few seconds into fio's writes) and when to
restart (host_sync restart, after fsck); this side kills, restarts on the same port (the
guest's forward points at it) and acknowledges. The longest I/O the guest measured is printed.

Skipped when ../shared/interop/linux-initiator is missing or cannot run here.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pytarget.backstore.rbd import remove_image

from ..ceph_cluster import CephCluster
from ..conftest import TARGET_IQN, LiveTarget, run, start_target
from ..interop.run import run_guest, unavailable

pytestmark = [pytest.mark.ceph, pytest.mark.interop, pytest.mark.slow]

FAILOVER = {"timeout": 4, "heartbeat": 1}
REPLACEMENT_TIMEOUT = 6  # > failover timeout + heartbeat: retries find gw2 fenced or fencing


@pytest.fixture
def gateways(ceph_cluster: CephCluster, tmp_path: Path, image_name: str
             ) -> Iterator[tuple[Path, list[LiveTarget]]]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    lun = {"id": 0, "backstore": "rbd", "pool": ceph_cluster.pool, "image": image_name,
           "conf": str(ceph_cluster.conf), "keyring": str(ceph_cluster.keyring),
           "client_id": ceph_cluster.client_id, "size": "128MiB"}
    config = tmp_path / "pytarget.yaml"
    doc = {"gateways": [{"name": "gw1", "portals": ["127.0.0.1:0"]},
                        {"name": "gw2", "portals": ["127.0.0.1:0"]}],
           "failover": FAILOVER, "targets": [{"name": TARGET_IQN, "luns": [lun]}]}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    started: list[LiveTarget] = []
    try:
        for name in ("gw1", "gw2"):
            started.append(start_target(config, "--gateway", name, log_name=f"{name}.log"))
        yield config, started
    finally:
        for target in started:
            target.stop()
        run(remove_image(ceph_cluster.pool, image_name, conf=str(ceph_cluster.conf),
                         keyring=str(ceph_cluster.keyring)))
        handle = ceph_cluster.connect()
        try:
            with handle.open_ioctx(ceph_cluster.pool) as ioctx:
                ioctx.remove_object(f"pytarget.owner.{image_name}")
        finally:
            handle.shutdown()


def takeover(log: str) -> list[tuple[float, str]]:
    """(wall-clock time, message) of the survivor's takeover lines."""
    out = []
    for line in log.splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+: (.*)", line)
        if stamp and re.search(r"silent|fenced|owns the LU|owner is now", stamp.group(3)):
            when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))
            out.append((when + int(stamp.group(2)) / 1000, stamp.group(3)))
    return out


def test_owner_killed_under_fio_on_ext4_then_it_rejoins(
        gateways: tuple[Path, list[LiveTarget]], tmp_path: Path) -> None:
    config, started = gateways
    gw1, gw2 = started

    killed: list[float] = []

    def kill() -> None:
        killed.append(time.time())
        gw1.stop(signal.SIGKILL)

    def restart() -> None:
        # the same port: the guest's forward and its session's portal point at it
        doc = yaml.safe_load(config.read_text())
        doc["gateways"][0]["portals"] = [f"127.0.0.1:{gw1.port}"]
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        again = start_target(config, "--gateway", "gw1", log_name="gw1-again.log")
        started.append(again)
        assert again.port == gw1.port

    result = run_guest(gw1, "gateways_failover.sh", tmp_path / "guest-out", timeout=900,
                       marks={"kill": kill, "restart": restart},
                       env={"REPLACEMENT_TIMEOUT": str(REPLACEMENT_TIMEOUT)},
                       extra_args=["-p", str(gw2.port), "--multipath"])
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
