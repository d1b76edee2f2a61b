"""Reservation state in RADOS (pytarget/cluster/rados.py) on the throw-away cluster: the store's
compare-and-update and watch/notify, then two logical units — two gateways — over one file
and one RADOS object: Write Exclusive through one makes a non-registrant's WRITE through the
other conflict, PREEMPT through the other is seen with its unit attention, REGISTERs racing
from both end with one generation."""

from __future__ import annotations

import asyncio
import errno
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from pytarget.backstore.file import FileBackstore
from pytarget.cluster.rados import RadosReservationStore, remove_state
from pytarget.core.reservations import StaleVersion
from pytarget.core.sense import Asc, SenseKey, Status
from pytarget.core.task import ScsiTask
from pytarget.scsi.device import LogicalUnit, LuConfig

from ..ceph_cluster import CephCluster
from ..conftest import run, until
from ..unit.scsi.test_pr import (
    BLOCK,
    CONFLICT,
    EA,
    ISID_2,
    NAME_A,
    NAME_B,
    NAME_C,
    PREEMPT,
    WE,
    Directory,
    Source,
    execute,
    nexus,
    params,
    pending_uas,
    prout,
    read10,
    read_keys,
    read_reservation,
    register,
    reserve,
    sense_of,
    write10,
)

pytestmark = pytest.mark.ceph

NAA = bytes.fromhex("3000000000000002")


@pytest.fixture
def object_name(ceph_cluster: CephCluster) -> Iterator[str]:
    name = f"pytarget.test.{uuid.uuid4().hex[:12]}"
    yield name
    run(remove_state(ceph_cluster.pool, name, conf=str(ceph_cluster.conf),
                     keyring=str(ceph_cluster.keyring), client_id=ceph_cluster.client_id))


def store(cluster: CephCluster, name: str) -> RadosReservationStore:
    return RadosReservationStore(cluster.pool, name, conf=str(cluster.conf),
                                 keyring=str(cluster.keyring), client_id=cluster.client_id)


def with_gateways(cluster: CephCluster, name: str, path: Path,
                  body: Callable[[LogicalUnit, LogicalUnit], Awaitable[None]]) -> None:
    FileBackstore.create(str(path), 1 << 20)

    async def go() -> None:
        gateways = [LogicalUnit(LuConfig(lun=0, naa=NAA), FileBackstore(str(path)), Directory(),
                                reservations=store(cluster, name)) for _ in range(2)]
        try:
            await body(*gateways)
        finally:
            for lu in gateways:
                await asyncio.to_thread(lu.close)
    run(go(), timeout=120)


def test_compare_and_update_and_notify(ceph_cluster: CephCluster, object_name: str) -> None:
    async def go() -> None:
        one, two = store(ceph_cluster, object_name), store(ceph_cluster, object_name)
        heard: list[tuple[str, bool]] = []

        async def changed() -> None:
            heard.append(("two", two.trusted()))
            await two.load()

        two.subscribe(changed)
        try:
            first = await one.load()
            assert (first.version, first.document) == (0, None)
            assert one.trusted()
            assert await two.load() == first
            assert await one.update(0, b"first") == 1
            # two's handler ran (untrusted until it re-read) before the update returned
            assert heard == [("two", False)] and two.trusted()
            with pytest.raises(StaleVersion):
                await two.update(0, b"lost the race")
            assert await two.update(1, b"second") == 2
            snapshot = await one.load()
            assert (snapshot.version, snapshot.document) == (2, b"second")
            assert len(heard) == 1  # two's own update is not a change to two
        finally:
            await asyncio.to_thread(one.close)
            await asyncio.to_thread(two.close)
    run(go(), timeout=120)


