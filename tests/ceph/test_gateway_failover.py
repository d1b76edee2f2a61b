"""Two `pytarget serve --gateway` processes over one RBD LUN of the throw-away cluster, and the
owner killed with SIGKILL (cluster/ownership.py): the survivor fences the dead gateway's client
(blocklisted in the OSD map), claims the LU, and the project's initiator sees through it the
unit attention and REPORT TARGET PORT GROUPS with the new states; writes through it succeed.
The killed gateway, started again with the same configuration, rejoins as active/non-optimized
and does not take the LU back. Non-owners write without the image's exclusive lock moving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytarget.backstore.rbd import RBD_FEATURE_EXCLUSIVE_LOCK
from pytarget.config import load
from pytarget.control import request, socket_path
from pytarget.initiator.client import CommandResult, Initiator

from ..ceph_cluster import CephCluster
from ..conftest import INITIATOR1, TARGET_IQN, LiveTarget, run, start_target
from ..interop.gateways import gateway_pair, rbd_client, rbd_image

pytestmark = pytest.mark.ceph

RTPG = bytes((0xA3, 0x0A, 0, 0, 0, 0)) + struct.pack(">I", 1024) + bytes(2)
NOT_READY, UNIT_ATTENTION = 0x2, 0x6
WAIT = 90.0  # seconds any condition below may take on a loaded machine


def states(rtpg: bytes) -> dict[int, int]:
    """Target port group id -> asymmetric access state, from REPORT TARGET PORT GROUPS."""
    out, at = {}, 4
    while at < len(rtpg):
        count = rtpg[at + 7]
        out[struct.unpack(">H", rtpg[at + 2:at + 4])[0]] = rtpg[at] & 0x0F
        at += 8 + 4 * count
    return out


def status(gateway: LiveTarget, name: str) -> dict[str, Any]:
    answer: dict[str, Any] = request(socket_path(load(gateway.config, name)), "status")
    return answer


def lun0(doc: dict[str, Any]) -> dict[str, Any]:
    lun: dict[str, Any] = doc["targets"][0]["luns"][0]
    return lun


def wait_for(what: str, predicate: Any) -> Any:
    """Poll `predicate` until it returns something true (WAIT seconds at most)."""
    deadline = time.monotonic() + WAIT
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.1)


@pytest.fixture
def failover_setup(ceph_cluster: CephCluster, tmp_path: Path, image_name: str
                   ) -> Iterator[tuple[Path, list[LiveTarget]]]:
    lun = {"id": 0, "backstore": "rbd", "pool": ceph_cluster.pool, "image": image_name,
           **rbd_client(ceph_cluster), "size": "64MiB"}
    with rbd_image(ceph_cluster, image_name, owner_record=True), \
            gateway_pair(tmp_path, [lun], failover={"timeout": 3, "heartbeat": 0.5}) as started:
        yield started[0].config, started


def record(cluster: CephCluster, image: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ownership record: the owner document and each gateway's heartbeat."""
    handle = cluster.connect()
    try:
        with handle.open_ioctx(cluster.pool) as ioctx:
            xattrs = dict(ioctx.get_xattrs(f"pytarget.owner.{image}"))
    finally:
        handle.shutdown()
    members = {k[3:]: json.loads(v) for k, v in xattrs.items() if k.startswith("gw.")}
    return json.loads(xattrs["owner"]), members


def blocklist(cluster: CephCluster) -> str:
    handle = cluster.connect()
    try:
        ret, out, err = handle.mon_command(json.dumps({"prefix": "osd blocklist ls"}), b"",
                                           timeout=30)
    finally:
        handle.shutdown()
    assert ret == 0, err
    return f"{out.decode()}\n{err}"


def image_features(cluster: CephCluster, image: str) -> int:
    import rbd
    handle = cluster.connect()
    try:
        with handle.open_ioctx(cluster.pool) as ioctx, rbd.Image(ioctx, image,
                                                                read_only=True) as img:
            return int(img.features())
    finally:
        handle.shutdown()


async def good(ini: Initiator, cdb: bytes, data_out: bytes = b"", read_length: int = 0,
               seen: list[tuple[int, int, int]] | None = None) -> CommandResult:
    """The command, repeated while it meets a unit attention or NOT READY (a transition)."""
    deadline = time.monotonic() + WAIT
    while True:
        result = await ini.command(0, cdb, data_out, read_length)
        triplet = result.sense_triplet
        if result.good or triplet is None or triplet[0] not in (NOT_READY, UNIT_ATTENTION):
            return result.check()
        if seen is not None:
            seen.append(triplet)
        if time.monotonic() > deadline:
            raise AssertionError(f"still {triplet} after {WAIT} s")
        await asyncio.sleep(0.05)


