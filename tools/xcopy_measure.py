#!/usr/bin/env python3
"""Clone a 1 GiB LUN by EXTENDED COPY versus the same copy done by an initiator (READ then
WRITE over iSCSI), against a pytarget on loopback.

Scenarios:
  full   a fully written 1 GiB LUN on the directory's filesystem (ext4 here): kernel copies
  thin   a 1 GiB thin LUN holding 100 MiB: holes stay holes
  xfs    a fully written LUN on a loop-mounted XFS image made with reflink=1 (needs root)

    python tools/xcopy_measure.py [--dir DIR] [--scenario full thin xfs] [--no-host-copy]

The host copy keeps 8 commands of 1 MiB in flight with pytarget.initiator.client. Numbers are
printed as a table; nothing is kept afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytarget.initiator.client import Initiator  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
BS = 512
TARGET = "iqn.2026-11.io.pytarget:measure"
INITIATOR = "iqn.2026-11.io.pytarget:measure-host"
SEGMENT_BLOCKS = 65528  # largest 4 KiB-aligned count that fits NUMBER OF BLOCKS (16 bits)


def start_target(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    config = directory / "measure.yaml"
    config.write_text(
        "portals: ['127.0.0.1:0']\n"
        f"targets:\n  - name: {TARGET}\n    luns:\n"
        "      - {id: 0, path: src.img, size: 1GiB}\n"
        "      - {id: 1, path: dst.img, size: 1GiB}\n")
    log = directory / "measure.log"
    proc = subprocess.Popen([sys.executable, "-m", "pytarget", "serve", "--config", str(config)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=directory,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on [0-9.]+:(\d+)", log.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(log.read_text())


def e4(naa: bytes) -> bytes:
    desc = bytearray(32)
    desc[0], desc[4], desc[5], desc[7] = 0xE4, 0x01, 0x03, len(naa)
    desc[8:8 + len(naa)] = naa
    desc[29:32] = BS.to_bytes(3, "big")
    return bytes(desc)


def xcopy_list(src_naa: bytes, dst_naa: bytes, blocks: int) -> bytes:
    segs = b""
    done = 0
    while done < blocks:
        n = min(SEGMENT_BLOCKS, blocks - done)
        segs += struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 1, n, done, done)
        done += n
    cscds = e4(src_naa) + e4(dst_naa)
    return struct.pack(">BBH4xII", 1, 0x18, len(cscds), len(segs), 0) + cscds + segs


async def naa_of(ini: Initiator, lun: int) -> bytes:
    page = (await ini.command(lun, bytes((0x12, 1, 0x83, 0, 255, 0)), read_length=255)).data
    at = 4
    while at < len(page):
        if page[at + 1] & 0x3F == 0x03:
            return page[at + 4:at + 4 + page[at + 3]]
        at += 4 + page[at + 3]
    raise RuntimeError("no NAA designator")


async def xcopy(ini: Initiator) -> float:
    params = xcopy_list(await naa_of(ini, 0), await naa_of(ini, 1), GiB // BS)
    cdb = bytes((0x83, 0)) + bytes(8) + len(params).to_bytes(4, "big") + bytes(2)
    t0 = time.perf_counter()
    (await ini.command(0, cdb, params, timeout=600)).check()
    return time.perf_counter() - t0


async def host_copy(ini: Initiator, chunk: int = MiB, depth: int = 8) -> float:
    blocks = chunk // BS
    sem = asyncio.Semaphore(depth)

    async def one(lba: int) -> None:
        async with sem:
            data = (await ini.read(0, lba, blocks)).check().data
            (await ini.write(1, lba, data)).check()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(lba) for lba in range(0, GiB // BS, blocks)))
    return time.perf_counter() - t0


def fill(path: Path, mode: str) -> None:
    """Data into the source LUN's file: everything, or 100 MiB in ten extents."""
    block = os.urandom(64 * MiB)
    with open(path, "r+b") as f:
        if mode == "thin":
            for i in range(10):
                f.seek(i * 100 * MiB + 7 * MiB)
                f.write(block[:10 * MiB])
        else:
            for off in range(0, GiB, len(block)):
                f.seek(off)
                f.write(block)
        os.fsync(f.fileno())


