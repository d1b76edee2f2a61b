"""tools/bench's backup section: what snapshots, backups through the NBD export and
changed-block tracking cost (docs/snapshots.md, docs/guides/backup.md).

- snapshot creation: how long writes are held while a snapshot of a 1 GiB LUN with 256 MiB of
  data is taken, on a throw-away XFS with reflink (root) and on the filesystem of the bench's
  workspace: tools/snapshot_cost.py's measurement, called as it is;
- full against incremental backup of a 1 GiB LUN full of data of which 5 % then changes (819
  granules of 64 KiB at random places, written through iSCSI), as docs/guides/backup.md does it
  with snapshots: the full backup reads the whole export of snapshot bench-1, the incremental
  asks `qemu-img map` on snapshot bench-2's export for checkpoint bench-1's dirty extents and
  reads only those; both read through one NBD connection (`NbdReader`, 4 MiB requests, 4 in
  flight) into a sparse file, and the incremental's time includes the map;
- 4 KiB scattered WRITE IOPS at QD32 (`qemu-img bench` over iSCSI) with no checkpoint and with
  one, alternating run by run.

The last two need changed-block tracking (`pytarget checkpoint`); without it they say "not
measured" and why. Their target runs the code tools/bench hands `backup_section`
(tools/bench_code.py): the data path compiled by tools/build-compiled, or the sources with
`tools/bench --pure`. The snapshot rows run the device server inside the benchmark's own
process, which imports the sources: pure Python either way.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parent.parent

from bench_code import child_env  # noqa: E402
from bench_measure import Sample, Times, process_times, qemu_bench  # noqa: E402

from pytarget.initiator.client import Initiator  # noqa: E402
from pytarget.nbd import proto  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
IQN = "iqn.2026-11.io.pytarget:bench-backup"
GRANULE = 64 << 10
CHANGED = 0.05
READ_CHUNK = 4 * MiB
IN_FLIGHT = 4


def cbt_missing() -> str | None:
    """Why changed-block tracking cannot be measured here, or None."""
    if importlib.util.find_spec("pytarget.scsi.cbt") is None:
        return "changed-block tracking (`pytarget checkpoint`) is not in this tree"
    return None


# ---------------------------------------------------------------------------- snapshots
def snapshot_rows(base: Path, runs: int) -> list[str]:
    """tools/snapshot_cost.py's rows: the workspace's filesystem and, as root, reflink XFS."""
    import snapshot_cost

    kind = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(base)], capture_output=True,
                          text=True).stdout.strip() or "?"
    rows = [snapshot_cost.on_directory(base, runs, 256, f"{kind} (this machine)")]
    if os.geteuid() != 0:
        return rows + ["| xfs reflink=1 | not measured: mounting an XFS image needs root |"
                       " | | | | |"]
    sys.path.insert(0, str(REPO))
    from tests.xfs import xfs_mount

    xfs_dir = base / "snapshot-xfs"
    xfs_dir.mkdir()
    with xfs_mount(xfs_dir, 2 * GiB) as mount:
        rows.append(snapshot_cost.on_directory(mount, runs, 256, "xfs reflink=1 (loop image)"))
    return rows


# ---------------------------------------------------------------------------- NBD reading
class NbdReader:
    """The reading half of an NBD client: fixed newstyle, NBD_OPT_GO, simple replies."""

    def __init__(self, host: str, port: int, export: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        magic, opt, _ = proto.GREETING.unpack(self._recv(proto.GREETING.size))
        if (magic, opt) != (proto.NBDMAGIC, proto.IHAVEOPT):
            raise RuntimeError("not a fixed-newstyle NBD server")
        self.sock.sendall(proto.CLIENT_FLAGS.pack(
            proto.ClientFlag.C_FIXED_NEWSTYLE | proto.ClientFlag.C_NO_ZEROES))
        name = export.encode()
        payload = len(name).to_bytes(4, "big") + name + (0).to_bytes(2, "big")
        self.sock.sendall(proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.Opt.GO, len(payload))
                          + payload)
        self.size = -1
        while True:
            _, _, reply, length = proto.OPTION_REPLY.unpack(self._recv(proto.OPTION_REPLY.size))
            data = self._recv(length)
            if reply == proto.Rep.ACK:
                break
            if reply & (1 << 31):
                raise RuntimeError(f"NBD_OPT_GO {export}: error {reply:#x} {data!r}")
            if reply == proto.Rep.INFO and int.from_bytes(data[:2], "big") == proto.Info.EXPORT:
                self.size = proto.INFO_EXPORT.unpack(data)[1]
        self.handle = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise RuntimeError("NBD server closed the connection")
            buf += part
        return bytes(buf)

    def copy(self, ranges: list[tuple[int, int]], out: Path) -> int:
        """Read `ranges` (offset, length) into the same places of `out`; the bytes read."""
        pieces = [(o + k, min(READ_CHUNK, length - k)) for o, length in ranges
                  for k in range(0, length, READ_CHUNK)]
        pending: dict[int, tuple[int, int]] = {}
        total = 0
        with open(out, "r+b") as f:
            for offset, length in pieces:
                self.handle += 1
                pending[self.handle] = (offset, length)
                self.sock.sendall(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.Cmd.READ,
                                                     self.handle, offset, length))
                while len(pending) >= IN_FLIGHT:
                    total += self._reply(pending, f)
            while pending:
                total += self._reply(pending, f)
        return total

    def _reply(self, pending: dict[int, tuple[int, int]], f: BinaryIO) -> int:
        _, error, handle = proto.SIMPLE_REPLY.unpack(self._recv(proto.SIMPLE_REPLY.size))
        offset, length = pending.pop(handle)
        if error:
            raise RuntimeError(f"NBD READ of {length} bytes at {offset} failed: error {error}")
        f.seek(offset)
        f.write(self._recv(length))
        return length

    def close(self) -> None:
        self.sock.sendall(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.Cmd.DISC, 0, 0, 0))
        self.sock.close()


# ---------------------------------------------------------------------------- a live target
class BackupTarget:
    """`pytarget serve` with one 1 GiB LUN full of data, on iSCSI and NBD (ephemeral ports)."""

    def __init__(self, directory: Path, image: Path, code: Path) -> None:
        self.config = directory / "pytarget.yaml"
        self.config.write_text(f'portals: ["127.0.0.1:0"]\nnbd: "127.0.0.1:0"\ntargets:\n'
                               f"  - name: {IQN}\n    luns:\n      - {{id: 0, path: {image}}}\n")
        self.log = directory / "pytarget.log"
        self.env = child_env(code)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytarget", "serve", "--config", str(self.config)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=directory, env=self.env)
        try:
            deadline = time.monotonic() + 30
            while True:
                text = self.log.read_text()
                iscsi = re.search(r"listening on [0-9.]+:(\d+)", text)
                nbd = re.search(r"NBD exports served on [0-9.]+:(\d+)", text)
                if iscsi and nbd:
                    self.port, self.nbd_port = int(iscsi.group(1)), int(nbd.group(1))
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(text)
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pytarget", *args, "--config",
                               str(self.config)], capture_output=True, text=True, env=self.env,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"pytarget {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def nbd_opts(self, snapshot: str, **extra: str) -> str:
        return ",".join([f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
                         f"server.port={self.nbd_port},export={IQN}/0@{snapshot}",
                         *(f"{k}={v}" for k, v in extra.items())])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def change_granules(port: int, size: int, share: float) -> int:
    """Write random data over `share` of the LUN's 64 KiB granules, chosen at random, through
    iSCSI (8 in flight); the bytes written."""
    granules = random.Random(18).sample(range(size // GRANULE), int(size // GRANULE * share))

    async def go() -> None:
        ini = await Initiator.connect("127.0.0.1", port)
        await ini.login(IQN, initiator_name="iqn.2026-12.io.pytarget.bench:backup")
        await ini.clear_unit_attentions(0)
        data = os.urandom(GRANULE)
        queue = list(granules)

        async def worker() -> None:
            while queue:
                g = queue.pop()
                (await ini.write(0, g * GRANULE // 512, data)).check()

        await asyncio.gather(*(worker() for _ in range(8)))
        await ini.logout()
        await ini.close()

    asyncio.run(go())
    return len(granules) * GRANULE


def dirty_extents(target: BackupTarget, snapshot: str, checkpoint: str) -> list[tuple[int, int]]:
    """What changed from `checkpoint` to `snapshot`, as the snapshot's export serves it."""
    done = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                           target.nbd_opts(snapshot, **{"x-dirty-bitmap":
                                                        f"qemu:dirty-bitmap:{checkpoint}"})],
                          capture_output=True, text=True, timeout=300, check=True)
    return [(e["start"], e["length"]) for e in json.loads(done.stdout) if not e["data"]]


