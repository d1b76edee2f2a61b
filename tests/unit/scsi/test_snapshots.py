"""Snapshots in the device server: a set of units quiesced at one instant (writes in flight end
first and are in the snapshots, writes issued meanwhile wait and are not), the quiesced-observer
hook, all-or-nothing failure, and rollback with its unit attentions."""

from __future__ import annotations

import asyncio
import os
import struct
from collections import deque
from pathlib import Path

import pytest

from pytarget.backstore.file import FileBackstore
from pytarget.core.sense import Asc
from pytarget.core.snapshots import QuiescedUnit
from pytarget.core.task import ScsiTask
from pytarget.scsi import snapshots
from pytarget.scsi.device import LogicalUnit

from ...conftest import run
from .harness import NEXUS_A, Directory, make_lu, make_task, run_async

BS = 512


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def snapshot_bytes(lu: LogicalUnit, name: str, lba: int, blocks: int) -> bytes:
    assert isinstance(lu.backstore, FileBackstore)
    with open(f"{lu.backstore.path}.snapshots/{name}", "rb") as f:
        f.seek(lba * BS)
        return f.read(blocks * BS)


def two_units(tmp_path: Path) -> tuple[LogicalUnit, LogicalUnit]:
    directory = Directory()
    return (make_lu(tmp_path, lun=0, directory=directory),
            make_lu(tmp_path, lun=1, directory=directory))


def test_writes_in_flight_end_before_the_set_is_taken_and_are_in_it(tmp_path: Path) -> None:
    lu0, lu1 = two_units(tmp_path)

    async def go() -> None:
        # a write granted on each member and not finished yet
        held = [await lu.ranges.acquire(100, 1, True) for lu in (lu0, lu1)]
        take = asyncio.ensure_future(snapshots.take([(lu0, "s1"), (lu1, "s1")]))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not take.done()
        assert not os.path.exists(f"{tmp_path}/lun0.img.snapshots/s1")
        for lu, req, fill in ((lu0, held[0], b"\xa0"), (lu1, held[1], b"\xa1")):
            assert lu.backstore is not None
            lu.backstore.write(memoryview(fill * BS), 100 * BS)
            lu.ranges.release(req)
        methods, elapsed = await take
        assert set(methods) == {0, 1} and elapsed >= 0

    run(go())
    assert snapshot_bytes(lu0, "s1", 100, 1) == b"\xa0" * BS
    assert snapshot_bytes(lu1, "s1", 100, 1) == b"\xa1" * BS


def test_writes_issued_while_quiesced_wait_and_miss_the_set(tmp_path: Path) -> None:
    lu0, lu1 = two_units(tmp_path)
    events: list[str] = []
    late: list[ScsiTask] = []

    def observer(unit: QuiescedUnit, name: str) -> None:
        events.append(f"quiesced {unit.lun} {name}")
        if len(late) < 2:
            for lu in (lu0, lu1):
                task = make_task(lu, write16(7, 1), b"\x5a" * BS)
                lu.submit(task, lambda t, lun=lu.lun: events.append(f"write done {lun}"))
                late.append(task)
            events.append("writes submitted")

    lu0.snapshot_observers.append(observer)
    lu1.snapshot_observers.append(observer)
    for lu in (lu0, lu1):
        lu.ua[NEXUS_A.key] = deque()  # no power-on unit attention to answer first

    async def go() -> None:
        await snapshots.take([(lu0, "s"), (lu1, "s")])
        events.append("released")
        for _ in range(1000):
            if sum(e.startswith("write done") for e in events) == 2:
                break
            await asyncio.sleep(0.001)

    run(go())
    assert events[:4] == ["quiesced 0 s", "writes submitted", "quiesced 1 s", "released"]
    assert sorted(events[4:]) == ["write done 0", "write done 1"]
    assert all(t.status == 0 for t in late)
    for lu in (lu0, lu1):
        assert snapshot_bytes(lu, "s", 7, 1) == bytes(BS)
        assert lu.backstore is not None
        buf = bytearray(BS)
        lu.backstore.read_into(memoryview(buf), 7 * BS)
        assert buf == b"\x5a" * BS


def test_reads_go_on_while_quiesced(tmp_path: Path) -> None:
    lu0, _ = two_units(tmp_path)
    lu0.ua[NEXUS_A.key] = deque()
    results = []

    async def go() -> None:
        async with snapshots.quiesced([lu0]):
            results.append(await asyncio.wait_for(run_async(lu0, read16(0, 8)), 5))

    run(go())
    assert results[0].ok() and results[0].data == bytes(8 * BS)


