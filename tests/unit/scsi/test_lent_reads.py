"""READs lent from the page cache: a view of the file's mapping instead of a copy, for fabrics
that only hand Data-In to the kernel (ScsiTask.lend_data_in). The blocks stay locked against
writers until the fabric says the data has left."""

from __future__ import annotations

import asyncio
import os
import struct
from collections import deque

from pytarget.backstore import file as F
from pytarget.backstore.file import FileBackstore
from pytarget.core.sense import Status
from pytarget.core.task import ScsiTask
from pytarget.scsi.device import LEND_MIN

from .harness import NEXUS_A, NEXUS_B, make_lu, make_task

MiB = 1 << 20


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def task_for(lu, cdb: bytes, *, lend: bool = True, expected_in: int = 1 << 24,
             data_out: bytes = b"", nexus=NEXUS_A) -> ScsiTask:
    task = make_task(lu, cdb, data_out, nexus, expected_in)
    task.lend_data_in = lend
    lu.ua.setdefault(nexus.key, deque()).clear()
    return task


def fill(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_mapped_view_shows_the_file_while_it_is_cached(tmp_path) -> None:
    path = tmp_path / "f.img"
    FileBackstore.create(str(path), 8 * MiB)
    data = os.urandom(MiB)
    fill(str(path), 3 * MiB, data)
    bs = FileBackstore(str(path))
    try:
        view = bs.mapped(3 * MiB, MiB)
        assert view is not None and view.readonly
        assert bytes(view) == data
        # later writes show through: the caller, not the view, keeps the range stable
        fill(str(path), 3 * MiB, b"\xAA" * 512)
        assert bytes(view[:512]) == b"\xAA" * 512
        assert bs.mapped(8 * MiB - 4096, 8192) is None  # past the end of the file
    finally:
        bs.close()
    assert bytes(view[512:]) == data[512:]  # a lent view outlives close()


def test_range_not_in_the_page_cache_is_not_lent(tmp_path) -> None:
    path = tmp_path / "f.img"
    FileBackstore.create(str(path), 8 * MiB)
    fill(str(path), 0, os.urandom(2 * MiB))
    bs = FileBackstore(str(path))
    try:
        os.fsync(bs.fd)
        os.posix_fadvise(bs.fd, 0, 2 * MiB, os.POSIX_FADV_DONTNEED)
        # No read may come first: a RWF_NOWAIT read of missing pages starts readahead, and on
        # a fast disk the pages can arrive before the read gives up, so it finds them.
        assert bs.mapped(MiB, 65536) is None  # touching it would wait for the disk
        bs.read_into(memoryview(bytearray(65536)), MiB)  # now it is cached
        assert bs.mapped(MiB, 65536) is not None
    finally:
        bs.close()


def test_windows_are_bounded_and_not_crossed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(F, "MAP_WINDOWS", 2)
    path = tmp_path / "f.img"
    FileBackstore.create(str(path), 4 * F.MAP_WINDOW)
    marks = [bytes([i + 1]) * 4096 for i in range(4)]
    for i, mark in enumerate(marks):
        fill(str(path), i * F.MAP_WINDOW, mark)
    bs = FileBackstore(str(path))
    try:
        views = [bs.mapped(i * F.MAP_WINDOW, 4096) for i in range(4)]
        assert len(bs._windows) == 2
        assert [bytes(v) for v in views] == marks  # views of dropped windows stay valid
        assert bs.mapped(F.MAP_WINDOW - 4096, 8192) is None  # spans two windows
    finally:
        bs.close()


def test_lent_read_holds_its_blocks_until_the_data_is_sent(tmp_path) -> None:
    lu = make_lu(tmp_path, blocks=8192)
    old, new = os.urandom(MiB), os.urandom(MiB)
    fill(lu.backstore.path, 0, old)

    async def go() -> None:
        reader = task_for(lu, read10(0, 2048))
        await lu.start(reader)
        assert reader.status == Status.GOOD and reader.on_data_sent is not None
        assert isinstance(reader.data_in, memoryview) and reader.data_in.readonly
        writer = task_for(lu, write10(1024, 8), data_out=new[:4096], nexus=NEXUS_B)
        write = asyncio.ensure_future(lu.start(writer))
        for _ in range(100):  # until the write has queued for its blocks
            if lu.ranges.waiting:
                break
            await asyncio.sleep(0)
        assert not write.done()  # the write waits for the lent blocks
        assert bytes(reader.data_in) == old
        reader.on_data_sent()
        await write
        assert writer.status == Status.GOOD
        after = task_for(lu, read10(1024, 8), lend=False)
        await lu.start(after)
        assert bytes(after.data_in) == new[:4096]
        assert not lu.ranges.busy

    asyncio.run(go())


def test_small_overflowing_and_unlending_reads_are_copied(tmp_path) -> None:
    lu = make_lu(tmp_path, blocks=8192)
    data = os.urandom(MiB)
    fill(lu.backstore.path, 0, data)

    async def go() -> None:
        small = LEND_MIN // 512 - 1
        cases = [task_for(lu, read10(0, small)),                             # too small
                 task_for(lu, read10(0, 256), expected_in=65536),            # overflow
                 task_for(lu, read10(0, 256), lend=False)]                   # fabric copies
        for task in cases:
            await lu.start(task)
            assert task.status == Status.GOOD and task.on_data_sent is None
            assert not isinstance(task.data_in, memoryview)
            assert bytes(memoryview(task.data_in)[:task.data_in_len]) == \
                data[:min(task.data_in_len, len(task.data_in))]
        assert not lu.ranges.busy

    asyncio.run(go())
