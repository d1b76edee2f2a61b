"""COMPARE AND WRITE: miscompare sense, length checks, and atomicity against plain writes."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from pytarget.core.sense import Asc, SenseKey, Status

from .harness import NEXUS_A, NEXUS_B, make_lu, run, run_async


@pytest.fixture
def lu(tmp_path):
    return make_lu(tmp_path)


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks, 0, 0)


def read1(lba: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, 1, 0, 0)


def test_match_writes_and_miscompare_does_not(lu) -> None:
    old, new = os.urandom(512), os.urandom(512)
    run(lu, struct.pack(">BBQIBB", 0x8A, 0, 3, 1, 0, 0), old)
    assert run(lu, caw(3, 1), old + new).ok()
    assert run(lu, read1(3)).data == new
    stale = bytearray(old)
    stale[100] ^= 0xFF
    result = run(lu, caw(3, 1), bytes(stale) + os.urandom(512))
    assert result.key == SenseKey.MISCOMPARE and result.asc == Asc.MISCOMPARE_DURING_VERIFY
    assert result.information == 100 or result.information < 512
    assert run(lu, read1(3)).data == new


def test_first_difference_offset(lu) -> None:
    run(lu, struct.pack(">BBQIBB", 0x8A, 0, 0, 2, 0, 0), bytes(1024))
    compare = bytearray(1024)
    compare[777] = 1
    compare[900] = 1
    result = run(lu, caw(0, 2), bytes(compare) + bytes(1024))
    assert result.information == 777


def test_length_rules(lu) -> None:
    assert run(lu, caw(0, 1), bytes(512)).asc == Asc.INVALID_FIELD_IN_CDB  # EDTL != 2 blocks
    assert run(lu, caw(0, 0), bytes(1024)).asc == Asc.INVALID_FIELD_IN_CDB
    assert run(lu, caw(0, 0)).ok()
    too_long = lu.max_compare_and_write_blocks + 1
    assert run(lu, caw(0, too_long), bytes(2 * 512 * too_long)).field_pointer == (True, 13, 7)
    assert run(lu, caw(lu.nblocks, 1), bytes(1024)).asc == Asc.LBA_OUT_OF_RANGE


def test_fua_flushes(lu, monkeypatch) -> None:
    flushed = []
    monkeypatch.setattr(lu.backstore, "flush", lambda: flushed.append(1))
    assert run(lu, caw(0, 1, 0x08), bytes(1024)).ok()
    assert flushed


def test_counter_increments_are_atomic_with_concurrent_writers(lu) -> None:
    """Many read-increment-CAW loops and plain writers on one block: no lost update."""
    def block(counter: int, writer: int) -> bytes:
        return struct.pack(">QQ", counter, writer) * 32

    async def incrementer(nexus, loops: int) -> int:
        retries = 0
        for _ in range(loops):
            while True:
                current = (await run_async(lu, read1(0), nexus=nexus)).data
                value = struct.unpack_from(">Q", current)[0]
                r = await run_async(lu, caw(0, 1), current + block(value + 1, 0), nexus=nexus)
                if r.status == Status.GOOD:
                    break
                assert r.key == SenseKey.MISCOMPARE
                retries += 1
        return retries

    async def writer(nexus, n: int) -> None:
        for i in range(n):
            await run_async(lu, struct.pack(">BBQIBB", 0x8A, 0, 1, 1, 0, 0), block(i, 9),
                            nexus=nexus)

    async def go():
        lu.ua.clear()
        run_async_first = await run_async(lu, read1(0), nexus=NEXUS_A)
        await run_async(lu, read1(0), nexus=NEXUS_B)
        assert run_async_first is not None
        await run_async(lu, struct.pack(">BBQIBB", 0x8A, 0, 0, 1, 0, 0), block(0, 0))
        await asyncio.gather(*[incrementer(NEXUS_A, 50) for _ in range(8)], writer(NEXUS_B, 200))
        final = (await run_async(lu, read1(0))).data
        return struct.unpack_from(">Q", final)[0], final

    value, final = asyncio.run(go())
    assert value == 400
    assert final == block(400, 0)


def test_reserve_waits_for_a_pending_compare_and_write(lu) -> None:
    """SNIA hypervisor storage interfaces note: RESERVE must not complete while a COMPARE
    AND WRITE queued before it is still pending (here: waiting for its Data-Out)."""
    from pytarget.core.task import ScsiTask

    class HeldSource:
        def __init__(self, data: bytes) -> None:
            self.data = data
            self.release = asyncio.Event()

        async def fetch_data_out(self, task, length):  # type: ignore[no-untyped-def]
            await self.release.wait()
            return memoryview(self.data)[:length]

    async def go() -> list[str]:
        lu.ua.clear()
        order: list[str] = []
        source = HeldSource(bytes(1024))
        caw_task = ScsiTask(caw(0, 1), 0, 1, NEXUS_A, expected_out=1024, source=source)
        reserve_task = ScsiTask(bytes((0x16, 0, 0, 0, 0, 0)), 0, 2, NEXUS_B)
        await run_async(lu, read1(0), nexus=NEXUS_A)  # consume each nexus's power-on UA
        await run_async(lu, read1(0), nexus=NEXUS_B)
        caw_runner = lu.start(caw_task)
        caw_runner.add_done_callback(lambda _r: order.append("caw"))
        await asyncio.sleep(0)  # the CAW holds its range lock and waits for data
        reserve_runner = lu.start(reserve_task)
        reserve_runner.add_done_callback(lambda _r: order.append("reserve"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not reserve_runner.done()
        source.release.set()
        await asyncio.gather(caw_runner, reserve_runner)
        assert caw_task.status == Status.GOOD and reserve_task.status == Status.GOOD
        return order

    assert asyncio.run(go()) == ["caw", "reserve"]
