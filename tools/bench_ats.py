#!/usr/bin/env python3
"""ATS (COMPARE AND WRITE) latency under contention, as VMFS locks and heartbeats see it.

    tools/bench_ats.py [--sessions 8] [--loops 500] [--writers 2] [--url HOST:PORT/IQN/LUN]

Without --url a target is started on loopback with a fresh 64 MiB LUN. Eight sessions run
read-increment-COMPARE AND WRITE loops on one counter while two sessions write inside and
next to the compare range; every CAW round trip is timed. Prints p50/p99/max latency, the
miscompare rate and the counter check, as one Markdown table row per run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytarget.initiator.client import Initiator  # noqa: E402

BS = 512


def pattern(owner: int, value: int) -> bytes:
    return struct.pack(">QQ", owner, value) * (BS // 16)


def caw_cdb() -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0, 0, 2, 0, 0)


async def run(host: str, port: int, iqn: str, lun: int, sessions: int, loops: int,
              writers: int) -> dict[str, float]:
    inis = []
    for n in range(sessions + writers):
        ini = await Initiator.connect(host, port)
        await ini.login(iqn, initiator_name=f"iqn.2026-11.io.pytarget.bench:ats{n}")
        await ini.clear_unit_attentions(lun)
        inis.append(ini)
    latencies: list[float] = []
    miscompares = 0
    stop = False
    (await inis[0].write(lun, 0, pattern(0, 0) + pattern(1, 0) + pattern(1, 0), BS)).check()

    async def incrementer(ini: Initiator) -> None:
        nonlocal miscompares
        for _ in range(loops):
            while True:
                current = (await ini.read(lun, 0, 2, BS)).check().data
                value = struct.unpack_from(">Q", current, 8)[0]
                new = pattern(0, value + 1) + current[BS:]
                started = time.perf_counter()
                result = await ini.command(lun, caw_cdb(), current + new)
                latencies.append(time.perf_counter() - started)
                if result.good:
                    break
                miscompares += 1

    async def writer(ini: Initiator, owner: int) -> None:
        i = 0
        while not stop:
            (await ini.write(lun, 1 + i % 2, pattern(owner, i), BS)).check()
            i += 1

    started = time.perf_counter()
    tasks = [asyncio.create_task(writer(inis[sessions + w], 100 + w)) for w in range(writers)]
    await asyncio.gather(*[incrementer(inis[n]) for n in range(sessions)])
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    final = struct.unpack_from(">Q", (await inis[0].read(lun, 0, 1, BS)).check().data, 8)[0]
    for ini in inis:
        await ini.close()
    latencies.sort()
    return {
        "caws": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "max_ms": 1000 * latencies[-1],
        "miscompare_pct": 100 * miscompares / len(latencies),
        "per_s": (len(latencies)) / elapsed,
        "counter_ok": float(final == sessions * loops),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--loops", type=int, default=500)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--url", help="HOST:PORT/IQN/LUN of a running target")
    args = parser.parse_args()
    if args.url:
        hostport, iqn, lun = args.url.split("/")
        host, port = hostport.rsplit(":", 1)
        result = asyncio.run(run(host, int(port), iqn, int(lun), args.sessions, args.loops,
                                 args.writers))
    else:
        from tests.conftest import start_target, write_config

        with tempfile.TemporaryDirectory(prefix="pytarget-ats-") as tmp:
            target = start_target(write_config(Path(tmp)))
            try:
                result = asyncio.run(run(target.host, target.port, target.iqn, 0,
                                         args.sessions, args.loops, args.writers))
            finally:
                target.stop()
    print("| sessions | writers | CAWs | p50 ms | p99 ms | max ms | miscompare % | CAW/s "
          "| counter |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.sessions} | {args.writers} | {result['caws']} | {result['p50_ms']:.2f} | "
          f"{result['p99_ms']:.2f} | {result['max_ms']:.2f} | {result['miscompare_pct']:.1f} | "
          f"{result['per_s']:.0f} | {'exact' if result['counter_ok'] else 'WRONG'} |")
    return 0 if result["counter_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