def reset_destination(path: Path) -> None:
    """An empty destination, and no dirty data left from earlier runs: each timed copy starts
    without the writeback of the one before."""
    with open(path, "r+b") as f:
        os.truncate(f.fileno(), 0)
        os.truncate(f.fileno(), GiB)
        os.fsync(f.fileno())
    os.sync()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def same(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 * MiB), fb.read(16 * MiB)
            if x != y:
                return False
            if not x:
                return True


@contextlib.contextmanager
def xfs_mount(base: Path) -> Iterator[Path]:
    image, mnt = base / "xfs.img", base / "xfs"
    with open(image, "wb") as f:
        f.truncate(4 * GiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


async def measure(directory: Path, mode: str, with_host: bool,
                  runs: int = 1) -> dict[str, float | int | str]:
    """EXTENDED COPY (and, with_host, the initiator's own copy) of the whole source: `runs`
    alternating runs, each into an emptied destination; the times are medians."""
    src, dst = directory / "src.img", directory / "dst.img"
    for p in (src, dst):
        with open(p, "wb") as f:
            f.truncate(GiB)
    fill(src, mode)
    os.sync()
    proc, port = start_target(directory)
    try:
        ini = await Initiator.connect("127.0.0.1", port)
        await ini.login(TARGET, initiator_name=INITIATOR, MaxRecvDataSegmentLength=262144)
        for lun in (0, 1):
            await ini.clear_unit_attentions(lun)
        xcopies: list[float] = []
        hosts: list[float] = []
        result: dict[str, float | int | str] = {"scenario": mode}
        for i in range(runs):
            if i:
                reset_destination(dst)
            xcopies.append(await xcopy(ini))
            if not i:
                result["identical"] = str(same(src, dst))
                result["dst_allocated_MiB"] = allocated(dst) // MiB
            if with_host:
                reset_destination(dst)
                hosts.append(await host_copy(ini))
                if not i:
                    result["host_dst_allocated_MiB"] = allocated(dst) // MiB
        result["xcopy_s"] = statistics.median(xcopies)
        if with_host:
            result["host_s"] = statistics.median(hosts)
            result["speedup"] = result["host_s"] / result["xcopy_s"]
        await ini.logout()
        await ini.close()
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the LUN files go (ext4)")
    ap.add_argument("--scenario", nargs="+", default=["full", "thin", "xfs"],
                    choices=["full", "thin", "xfs"])
    ap.add_argument("--no-host-copy", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="xcopy-", dir=args.dir))
    results = []
    try:
        for mode in args.scenario:
            if mode == "xfs":
                if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
                    print("xfs: skipped (needs root and xfsprogs)")
                    continue
                with xfs_mount(base) as mnt:
                    work = mnt / "run"
                    work.mkdir()
                    results.append(await measure(work, "xfs", not args.no_host_copy))
                    shutil.rmtree(work)
            else:
                work = base / mode
                work.mkdir()
                results.append(await measure(work, mode if mode == "thin" else "full",
                                             not args.no_host_copy))
                shutil.rmtree(work)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    keys = ["scenario", "xcopy_s", "host_s", "speedup", "identical", "dst_allocated_MiB",
            "host_dst_allocated_MiB"]
    print(" ".join(f"{k:>22}" for k in keys))
    for r in results:
        cells = []
        for k in keys:
            v = r.get(k, "-")
            cells.append(f"{v:>22.4f}" if isinstance(v, float) else f"{v!s:>22}")
        print(" ".join(cells))


if __name__ == "__main__":
    asyncio.run(main())