def test_a_lost_watch_is_established_again(ceph_cluster: CephCluster,
                                           object_name: str) -> None:
    async def go() -> None:
        one, two = store(ceph_cluster, object_name), store(ceph_cluster, object_name)
        heard: list[int] = []

        async def changed() -> None:
            heard.append((await two.load()).version)

        two.subscribe(changed)
        try:
            await one.load()
            await two.load()
            # librados reports an error on the watch (as after a reconnection): not trusted
            # until a load has watched again
            cookie = two._cookie
            assert cookie is not None
            two._watch_failed(None, cookie, -errno.ENOTCONN)
            assert not two.trusted()
            snapshot = await two.load()
            # watched again (a new handle, which librados may give the freed one's address)
            assert snapshot.version == 0 and two.trusted() and two._cookie is not None
            # the watch is gone altogether: changes meanwhile go unheard; the load finds them
            # and watches again
            await asyncio.to_thread(two._unwatch)
            assert not two.trusted()
            assert await one.update(0, b"unheard") == 1
            assert heard == []
            snapshot = await two.load()
            assert (snapshot.version, snapshot.document) == (1, b"unheard")
            assert two.trusted()
            assert await one.update(1, b"heard") == 2
            assert heard == [2]
        finally:
            await asyncio.to_thread(one.close)
            await asyncio.to_thread(two.close)
    run(go(), timeout=120)


def test_write_exclusive_and_preempt_across_gateways(ceph_cluster: CephCluster,
                                                      object_name: str, tmp_path: Path) -> None:
    async def body(gw1: LogicalUnit, gw2: LogicalUnit) -> None:
        a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
        await register(gw1, a, 0xA)
        assert (await reserve(gw1, a, 0xA, WE)).status == Status.GOOD
        assert (await execute(gw2, c, write10(), b"\0" * BLOCK)).status == CONFLICT
        assert (await execute(gw2, c, read10())).status == Status.GOOD
        await register(gw2, b, 0xB)
        while gw1.take_unit_attention(a) is not None:
            pass
        task = await prout(gw2, b, PREEMPT, params(0xB, 0xA), EA)
        assert task.status == Status.GOOD, task.sense
        assert pending_uas(gw1, a) == [Asc.REGISTRATIONS_PREEMPTED]
        seen = ScsiTask(read10(), 0, 1, a, expected_out=0, source=Source(b""))
        await gw1.execute(seen)
        assert sense_of(seen)[:2] == (SenseKey.UNIT_ATTENTION, Asc.REGISTRATIONS_PREEMPTED)
        assert await read_reservation(gw1) == (0xB, EA)
        assert (await execute(gw1, a, read10())).status == CONFLICT
    with_gateways(ceph_cluster, object_name, tmp_path / "lun.img", body)


def test_register_races_end_with_one_generation(ceph_cluster: CephCluster, object_name: str,
                                                tmp_path: Path) -> None:
    count = 8

    async def body(gw1: LogicalUnit, gw2: LogicalUnit) -> None:
        names = [f"iqn.2026-11.io.pytarget.test:r{i}" for i in range(count)]
        await asyncio.gather(*(register(gw, n, 0x100 + i)
                               for i, name in enumerate(names)
                               for gw, n in ((gw1, nexus(name)), (gw2, nexus(name, ISID_2)))))
        generation1, keys1 = await read_keys(gw1)
        generation2, keys2 = await read_keys(gw2)
        assert generation1 == generation2 == 2 * count
        assert sorted(keys1) == sorted(keys2) == sorted([0x100 + i for i in range(count)] * 2)
    with_gateways(ceph_cluster, object_name, tmp_path / "lun.img", body)


def test_spc2_reserve_and_nexus_loss_across_gateways(ceph_cluster: CephCluster,
                                                     object_name: str, tmp_path: Path) -> None:
    async def body(gw1: LogicalUnit, gw2: LogicalUnit) -> None:
        a, c = nexus(NAME_A), nexus(NAME_C)
        assert (await execute(gw1, a, bytes((0x16, 0, 0, 0, 0, 0)))).status == Status.GOOD
        assert (await execute(gw2, c, read10())).status == CONFLICT
        gw1.nexus_lost(a)
        await until(lambda: gw1.reservation is None, "the lost nexus's release committed")
        assert gw2.reservation is None  # gw2 took it in before the release was acknowledged
        assert (await execute(gw2, c, read10())).status == Status.GOOD
    with_gateways(ceph_cluster, object_name, tmp_path / "lun.img", body)