def test_a_failing_observer_undoes_the_whole_set(tmp_path: Path) -> None:
    lu0, lu1 = two_units(tmp_path)

    def refuse(unit: object, name: str) -> None:
        raise RuntimeError("checkpoint store full")

    lu1.snapshot_observers.append(refuse)
    with pytest.raises(RuntimeError, match="checkpoint store full"):
        run(snapshots.take([(lu0, "s"), (lu1, "s")]))
    assert not os.path.exists(f"{tmp_path}/lun0.img.snapshots/s")
    assert not os.path.exists(f"{tmp_path}/lun1.img.snapshots/s")
    # the locks were released: a write goes through at once
    lu0.ua[NEXUS_A.key] = deque()
    result = run(run_async(lu0, write16(0, 1), b"\x01" * BS))
    assert result.ok()


def test_a_duplicate_name_on_the_medium_fails_the_set_and_keeps_the_other(tmp_path: Path
                                                                           ) -> None:
    lu0, lu1 = two_units(tmp_path)
    run(snapshots.take([(lu1, "dup")]))
    before = os.stat(f"{tmp_path}/lun1.img.snapshots/dup").st_ino
    with pytest.raises(snapshots.SnapshotError, match="exists"):
        run(snapshots.take([(lu0, "dup"), (lu1, "dup")]))
    assert not os.path.exists(f"{tmp_path}/lun0.img.snapshots/dup")
    assert os.stat(f"{tmp_path}/lun1.img.snapshots/dup").st_ino == before
    with pytest.raises(snapshots.SnapshotError, match="twice"):
        run(snapshots.take([(lu0, "x"), (lu0, "x")]))


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    lu0 = make_lu(tmp_path, blocks=1 << 15)  # 16 MiB
    assert lu0.backstore is not None
    lu0.backstore.write(memoryview(b"\x33" * (1 << 20)), 4 << 20)
    methods, _ = run(snapshots.take([(lu0, "sparse")]))
    path = f"{tmp_path}/lun0.img.snapshots/sparse"
    assert os.path.getsize(path) == 16 << 20
    with open(path, "rb") as f:
        f.seek(4 << 20)
        assert f.read(1 << 20) == b"\x33" * (1 << 20)
    if methods[0] == "copy":  # reflink shares blocks instead; st_blocks then says nothing
        assert os.stat(path).st_blocks * 512 <= 2 << 20


def test_rollback_restores_the_blocks_and_raises_medium_may_have_changed(tmp_path: Path
                                                                          ) -> None:
    lu = make_lu(tmp_path)
    changed_ranges: list[tuple[int, int]] = []

    async def go() -> None:
        assert (await run_async(lu, write16(3, 1), b"\x01" * BS)).ok() is False  # power-on UA
        lu.ua[NEXUS_A.key] = deque()
        assert (await run_async(lu, write16(3, 1), b"\x01" * BS)).ok()
        await snapshots.take([(lu, "before")])
        assert (await run_async(lu, write16(3, 2), b"\x02" * 2 * BS)).ok()
        lu.write_observers.append(lambda lba, n: changed_ranges.append((lba, n)))
        assert await snapshots.rollback(lu, "before") is False
        ua = await run_async(lu, read16(3, 2))
        assert ua.asc == Asc.NOT_READY_TO_READY_CHANGE
        data = await run_async(lu, read16(3, 2))
        assert data.ok() and data.data == b"\x01" * BS + bytes(BS)

    run(go())
    assert changed_ranges == [(0, lu.nblocks)]


def test_rollback_to_a_smaller_snapshot_changes_the_capacity(tmp_path: Path) -> None:
    lu = make_lu(tmp_path, blocks=2048)

    async def go() -> None:
        await snapshots.take([(lu, "small")])
        assert lu.backstore is not None
        lu.backstore.resize(4096 * BS)
        lu.nblocks = 4096
        lu.ua[NEXUS_A.key] = deque()
        assert await snapshots.rollback(lu, "small") is True
        assert lu.nblocks == 2048
        ua = await run_async(lu, read16(0, 1))
        assert ua.asc == Asc.CAPACITY_DATA_HAS_CHANGED

    run(go())


def test_rollback_errors_are_clear(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)
    with pytest.raises(snapshots.SnapshotError, match="No such file"):
        run(snapshots.rollback(lu, "missing"))
    ro = make_lu(tmp_path, lun=5, readonly=True)
    with pytest.raises(snapshots.SnapshotError, match="read-only"):
        run(snapshots.rollback(ro, "any"))
