"""READ and WRITE through `LogicalUnit.submit`: the synchronous form of their handlers
(`OpSpec.now`) against the coroutine that `start` runs.

The common case (blocks unlocked, in the page cache, all of a write's data with the command)
must end inside `submit`, and every other case must end exactly as the coroutine handler ends
it: same status, sense and data, whichever path ran it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path

import pytest

from pytarget.core.sense import Asc, Status
from pytarget.core.table import Opcode
from pytarget.core.task import ScsiTask
from pytarget.scsi.device import LogicalUnit

from .harness import NEXUS_A, Result, make_lu, make_task

BLOCK = 512
BLOCKS = 8192


def cdb10(op: int, lba: int, blocks: int, byte1: int = 0, group: int = 0) -> bytes:
    return bytes((op, byte1)) + lba.to_bytes(4, "big") + bytes((group,)) \
        + blocks.to_bytes(2, "big") + b"\0"


def cdb16(op: int, lba: int, blocks: int, byte1: int = 0) -> bytes:
    return bytes((op, byte1)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


def pattern(blocks: int, seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(blocks * BLOCK))


def outcome(task: ScsiTask) -> Result:
    data = bytes(task.data_in[:task.data_in_len]) if task.data_in is not None else b""
    return Result(task.status, task.sense, data)


def task_for(lu: LogicalUnit, cdb: bytes, data: bytes, expected_in: int) -> ScsiTask:
    task = make_task(lu, cdb, data, expected_in=expected_in)
    if data:
        task.data_out_ready = memoryview(data)  # all of it came with the command
    return task


async def by_submit(lu: LogicalUnit, cdb: bytes, data: bytes = b"",
                    expected_in: int = 1 << 24) -> tuple[Result, bool]:
    """The outcome through `submit`, and whether it ended before `submit` returned."""
    task = task_for(lu, cdb, data, expected_in)
    ended = asyncio.get_running_loop().create_future()
    lu.submit(task, ended.set_result)
    at_once = ended.done()
    await ended
    if task.on_data_sent is not None:  # lent Data-In: the fabric releases it once sent
        result = outcome(task)
        task.on_data_sent()
        return result, at_once
    return outcome(task), at_once


async def by_start(lu: LogicalUnit, cdb: bytes, data: bytes = b"",
                   expected_in: int = 1 << 24) -> Result:
    task = task_for(lu, cdb, data, expected_in)
    await lu.start(task)
    result = outcome(task)
    if task.on_data_sent is not None:
        task.on_data_sent()
    return result


def fresh(tmp_path: Path, name: str, **config: object) -> LogicalUnit:
    (tmp_path / name).mkdir(exist_ok=True)
    lu = make_lu(tmp_path / name, blocks=BLOCKS, block_size=BLOCK, **config)
    lu.ua.setdefault(NEXUS_A.key, deque()).clear()
    return lu


@pytest.fixture
def pair(tmp_path: Path) -> tuple[LogicalUnit, LogicalUnit]:
    """Two LUs with the same data: one driven through `submit`, one through `start`."""
    return fresh(tmp_path, "a"), fresh(tmp_path, "b")


R10, W10, R16, W16 = Opcode.READ_10, Opcode.WRITE_10, Opcode.READ_16, Opcode.WRITE_16
FUA = 0x08

# (CDB, Data-Out, expected Data-In length): each run through both paths, in order, on the
# pair of LUs, so later READs see what earlier WRITEs left.
CASES = [
    (cdb10(W10, 100, 8), pattern(8, 1), 0),
    (cdb10(R10, 100, 8), b"", 1 << 24),
    (cdb16(W16, 2000, 64), pattern(64, 7), 0),  # 32 KiB: Data-In lent from the page cache
    (cdb16(R16, 2000, 64), b"", 1 << 24),
    (cdb10(R10, 100, 8), b"", 1024),  # the initiator takes less than the command reads
    (cdb10(R10, 100, 0), b"", 1 << 24),  # no blocks
    (cdb10(W10, 300, 0), b"", 0),
    (cdb16(R16, BLOCKS - 4, 8), b"", 1 << 24),  # beyond the medium
    (cdb16(W16, BLOCKS - 4, 8), pattern(8, 3), 0),
    (cdb16(R16, (1 << 64) - 1, 1), b"", 1 << 24),
    (cdb10(R10, 100, 8, group=0x80), b"", 1 << 24),  # a reserved bit
    (cdb10(W10, 100, 8, group=0x80), pattern(8, 5), 0),
    (cdb10(R10, 100, 8, byte1=FUA), b"", 1 << 24),  # FUA: the coroutine's flush
    (cdb10(W10, 400, 8, byte1=FUA), pattern(8, 9), 0),
    (cdb10(R10, 400, 8), b"", 1 << 24),
    (cdb10(W10, 500, 8), pattern(4, 11), 0),  # less Data-Out than the CDB asks for
    (cdb10(R10, 500, 8), b"", 1 << 24),
    (cdb10(W10, 600, 8), pattern(8, 13) + pattern(1, 2), 0),  # more
    (cdb10(R10, 600, 8), b"", 1 << 24),
]


def test_submit_ends_as_start_does(pair: tuple[LogicalUnit, LogicalUnit]) -> None:
    quick, slow = pair

    async def go() -> None:
        for cdb, data, expected_in in CASES:
            got, _ = await by_submit(quick, cdb, data, expected_in)
            want = await by_start(slow, cdb, data, expected_in)
            assert got == want, (cdb.hex(), got, want)

    asyncio.run(go())


def test_common_reads_and_writes_end_inside_submit(tmp_path: Path) -> None:
    lu = fresh(tmp_path, "")

    async def go() -> None:
        written, at_once = await by_submit(lu, cdb10(W10, 8, 8), pattern(8, 21))
        assert written.ok() and at_once
        read, at_once = await by_submit(lu, cdb10(R10, 8, 8))
        assert read.ok() and read.data == pattern(8, 21) and at_once
        lent, at_once = await by_submit(lu, cdb16(R16, 0, 64))
        assert lent.ok() and lent.data[4096:8192] == pattern(8, 21) and at_once
        # what the synchronous form declines ends later, through the coroutine
        fua, at_once = await by_submit(lu, cdb10(W10, 8, 8, byte1=FUA), pattern(8, 22))
        assert fua.ok() and not at_once

    asyncio.run(go())


def test_a_locked_range_waits_for_its_lock(tmp_path: Path) -> None:
    lu = fresh(tmp_path, "")

    async def go() -> None:
        await by_submit(lu, cdb10(W10, 40, 8), pattern(8, 31))
        held = lu.ranges.try_acquire(44, 1, True)
        assert held is not None
        task = task_for(lu, cdb10(R10, 40, 8), b"", 1 << 24)
        ended = asyncio.get_running_loop().create_future()
        lu.submit(task, ended.set_result)
        await asyncio.sleep(0.01)
        assert not ended.done()  # the READ waits for the writer's lock
        lu.ranges.release(held)
        await ended
        assert outcome(task) == Result(Status.GOOD, None, pattern(8, 31))

    asyncio.run(go())


def test_unit_attention_and_write_protection_apply(tmp_path: Path) -> None:
    lu = fresh(tmp_path, "rw")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "lun0.img").write_bytes(bytes(BLOCKS * BLOCK))
    readonly = make_lu(tmp_path / "ro", blocks=BLOCKS, block_size=BLOCK, readonly=True)
    readonly.ua.setdefault(NEXUS_A.key, deque()).clear()

    async def go() -> None:
        lu.ua[NEXUS_A.key] = deque([Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET])
        attention, at_once = await by_submit(lu, cdb10(R10, 0, 8))
        assert attention.status == Status.CHECK_CONDITION and attention.key == 0x6 and at_once
        again, _ = await by_submit(lu, cdb10(R10, 0, 8))
        assert again.ok()  # the attention was reported once
        refused, at_once = await by_submit(readonly, cdb10(W10, 0, 8), pattern(8, 1))
        assert refused.key == 0x7 and at_once  # DATA PROTECT

    asyncio.run(go())
