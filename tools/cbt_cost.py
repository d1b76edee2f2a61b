#!/usr/bin/env python3
"""What changed-block tracking costs a 4 KiB WRITE: CPU time per command through the device
server (`LogicalUnit.submit`, the eager path an iSCSI write with immediate data takes: range
lock, page-cache write on the event loop, release), with 0, 1 and 4 checkpoints; and the same
for the range lock's grant and release alone, where all of tracking's work is. With no
checkpoint the range lock's `release` calls no hook (nothing is tracked), so 0 is the
reference.

Each configuration runs in turn, round after round, on its own LUN (a 256 MiB file under
--dir, tmpfs by default), so drift of the machine spreads over all of them; the figures are
the median and the spread (min..max) of the per-round means.

    PYTHONPATH=$PWD python3 tools/cbt_cost.py [--rounds 7] [--writes 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import struct
import tempfile
import time
from collections import deque
from pathlib import Path

from pytarget.backstore.file import FileBackstore
from pytarget.core.task import Nexus, ScsiTask
from pytarget.scsi.device import LogicalUnit, LuConfig

NEXUS = Nexus("iqn.2026-11.io.pytarget.bench:cbt", bytes(6), "iqn.2026-11.io.pytarget:bench", 1)
SIZE = 256 << 20
BS = 512


class Directory:
    def visible_luns(self, nexus: Nexus) -> list[int]:
        return [0]


def unit(path: Path, checkpoints: int) -> LogicalUnit:
    with open(path, "wb") as f:  # allocated: the writes measure no block allocation
        for _ in range(SIZE >> 20):
            f.write(b"\xa5" * (1 << 20))
    lu = LogicalUnit(LuConfig(lun=0, block_size=BS), FileBackstore(str(path)), Directory())
    for i in range(checkpoints):
        lu.create_checkpoint(f"c{i}")
    lu.ua[NEXUS.key] = deque()
    return lu


async def run(lu: LogicalUnit, writes: int, rng: random.Random) -> float:
    """CPU seconds per WRITE(16) of 4 KiB at random 4 KiB-aligned LBAs."""
    data = memoryview(os.urandom(4096))
    blocks = SIZE // 4096
    done: list[ScsiTask] = []
    tasks = []
    for tag in range(writes):
        lba = rng.randrange(blocks) * 8
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, 8, 0, 0)
        task = ScsiTask(cdb, 0, tag, NEXUS, expected_out=4096)
        task.data_out_ready = data
        tasks.append(task)
    lu._inline_after = 0.0
    started = time.process_time()
    for task in tasks:
        lu.submit(task, done.append)
        while done[-1:] != [task]:  # one at a time: a write the I/O threads took is awaited
            await asyncio.sleep(0)
    elapsed = time.process_time() - started
    assert all(t.status == 0 for t in done), "a write failed"
    return elapsed / writes


def lock_cycle(lu: LogicalUnit, cycles: int, rng: random.Random) -> float:
    """CPU seconds per exclusive range-lock grant and release of 8 blocks (what a WRITE's
    tracking adds to is all here)."""
    ranges = lu.ranges
    lbas = [rng.randrange(SIZE // 4096) * 8 for _ in range(cycles)]
    started = time.process_time()
    for lba in lbas:
        req = ranges.try_acquire(lba, 8, True)
        assert req is not None
        ranges.release(req)
    return (time.process_time() - started) / cycles


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--writes", type=int, default=50000)
    parser.add_argument("--dir", default="/dev/shm",
                        help="where the LUN files go (default /dev/shm: the page cache without "
                             "writeback stalls, so the device server's own cost shows)")
    args = parser.parse_args()
    configs = {"0 checkpoints": 0, "1 checkpoint": 1, "4 checkpoints": 4}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        lus = {name: unit(Path(tmp) / f"lun{i}.img", n)
               for i, (name, n) in enumerate(configs.items())}
        rng = random.Random(1)
        for lu in lus.values():
            await run(lu, 2000, rng)  # warm the page cache's first pages and the code
        results: dict[str, list[float]] = {name: [] for name in lus}
        locks: dict[str, list[float]] = {name: [] for name in lus}
        for _ in range(args.rounds):
            for name, lu in lus.items():
                results[name].append(await run(lu, args.writes, rng))
                locks[name].append(lock_cycle(lu, args.writes * 4, rng))
        for lu in lus.values():
            lu.close()
    for title, table in ((f"CPU per 4 KiB WRITE(16) through LogicalUnit.submit, {args.rounds} "
                          f"rounds of {args.writes} writes", results),
                         (f"CPU per exclusive range-lock grant + release, {args.rounds} rounds "
                          f"of {args.writes * 4}", locks)):
        base = statistics.median(table["0 checkpoints"])
        print(f"{title} (median, min..max of the round means, median against the first):")
        for name, values in table.items():
            med = statistics.median(values)
            print(f"  {name:32} {med * 1e6:7.3f} µs  "
                  f"({min(values) * 1e6:.3f}..{max(values) * 1e6:.3f})  "
                  f"{(med - base) * 1e9:+6.0f} ns")


if __name__ == "__main__":
    asyncio.run(main())
