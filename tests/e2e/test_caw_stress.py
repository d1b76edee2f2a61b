"""COMPARE AND WRITE as VMware ATS uses it, under contention from many sessions.

Eight sessions each run 500 read-increment-COMPARE AND WRITE loops on a shared counter,
retrying on MISCOMPARE, while two more sessions overwrite blocks inside and next to the
compare range with plain WRITEs. The CAW range is LBAs 0-1: block 0 holds the counter, block 1
is rewritten by the writers too, so their writes force miscompares (as a heartbeat next to a
lock would) without touching the counter itself; block 2 is a neighbour. At the end the
counter must be exactly 4000, and every block read at any time must hold one writer's whole
pattern (no torn block).
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from pytarget.initiator.client import Initiator

from ..conftest import INITIATOR1, INITIATOR2, LiveTarget

BS = 512
SESSIONS = 8
LOOPS = 500
WRITERS = 2
WRITES = 400
MISCOMPARE = 0x0E

pytestmark = pytest.mark.slow


def pattern(owner: int, value: int) -> bytes:
    """A whole block of one 16-byte record repeated: a torn block cannot pass `whole`."""
    return struct.pack(">QQ", owner, value) * (BS // 16)


def whole(block: bytes) -> tuple[int, int]:
    record = block[:16]
    assert block == record * (BS // 16), "torn block"
    return struct.unpack(">QQ", record)


def caw_cdb(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0, lba, blocks, 0, 0)


async def session(target: LiveTarget, n: int) -> Initiator:
    ini = await Initiator.connect(target.host, target.port)
    await ini.login(target.iqn, initiator_name=f"{INITIATOR1}-{n}" if n % 2 else INITIATOR2)
    await ini.clear_unit_attentions(0)
    return ini


async def incrementer(ini: Initiator, owner: int) -> int:
    retries = 0
    for _ in range(LOOPS):
        while True:
            current = (await ini.read(0, 0, 2, BS)).check().data
            _, value = whole(current[:BS])
            whole(current[BS:])
            new = pattern(0, value + 1) + current[BS:]
            result = await ini.command(0, caw_cdb(0, 2), current + new)
            if result.good:
                break
            assert result.sense_key == MISCOMPARE, result
            retries += 1
    return retries


async def writer(ini: Initiator, owner: int) -> None:
    for i in range(WRITES):
        lba = 1 + i % 2
        (await ini.write(0, lba, pattern(owner, i), BS)).check()
        for block in range(3):
            whole((await ini.read(0, block, 1, BS)).check().data)


def test_counter_is_exact_and_no_block_is_torn(live_target: LiveTarget) -> None:
    async def go() -> tuple[int, int]:
        inis = [await session(live_target, n) for n in range(SESSIONS + WRITERS)]
        try:
            first = inis[0]
            (await first.write(0, 0, pattern(0, 0) + pattern(100, 0) + pattern(100, 0), BS)).check()
            results = await asyncio.gather(
                *[incrementer(inis[n], n) for n in range(SESSIONS)],
                *[writer(inis[SESSIONS + w], 100 + w) for w in range(WRITERS)])
            final = (await first.read(0, 0, 3, BS)).check().data
            for block in range(3):
                whole(final[block * BS:(block + 1) * BS])
            return whole(final[:BS])[1], sum(r for r in results if isinstance(r, int))
        finally:
            for ini in inis:
                await ini.close()

    counter, retries = asyncio.run(go())
    assert counter == SESSIONS * LOOPS
    assert retries > 0  # the contention was real
