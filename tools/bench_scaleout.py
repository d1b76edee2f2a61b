"""tools/bench's scale-out section: RBD LUNs on a throw-away Ceph cluster (tests/ceph_cluster.py).

- I/O: an RBD LUN through pytarget, measured by the initiators of the I/O table (libiscsi's
  `iscsi-perf` for reads, `qemu-img bench` for writes), against `rbd bench` (librbd from C,
  no target) on another image of the same size in the same pool, alternating run by run:
  4 KiB random and 1 MiB sequential, read and write, queue depth 32 (`--io-threads 32`).
  Both images are written whole first, so that reads read data.
- Copy: EXTENDED COPY of a written 1 GiB RBD LUN into another RBD LUN of the same pool
  (whole objects copied by the OSDs, docs/ceph.md), the same copy shifted by 4 KiB (no
  object qualifies: the target reads and writes), and the host copy of the copy table (READ
  then WRITE of 1 MiB commands, 8 in flight, by the project's initiator: what a hypervisor
  without offload does), alternating, each into a destination emptied by UNMAP.
- Failover: `tools/failover_measure.py`'s `measure` on the same cluster when that tool is in
  the tree; "not measured" otherwise.

Every figure is the median and the range of the runs; the load average before and after is
printed with them (the cluster's daemons share the machine with the target and the initiators).
The gateways (this section's and the failover's) run the code tools/bench hands
`scaleout_section` (tools/bench_code.py): the data path compiled by tools/build-compiled, or
the sources with `tools/bench --pure`.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench_code import child_env
from bench_measure import Sample, iscsi_perf, process_times, qemu_bench

from pytarget.initiator.client import Initiator

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
BS = 512
IQN = "iqn.2026-11.io.pytarget:scaleout"
SEGMENT_BLOCKS = 57344  # 28 MiB: the largest whole number of 4 MiB objects a 02h segment holds
RBD_BENCH = re.compile(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)")
CELLS = (("randread", 4096), ("randwrite", 4096), ("read", MiB), ("write", MiB))
DEPTH = 32


def _spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    return (f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"
            if len(values) > 1 else f"{values[0]:{fmt}}")


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


class Rbd:
    """The `rbd` command on the cluster."""

    def __init__(self, cluster: object) -> None:
        self.base = ["rbd", "-c", str(cluster.conf), "--keyring",  # type: ignore[attr-defined]
                     str(cluster.keyring), "--id", cluster.client_id,  # type: ignore[attr-defined]
                     "-p", cluster.pool]  # type: ignore[attr-defined]

    def __call__(self, *argv: str, timeout: float = 900) -> str:
        done = subprocess.run([*self.base, *argv], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"rbd {' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def bench(self, image: str, kind: str, size: int, total: int) -> Sample:
        """One `rbd bench` run; its own final rate and elapsed time."""
        t0 = time.perf_counter()
        out = self("bench", "--io-type", "read" if "read" in kind else "write",
                   "--io-pattern", "rand" if kind.startswith("rand") else "seq",
                   "--io-size", str(size), "--io-threads", str(DEPTH),
                   "--io-total", str(total), image)
        wall = time.perf_counter() - t0
        m = RBD_BENCH.search(out)
        if m is None:
            raise RuntimeError(f"rbd bench printed no summary: {out[-300:]}")
        seconds, ops, rate = float(m.group(1)), float(m.group(2)), float(m.group(3))
        return Sample(rate, seconds, ops, process_times(os.getpid()), wall)


class Gateway:
    """`pytarget serve` with RBD LUNs 0.. on the given images."""

    def __init__(self, directory: Path, cluster: object, images: list[str],
                 code: Path) -> None:
        luns = "\n".join(
            f"      - {{id: {n}, backstore: rbd, pool: {cluster.pool}, "  # type: ignore[attr-defined]
            f"image: {image}, conf: {cluster.conf}, "  # type: ignore[attr-defined]
            f"keyring: {cluster.keyring}, client_id: {cluster.client_id}}}"  # type: ignore[attr-defined]
            for n, image in enumerate(images))
        config = directory / "scaleout.yaml"
        config.write_text(f'portals: ["127.0.0.1:0"]\ntargets:\n  - name: {IQN}\n'
                          f"    luns:\n{luns}\n")
        self.log = directory / "scaleout.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytarget", "serve", "--config", str(config)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=directory,
            env=child_env(code))
        deadline = time.monotonic() + 60
        while True:
            m = re.search(r"listening on [0-9.]+:(\d+)", self.log.read_text())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self.log.read_text()[-2000:])
            time.sleep(0.05)

    def url(self, lun: int) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/{lun}"

    def times(self):  # type: ignore[no-untyped-def]
        return process_times(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def io_rows(gw: Gateway, rbd: Rbd, image: str, runs: int, seconds: float,
            log: Callable[[str], None]) -> list[str]:
    rows = []
    for kind, size in CELLS:
        reads = "read" in kind
        random = kind.startswith("rand")
        py: list[float] = []
        native: list[float] = []
        # warm-up and rate probes: each side's run is sized to last about `seconds`
        if reads:
            iscsi_perf(gw.url(0), size, DEPTH, random, 1, gw.times)
        else:
            probe = qemu_bench(gw.url(0), size, DEPTH, random, max(256, 16 * MiB // size),
                               gw.times)
            py_rate = probe.rate
        probe_rbd = rbd.bench(image, kind, size, max(256, 16 * MiB // size) * size)
        rbd_rate = probe_rbd.rate
        for _ in range(runs):
            if reads:
                s = iscsi_perf(gw.url(0), size, DEPTH, random, max(1, math.ceil(seconds)),
                               gw.times)
            else:
                s = qemu_bench(gw.url(0), size, DEPTH, random,
                               max(64, math.ceil(py_rate * seconds)), gw.times)
                py_rate = max(py_rate, s.rate)
            py.append(s.rate)
            log(f"  pytarget {kind} {size}: {s.rate:,.0f}/s over {s.seconds:.1f} s")
            total = max(64, math.ceil(rbd_rate * seconds)) * size
            r = rbd.bench(image, kind, size, total)
            rbd_rate = max(rbd_rate, r.rate)
            native.append(r.rate)
            log(f"  rbd bench {kind} {size}: {r.rate:,.0f}/s over {r.seconds:.1f} s")
        unit = "4 KiB" if size < MiB else "1 MiB"
        name = {"randread": "random read", "randwrite": "random write", "read": "seq read",
                "write": "seq write"}[kind]
        if size < MiB:
            cells = (f"{_spread(py)} IOPS", f"{_spread(native)} IOPS")
        else:
            cells = (f"{_spread([v * size / MiB for v in py])} MiB/s",
                     f"{_spread([v * size / MiB for v in native])} MiB/s")
        ratio = statistics.median(py) / statistics.median(native)
        rows.append(f"| {name} {unit} QD{DEPTH} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
        log(rows[-1])
    return rows


async def _naa(ini: Initiator, lun: int) -> bytes:
    page = (await ini.command(lun, bytes((0x12, 1, 0x83, 0, 255, 0)), read_length=255)).data
    at = 4
    while at < len(page):
        if page[at + 1] & 0x3F == 0x03:
            return bytes(page[at + 4:at + 4 + page[at + 3]])
        at += 4 + page[at + 3]
    raise RuntimeError("no NAA designator")


def _xcopy_list(src: bytes, dst: bytes, blocks: int, shift: int = 0) -> bytes:
    def e4(naa: bytes) -> bytes:
        desc = bytearray(32)
        desc[0], desc[4], desc[5], desc[7] = 0xE4, 0x01, 0x03, len(naa)
        desc[8:8 + len(naa)] = naa
        desc[29:32] = BS.to_bytes(3, "big")
        return bytes(desc)
    segs = b"".join(struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 1,
                                min(SEGMENT_BLOCKS, blocks - done), done, done + shift)
                    for done in range(0, blocks, SEGMENT_BLOCKS))
    cscds = e4(src) + e4(dst)
    return struct.pack(">BBH4xII", 1, 0x18, len(cscds), len(segs), 0) + cscds + segs


async def _unmap_all(ini: Initiator, lun: int, blocks: int) -> None:
    """One UNMAP per MAXIMUM UNMAP LBA COUNT (1 Mi blocks: the limit is per command)."""
    step = 1 << 20
    for lba in range(0, blocks, step):
        desc = struct.pack(">QI4x", lba, min(step, blocks - lba))
        params = struct.pack(">HH4x", len(desc) + 6, len(desc)) + desc
        cdb = bytes((0x42, 0)) + bytes(5) + len(params).to_bytes(2, "big") + bytes(1)
        (await ini.command(lun, cdb, params, timeout=600)).check()


async def _copies(port: int, runs: int, size: int, log: Callable[[str], None]
                  ) -> tuple[list[float], list[float], list[float]]:
    """Per run: EXTENDED COPY at the same offsets (objects copied by the OSD), EXTENDED COPY
    to 4 KiB further on (no object qualifies: the generic engine, through the target), and
    the host copy; each into a destination emptied by UNMAP."""
    ini = await Initiator.connect("127.0.0.1", port)
    await ini.login(IQN, initiator_name="iqn.2026-11.io.pytarget:scaleout-host")
    for lun in (1, 2):
        await ini.clear_unit_attentions(lun)
    blocks = size // BS
    params = _xcopy_list(await _naa(ini, 1), await _naa(ini, 2), blocks)
    shifted = _xcopy_list(await _naa(ini, 1), await _naa(ini, 2), blocks - 8, shift=8)
    sem = asyncio.Semaphore(8)

    async def extended_copy(plist: bytes) -> float:
        cdb = bytes((0x83, 0)) + bytes(8) + len(plist).to_bytes(4, "big") + bytes(2)
        t0 = time.perf_counter()
        (await ini.command(1, cdb, plist, timeout=900)).check()
        return time.perf_counter() - t0

    async def one(lba: int) -> None:
        async with sem:
            data = (await ini.read(1, lba, MiB // BS)).check().data
            (await ini.write(2, lba, data)).check()

    xcopy: list[float] = []
    through: list[float] = []
    host: list[float] = []
    for _ in range(runs):
        await _unmap_all(ini, 2, blocks)
        xcopy.append(await extended_copy(params))
        log(f"  EXTENDED COPY {size // MiB} MiB: {xcopy[-1]:.2f} s")
        await _unmap_all(ini, 2, blocks)
        through.append(await extended_copy(shifted))
        log(f"  EXTENDED COPY through the target {size // MiB} MiB: {through[-1]:.2f} s")
        await _unmap_all(ini, 2, blocks)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(lba) for lba in range(0, blocks, MiB // BS)))
        host.append(time.perf_counter() - t0)
        log(f"  host copy {size // MiB} MiB: {host[-1]:.2f} s")
    same = (await ini.read(1, blocks - 2048, 2048)).check().data == \
        (await ini.read(2, blocks - 2048, 2048)).check().data
    await ini.logout()
    await ini.close()
    if not same:
        raise RuntimeError("the copy's last MiB differs from its source")
    return xcopy, through, host


def failover_rows(cluster: object, runs: int, log: Callable[[str], None],
                  code: Path) -> list[str]:
    try:
        tool = importlib.import_module("failover_measure")
    except ImportError:
        return ["Failover stall: not measured (tools/failover_measure.py is not in this tree)."]
    results = tool.measure(tool.Cluster(str(cluster.conf),  # type: ignore[attr-defined]
                                        str(cluster.keyring),  # type: ignore[attr-defined]
                                        cluster.client_id,  # type: ignore[attr-defined]
                                        cluster.pool),  # type: ignore[attr-defined]
                           runs, code=code)
    stalls = [r["stall"] for r in results]
    log(f"  failover stalls: {stalls}")
    return [f"Failover stall (owner killed with SIGKILL, 4 KiB writes at QD1 moved to the "
            f"other gateway at once, tools/failover_measure.py): {_spread(stalls, '.2f')} s "
            f"over {len(stalls)} runs."]


def scaleout_section(quick: bool, runs: int, seconds: float, code: Path,
                     log: Callable[[str], None] = print) -> list[str]:
    """The section's Markdown lines; its gateways run `code` (bench_code.pytarget_code)."""
    title = "## Scale-out: RBD LUNs on a throw-away Ceph cluster"
    try:
        sys.path.insert(0, str(REPO))
        from tests.ceph_cluster import missing, running
    except ImportError as exc:
        return [title, "", f"Not measured: {exc}", ""]
    reason = missing()
    if reason:
        return [title, "", f"Not measured: {reason}", ""]
    size = 256 * MiB if quick else GiB
    lines = [title, ""]
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="pytarget-scaleout-") as tmp, \
            running(Path(tmp) / "ceph", osd_block_size=6 * GiB) as cluster:
        rbd = Rbd(cluster)
        images = ["lun-io", "lun-src", "lun-dst", "native-io"]
        for image in images:
            rbd("create", "--size", f"{size // MiB}M", image)
        for image in ("lun-io", "lun-src", "native-io"):  # reads read data
            rbd("bench", "--io-type", "write", "--io-pattern", "seq", "--io-size", "4M",
                "--io-threads", "16", "--io-total", str(size), image)
        gw = Gateway(Path(tmp), cluster, images[:3], code)
        try:
            log(f"scale-out: cluster up, load {_load()}")
            rows = io_rows(gw, rbd, "native-io", runs, seconds, log)
            xcopy, through, host = asyncio.run(_copies(gw.port, runs, size, log))
        finally:
            gw.stop()
        failover = failover_rows(cluster, runs, log, code)
    load_after = _load()
    lines += [
        f"One monitor and one BlueStore OSD on a sparse file on this machine's disk (pool size "
        f"1), {size // MiB} MiB images with 4 MiB objects, written whole before the reads. "
        f"Load average (1, 5, 15 min) {load_before} before and {load_after} after this "
        f"section: the OSD, the target and the initiators share the cores.", "",
        f"| {runs} alternating runs, median (range) | pytarget, RBD LUN | `rbd bench` | "
        "ratio |", "|---|---|---|---|", *rows, "",
        f"Copy of a written {size // MiB} MiB RBD LUN into another of the same pool, "
        f"{runs} alternating runs, each into a destination emptied by UNMAP; EXTENDED COPY "
        f"in segments of {SEGMENT_BLOCKS * BS // MiB} MiB (whole objects):", "",
        "| copy | seconds, median (range) | host copy / this |", "|---|---|---|",
        f"| EXTENDED COPY, same offsets: whole objects copied by the OSD (RADOS copy-from) "
        f"| {_spread(xcopy, '.2f')} | {statistics.median(host) / statistics.median(xcopy):.1f}x |",
        f"| EXTENDED COPY to 4 KiB further on: no object qualifies, the target reads and "
        f"writes | {_spread(through, '.2f')} | "
        f"{statistics.median(host) / statistics.median(through):.1f}x |",
        f"| host copy: READ then WRITE of 1 MiB commands, 8 in flight, by the project's "
        f"initiator | {_spread(host, '.2f')} | 1.0x |", "",
        *failover, ""]
    for line in lines[2:]:
        log(line)
    return lines