def backup_rows(target: BackupTarget, size: int, workdir: Path) -> list[str]:
    """docs/guides/backup.md's flow with snapshots: a full backup from snapshot bench-1, 5 %
    changed, snapshot bench-2 and the incremental from its export; one row each."""
    full, incremental = workdir / "full.raw", workdir / "incr.raw"
    for image in (full, incremental):
        with open(image, "wb") as f:
            f.truncate(size)
    target.cli("snapshot", "create", "bench-1", "0")
    target.cli("snapshot", "expose", "0@bench-1", "--nbd")
    reader = NbdReader("127.0.0.1", target.nbd_port, f"{IQN}/0@bench-1")
    try:
        started = time.perf_counter()
        full_bytes = reader.copy([(0, size)], full)
        full_s = time.perf_counter() - started
    finally:
        reader.close()
    written = change_granules(target.port, size, CHANGED)
    target.cli("snapshot", "create", "bench-2", "0")
    target.cli("snapshot", "expose", "0@bench-2", "--nbd")
    reader = NbdReader("127.0.0.1", target.nbd_port, f"{IQN}/0@bench-2")
    try:
        started = time.perf_counter()
        extents = dirty_extents(target, "bench-2", "bench-1")
        map_s = time.perf_counter() - started
        incr_bytes = reader.copy(extents, incremental)
        incr_s = time.perf_counter() - started
    finally:
        reader.close()
    for name in ("bench-1", "bench-2"):
        target.cli("snapshot", "unexpose", f"0@{name}", "--nbd")
        target.cli("snapshot", "delete", f"0@{name}")
        target.cli("checkpoint", "delete", "0", name)
    if incr_bytes < written:
        raise RuntimeError(f"the incremental read {incr_bytes} bytes of the {written} changed")
    return [f"| full, from snapshot bench-1 | {full_bytes / MiB:,.0f} MiB | {full_s:.2f} s | "
            f"{full_bytes / MiB / full_s:,.0f} MiB/s |",
            f"| incremental, from snapshot bench-2 with checkpoint bench-1, {CHANGED:.0%} "
            f"changed ({written / MiB:.1f} MiB in {written // GRANULE} granules) | "
            f"{incr_bytes / MiB:,.1f} MiB in {len(extents)} extents | {incr_s:.2f} s, of "
            f"which `qemu-img map` {map_s:.2f} s | {incr_bytes / full_bytes:.1%} of the bytes, "
            f"{incr_s / full_s:.1%} of the time |"]


