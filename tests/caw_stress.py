"""COMPARE AND WRITE as VMware ATS uses it, under contention from many sessions: the stress that
tests/e2e/test_caw_stress.py runs against one target and tests/ceph/test_caw_gateways.py against
two gateways of one RBD LUN.

Counter sessions each run read-increment-COMPARE AND WRITE loops on a shared counter in block 0,
retrying on MISCOMPARE, while plain writers overwrite blocks 1 and 2 and read blocks 0-2 back.
With a two-block compare range (`caw_blocks=2`) block 1 is inside it, so the writers force
miscompares (as a heartbeat next to a lock would) without touching the counter itself; with one
block the counter sessions only contend with each other and the writers hit its neighbours.
Every block is one 16-byte record repeated, so a torn block (a mix of two writes) is caught
whenever it is read; at the end the counter must equal sessions x loops.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pytarget.initiator.client import Initiator

from .conftest import INITIATOR1, INITIATOR2, LiveTarget

BS = 512
MISCOMPARE = 0x0E


@dataclass(frozen=True)
class Outcome:
    counter: int
    retries: int  # miscompares the counter sessions met and retried
    expected: int


def pattern(owner: int, value: int) -> bytes:
    """A whole block of one 16-byte record repeated: a torn block cannot pass `whole`."""
    return struct.pack(">QQ", owner, value) * (BS // 16)


def whole(block: bytes) -> tuple[int, int]:
    record = block[:16]
    assert block == record * (BS // 16), "torn block"
    return struct.unpack(">QQ", record)


def caw_cdb(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0, lba, blocks, 0, 0)


async def session(target: LiveTarget, n: int, lun: int) -> Initiator:
    ini = await Initiator.connect(target.host, target.port)
    await ini.login(target.iqn, initiator_name=f"{INITIATOR1}-{n}" if n % 2 else INITIATOR2)
    await ini.clear_unit_attentions(lun)
    return ini


async def incrementer(ini: Initiator, lun: int, loops: int, caw_blocks: int) -> int:
    retries = 0
    for _ in range(loops):
        while True:
            current = (await ini.read(lun, 0, caw_blocks, BS)).check().data
            _, value = whole(current[:BS])
            for block in range(1, caw_blocks):
                whole(current[block * BS:(block + 1) * BS])
            new = pattern(0, value + 1) + current[BS:]
            result = await ini.command(lun, caw_cdb(0, caw_blocks), current + new)
            if result.good:
                break
            assert result.sense_key == MISCOMPARE, result
            retries += 1
    return retries


async def writer(ini: Initiator, lun: int, owner: int, writes: int) -> None:
    for i in range(writes):
        lba = 1 + i % 2
        (await ini.write(lun, lba, pattern(owner, i), BS)).check()
        for block in range(3):
            whole((await ini.read(lun, block, 1, BS)).check().data)


def run_stress(targets: Sequence[LiveTarget], *, lun: int = 0, sessions: int = 8,
               loops: int = 500, writers: int = 2, writes: int = 400,
               caw_blocks: int = 2) -> Outcome:
    """Run the stress with session n on targets[n mod len(targets)] (the counter sessions
    first, then the writers) and check every block at the end."""
    async def go() -> Outcome:
        inis = [await session(targets[n % len(targets)], n, lun)
                for n in range(sessions + writers)]
        try:
            first = inis[0]
            (await first.write(lun, 0, pattern(0, 0) + pattern(100, 0) + pattern(100, 0),
                               BS)).check()
            results = await asyncio.gather(
                *[incrementer(inis[n], lun, loops, caw_blocks) for n in range(sessions)],
                *[writer(inis[sessions + w], lun, 100 + w, writes) for w in range(writers)])
            final = (await first.read(lun, 0, 3, BS)).check().data
            for block in range(3):
                whole(final[block * BS:(block + 1) * BS])
            retries = sum(r for r in results if isinstance(r, int))
            return Outcome(whole(final[:BS])[1], retries, sessions * loops)
        finally:
            for ini in inis:
                await ini.close()

    return asyncio.run(go())