def test_owner_killed_survivor_fences_and_takes_over_then_it_rejoins(
        failover_setup: tuple[Path, list[LiveTarget]], ceph_cluster: CephCluster,
        image_name: str) -> None:
    config, (gw1, gw2) = failover_setup
    wait_for("gw1 claims LUN 0 (epoch 1)",
             lambda: record(ceph_cluster, image_name)[0].get("epoch") == 1)
    owner, members = record(ceph_cluster, image_name)
    assert owner["owner"] == "gw1"
    wait_for("both gateways heartbeat", lambda: len(record(ceph_cluster, image_name)[1]) == 2)
    gw1_addrs = record(ceph_cluster, image_name)[1]["gw1"]["addrs"]
    assert not image_features(ceph_cluster, image_name) & RBD_FEATURE_EXCLUSIVE_LOCK
    seen: list[tuple[int, int, int]] = []

    async def before_and_after() -> None:
        a, b = os.urandom(4096), os.urandom(4096)
        async with await Initiator.connect(gw1.host, gw1.port) as ini1, \
                await Initiator.connect(gw2.host, gw2.port) as ini2:
            await ini1.login(TARGET_IQN, initiator_name=INITIATOR1)
            await ini2.login(TARGET_IQN, initiator_name=INITIATOR1)
            for ini in (ini1, ini2):
                await ini.clear_unit_attentions(0)
                report = (await good(ini, RTPG, read_length=1024)).data
                assert states(report) == {1: 0x0, 2: 0x1}  # gw1 optimized, gw2 not
            # both gateways write the image; neither steals anything
            (await ini1.write(0, 0, a)).check()
            (await ini2.write(0, 8, b)).check()
            assert (await ini1.read(0, 8, 8)).check().data == b
            assert (await ini2.read(0, 0, 8)).check().data == a

            killed = time.monotonic()
            gw1.stop(signal.SIGKILL)
            # Through the survivor: transitioning, then the unit attention, then the new
            # states (REPORT TARGET PORT GROUPS is not affected by the transition).
            deadline = killed + WAIT
            while True:
                result = await ini2.command(0, RTPG, read_length=1024)
                if result.sense_triplet is not None:
                    seen.append(result.sense_triplet)
                elif states(result.check().data) == {1: 0x1, 2: 0x0}:
                    break
                assert time.monotonic() < deadline, "gw2 never became active/optimized"
                await asyncio.sleep(0.05)
            c = os.urandom(8192)
            (await good(ini2, bytes((0x2A, 0, 0, 0, 0, 16, 0, 0, 16, 0)), c, seen=seen))
            assert (await ini2.read(0, 16, 16)).check().data == c
            assert (await ini2.read(0, 0, 8)).check().data == a

    run(before_and_after(), timeout=WAIT * 2)
    assert (UNIT_ATTENTION, 0x2A, 0x06) in seen  # ASYMMETRIC ACCESS STATE CHANGED
    owner, _ = record(ceph_cluster, image_name)
    assert owner["owner"] == "gw2" and owner["epoch"] == 2
    assert owner["fenced"] == gw1_addrs
    listed = blocklist(ceph_cluster)
    assert all(addr in listed for addr in gw1_addrs), listed
    assert "fenced gw1" in gw2.log_text()
    doc = lun0(status(gw2, "gw2"))
    assert doc["owner"] == "gw2" and doc["alua_states"] == {
        "gw1": "active_non_optimized", "gw2": "active_optimized"}

    # gw1 again, same configuration: follows the record, active/non-optimized
    again = start_target(config, "--gateway", "gw1", log_name="gw1-again.log")
    try:
        wait_for("the restarted gw1 reports gw2 as the owner",
                 lambda: lun0(status(again, "gw1"))["owner"] == "gw2")
        doc = lun0(status(again, "gw1"))
        assert doc["alua_state"] == "active_non_optimized"
        assert doc["ownership"]["epoch"] == 2

        async def through_the_restarted() -> None:
            async with await Initiator.connect(again.host, again.port) as ini:
                await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
                await ini.clear_unit_attentions(0)
                assert states((await good(ini, RTPG, read_length=1024)).data) \
                    == {1: 0x1, 2: 0x0}
                d = os.urandom(4096)
                (await ini.write(0, 64, d)).check()
                assert (await ini.read(0, 64, 8)).check().data == d
        run(through_the_restarted(), timeout=WAIT)
        new_addrs = record(ceph_cluster, image_name)[1]["gw1"]["addrs"]
        assert new_addrs != gw1_addrs
        assert record(ceph_cluster, image_name)[0]["owner"] == "gw2"  # no flapping back
    finally:
        again.stop()