def checkpoint_iops(target: BackupTarget, runs: int, count: int) -> dict[str, list[Sample]]:
    """4 KiB scattered writes at QD32 over iSCSI, without and with one checkpoint, alternating
    run by run after a warm-up."""
    url = f"iscsi://127.0.0.1:{target.port}/{IQN}/0"

    def cpu() -> Times:
        return process_times(target.proc.pid)

    qemu_bench(url, 4096, 32, True, count // 4, cpu)
    out: dict[str, list[Sample]] = {"none": [], "one": []}
    for _ in range(runs):
        for label in ("none", "one"):
            if label == "one":
                target.cli("checkpoint", "create", "0", "bench-iops")
            out[label].append(qemu_bench(url, 4096, 32, True, count, cpu))
            if label == "one":
                target.cli("checkpoint", "delete", "0", "bench-iops")
    return out


def backup_section(base: Path, quick: bool, runs: int, code: Path) -> list[str]:
    """The section's Markdown lines; its live target runs `code` (bench_code.pytarget_code)."""
    title = "## Snapshots and backups"
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    lines = [title, "", "Snapshot creation: the time writes are held while a snapshot of a "
             "1 GiB LUN with 256 MiB of data (1 MiB runs spread over it) is taken, "
             "tools/snapshot_cost.py's measurement, median and range of "
             f"{runs + 2} runs.", "",
             "| medium | LUN | how | held median ms | min | max | runs |",
             "|---|---|---|---|---|---|---|"]
    try:
        lines += snapshot_rows(base, runs + 2)
    except Exception as exc:  # keep the other measurements
        lines.append(f"| failed: {exc!r} | | | | | | |")
    print("\n".join(lines[-2:]), flush=True)
    missing = cbt_missing()
    if missing:
        return lines + ["", f"Incremental backup and write IOPS with a checkpoint: not "
                        f"measured: {missing}.", ""]
    size = 256 * MiB if quick else GiB
    directory = base / "backup"
    directory.mkdir()
    image = directory / "lun.img"
    with open(image, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    target = BackupTarget(directory, image, code)
    try:
        lines += ["", f"Backups of a {size // MiB:,} MiB LUN full of data through its NBD export "
                  f"(one connection, {READ_CHUNK // MiB} MiB reads, {IN_FLIGHT} in flight, into "
                  "a sparse file on the same filesystem), as docs/guides/backup.md does it: "
                  "the full one from snapshot bench-1's export, then, after "
                  f"{CHANGED:.0%} of the LUN's 64 KiB granules were rewritten through iSCSI, "
                  "the incremental one from snapshot bench-2's export, reading only the "
                  "extents `qemu-img map` reports dirty there for checkpoint bench-1 (the one "
                  "snapshot bench-1 started).", "",
                  "| backup | read | time | |", "|---|---|---|---|"]
        try:
            lines += backup_rows(target, size, directory)
        except Exception as exc:  # keep the other measurements
            lines.append(f"| failed: {exc!r} | | | |")
        print("\n".join(lines[-2:]), flush=True)
        count = 5000 if quick else 20000
        try:
            samples = checkpoint_iops(target, runs, count)
            rates = {k: [s.rate for s in v] for k, v in samples.items()}
            cpu = {k: statistics.median(s.cpu_us_per_command for s in v)
                   for k, v in samples.items()}
            base_rate = statistics.median(rates["none"])
            lines += ["", f"4 KiB scattered writes at QD32 over iSCSI (`qemu-img bench`, "
                      f"{count:,} writes a run), without and with a checkpoint, alternating; "
                      f"median and range of {runs} runs.", "",
                      "| checkpoints | IOPS | vs none | target CPU µs per write |",
                      "|---|---|---|---|"]
            for label, name in (("none", "0"), ("one", "1")):
                r = rates[label]
                lines.append(f"| {name} | {statistics.median(r):,.0f} ({min(r):,.0f}-"
                             f"{max(r):,.0f}) | {statistics.median(r) / base_rate:.2f} | "
                             f"{cpu[label]:.1f} |")
        except Exception as exc:  # keep the other measurements
            lines.append(f"Write IOPS with a checkpoint: failed: {exc!r}")
        print("\n".join(lines[-3:]), flush=True)
    finally:
        target.stop()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    return lines + ["", f"Load average (1, 5, 15 min) {', '.join(load_before)} before this "
                    f"section and {', '.join(load_after)} after it: the machine is shared.", ""]
