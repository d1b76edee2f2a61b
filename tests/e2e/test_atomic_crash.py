"""WRITE ATOMIC(16) across a crash: a writer keeps atomic writes of the LUN's maximum atomic
length in flight, each filling its range with one byte value, while the target process is killed
with SIGKILL at a random moment (after a random number of completed writes); after each restart
every atomic range holds exactly one whole pattern, never a mix of two. The LUN's backing file is
on an XFS image the test loop-mounts, where the kernel gives RWF_ATOMIC."""

from __future__ import annotations

import asyncio
import random
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytarget.initiator.client import Initiator, InitiatorError

from ..conftest import INITIATOR1, TARGET_IQN, LiveTarget, run, start_target, write_config
from ..xfs import xfs_mount

pytestmark = pytest.mark.slow

BS = 512
RANGES = 64  # atomic ranges written over and over
ROUNDS = 3
IN_FLIGHT = 8


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with xfs_mount(tmp_path) as mountpoint:
        yield mountpoint


async def session(target: LiveTarget) -> Initiator:
    initiator = await Initiator.connect(target.host, target.port)
    await initiator.login(TARGET_IQN, initiator_name=INITIATOR1)
    await initiator.clear_unit_attentions(0)
    return initiator


async def atomic_length(target: LiveTarget) -> int:
    initiator = await session(target)
    try:
        page = (await initiator.command(0, bytes((0x12, 0x01, 0xB0, 0, 64, 0)),
                                        read_length=64)).check().data
        return int.from_bytes(page[44:48], "big")
    finally:
        await initiator.close()


async def write_until_killed(target: LiveTarget, unit: int, kill_after: int,
                             rng: random.Random) -> int:
    """Keep IN_FLIGHT atomic writes outstanding; SIGKILL the target the moment the
    `kill_after`th completes, with the others still in flight; return how many completed."""
    initiator = await session(target)
    completed = 0
    value = rng.randrange(1, 256)

    async def one() -> None:
        nonlocal completed, value
        while True:
            value = value % 255 + 1
            lba = rng.randrange(RANGES) * unit
            cdb = struct.pack(">BBQHHBB", 0x9C, 0, lba, 0, unit, 0, 0)
            (await initiator.command(0, cdb, bytes((value,)) * unit * BS)).check()
            completed += 1
            if completed == kill_after:
                target.process.send_signal(signal.SIGKILL)
    try:
        outcomes = await asyncio.gather(*(one() for _ in range(IN_FLIGHT)),
                                        return_exceptions=True)
        assert all(isinstance(e, InitiatorError) for e in outcomes), outcomes
    finally:
        target.stop(signal.SIGKILL)
        await initiator.close()
    return completed


async def torn_ranges(target: LiveTarget, unit: int) -> list[int]:
    initiator = await session(target)
    try:
        torn = []
        for i in range(RANGES):
            cdb = struct.pack(">BBQIBB", 0x88, 0, i * unit, unit, 0, 0)
            data = (await initiator.command(0, cdb, read_length=unit * BS)).check().data
            if data.count(data[:1]) != len(data):
                torn.append(i)
        return torn
    finally:
        await initiator.close()


def test_atomic_writes_survive_sigkill_whole(xfs: Path, tmp_path: Path) -> None:
    luns = [{"id": 0, "path": str(xfs / "lun0.img"), "size": "64MiB"}]
    config = write_config(tmp_path, luns=luns)
    rng = random.Random()
    target = start_target(config)
    try:
        unit = run(atomic_length(target))
        if not unit:
            pytest.skip("this kernel gives no RWF_ATOMIC on XFS (Linux 6.11 and later do)")
        for _ in range(ROUNDS):
            kill_after = rng.randrange(20, 400)
            completed = run(write_until_killed(target, unit, kill_after, rng))
            assert completed >= kill_after
            assert target.process.returncode == -signal.SIGKILL
            target = start_target(config)
            assert run(torn_ranges(target, unit)) == []
    finally:
        target.stop()
