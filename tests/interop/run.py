"""Running guest scripts under the Linux-initiator harness (../shared/interop/linux-initiator).

The harness boots a throw-away Debian VM whose kernel initiator (open-iscsi) reaches only the
target ports it is given, runs a bash script there as root and exits with the script's status
(124: timeout, 125: infrastructure failure).  A boot costs 20 to 60 s under TCG, so
`run_guests` runs several scripts ("parts", `GuestPart`) in ONE boot: guest/parts.sh runs each
in turn with its own environment (TARGET_IQN, the portals of its own targets), its own $OUT_DIR
(a subdirectory named after the part), its own time limit and, when it asks for it, multipathd;
between parts it puts the guest back as it booted (see parts.sh), and it goes on after a part
fails.  `run_guest` runs one script on its own, as the harness does.  Both keep everything the
guest returns in an output directory and hand back a `GuestRun` per script whose `report()` is
short enough for an assertion message: the script's exit status and stdout tail, the guest
kernel log tail (of that part only) and the target log tail.

Host <-> guest rendezvous: the harness shares a per-run job directory (made under $TMPDIR)
with the guest over virtio-9p; the guest's $OUT_DIR is its `out/` (a part's: `out/PART/`).  A
guest script that calls common.sh's `host_sync NAME` (with HOST_SYNC=1) creates
`$OUT_DIR/mark.NAME` and waits for `$OUT_DIR/ack.NAME`.  Given `marks={NAME: callback}`, the
runner points the harness's TMPDIR at a private directory, watches it for the mark, calls the
callback (e.g. to measure a backing file while the guest is paused) and then writes the ack.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..conftest import REPO, LiveTarget

HARNESS = REPO.parent / "shared" / "interop" / "linux-initiator"
GUEST_DIR = Path(__file__).resolve().parent / "guest"
COMMON = GUEST_DIR / "common.sh"

EXIT_TIMEOUT = 124
EXIT_INFRA = 125


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why the harness cannot run here (a pytest skip reason), or None when it can."""
    if not HARNESS.is_file():
        return f"Linux-initiator harness not found at {HARNESS}"
    if not os.access(HARNESS, os.X_OK):
        return f"{HARNESS} is not executable"
    try:
        proc = subprocess.run([str(HARNESS), "info"], capture_output=True, text=True,
                              timeout=180, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`linux-initiator info` failed: {exc}"
    info = proc.stdout
    if proc.returncode != 0 or "image:" not in info:
        return (f"`linux-initiator info` failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-300:]}")
    deps = re.search(r"^deps:\s*(.*)$", info, re.M)
    if deps and deps.group(1).strip() != "ok":
        return f"linux-initiator: missing host tools: {deps.group(1).strip()}"
    image = re.search(r"^image:\s*(.*)$", info, re.M)
    if image and "(built)" not in image.group(1):
        # `run` builds a missing image itself, which needs root and a Debian mirror
        if os.geteuid() != 0:
            return "linux-initiator: no guest image built and building one needs root"
        if re.search(r"^mirror:.*NOT found", info, re.M):
            return "linux-initiator: no guest image built and no Debian mirror to build one"
    return None


def tail(text: str, lines: int) -> str:
    parts = text.rstrip("\n").splitlines()
    cut = parts[-lines:]
    head = f"[... {len(parts) - len(cut)} earlier lines ...]\n" if len(parts) > len(cut) else ""
    return head + "\n".join(cut)


@dataclass
class GuestRun:
    script: str
    returncode: int
    wall: float
    outdir: Path
    harness_stderr: str
    target_log: Path | None = None
    marks: dict[str, float] = field(default_factory=dict)  # NAME -> seconds into the boot
    mark_errors: list[str] = field(default_factory=list)
    boot: str = ""  # for a part of a shared boot: that boot's outcome and its other parts

    def text(self, name: str) -> str:
        path = self.outdir / name
        return path.read_text(errors="replace") if path.is_file() else ""

    @property
    def stdout(self) -> str:
        return self.text("stdout")

    @property
    def dmesg(self) -> str:
        return self.text("dmesg")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith(prefix)]

    def verdict(self) -> str:
        meaning = {0: "passed", 1: "checks failed", EXIT_TIMEOUT: "TIMEOUT",
                   EXIT_INFRA: "harness/VM failure"}.get(self.returncode, "failed")
        first = self.lines("FIRST FAILURE:")
        return (f"{self.script}: exit status {self.returncode} ({meaning}) after {self.wall:.0f}s"
                + (f"; {first[0]}" if first else ""))

    def report(self, stdout_lines: int = 60, dmesg_lines: int = 30) -> str:
        parts = [self.verdict(), f"outputs kept in {self.outdir}"]
        if self.boot:
            parts.append(self.boot)
        failures = self.lines("FAIL:")
        if failures:
            parts.append("--- failures ---\n" + "\n".join(failures[:20]))
        parts.append(f"--- guest stdout (tail) ---\n{tail(self.stdout, stdout_lines)}")
        stderr = self.text("stderr").strip()
        if stderr:
            parts.append(f"--- guest stderr (tail) ---\n{tail(stderr, 15)}")
        parts.append(f"--- guest dmesg (tail) ---\n{tail(self.dmesg, dmesg_lines)}")
        if self.returncode in (EXIT_TIMEOUT, EXIT_INFRA) or not self.stdout:
            parts.append(f"--- harness stderr (tail) ---\n{tail(self.harness_stderr, 30)}")
        if self.target_log is not None and self.target_log.is_file():
            log = self.target_log.read_text(errors="replace")
            parts.append(f"--- target log (tail) ---\n{tail(log, 20)}")
        return "\n".join(parts)


class _MarkWatcher(threading.Thread):
    """Answers the guest's `host_sync NAME` while the harness runs (see the module doc).
    `marks` maps (directory below the job's out/, "" for out/ itself; NAME) to the callback."""

    def __init__(self, tmpdir: Path, marks: Mapping[tuple[str, str], Callable[[], None]]
                 ) -> None:
        super().__init__(daemon=True)
        self.tmpdir = tmpdir
        self.marks = dict(marks)
        self.seen: dict[tuple[str, str], float] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self.stop = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(0.1) and len(self.seen) < len(self.marks):
            for job in self.tmpdir.glob("linux-initiator.*"):
                for (where, name), callback in self.marks.items():
                    out = job / "out" / where
                    if (where, name) in self.seen or not (out / f"mark.{name}").exists():
                        continue
                    self.seen[where, name] = time.monotonic() - self.start_time
                    try:
                        callback()
                    except Exception as exc:  # reported by the test, the guest goes on
                        self.errors[where, name] = f"mark {name}: {exc!r}"
                    (out / f"ack.{name}").write_text("ok\n")

    def of(self, where: str) -> tuple[dict[str, float], list[str]]:
        """The marks seen in one directory (NAME -> seconds) and its callbacks' errors."""
        return ({name: at for (w, name), at in self.seen.items() if w == where},
                [error for (w, _), error in self.errors.items() if w == where])


@dataclass
class _Harness:
    returncode: int
    wall: float
    stderr: str
    watcher: _MarkWatcher | None


def _harness(cmd: list[str], outdir: Path, timeout: int,
             marks: Mapping[tuple[str, str], Callable[[], None]]) -> _Harness:
    """Run the harness (`cmd` without -o and -T) with its job directory in a private TMPDIR
    beside `outdir`, answering `marks`; never raises on the guest's failure."""
    outdir.mkdir(parents=True, exist_ok=True)
    tmpdir = outdir.parent / f"{outdir.name}.tmp"
    tmpdir.mkdir(exist_ok=True)
    cmd = [cmd[0], "run", "-o", str(outdir), "-T", str(timeout), *cmd[1:]]
    watcher = _MarkWatcher(tmpdir, marks) if marks else None
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmpdir)})
    if watcher:
        watcher.start()
    try:
        _, err = proc.communicate(timeout=timeout + 60)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        # the harness kills its VM on SIGTERM; its process group is ours to end after that
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        err = (err or "") + "\n[pytest: harness exceeded its own timeout and was stopped]"
        rc = EXIT_TIMEOUT
    finally:
        if watcher:
            watcher.stop.set()
            watcher.join(5)
    wall = time.monotonic() - start
    (outdir / "harness.stderr").write_text(err or "")
    shutil.rmtree(tmpdir, ignore_errors=True)
    return _Harness(rc, wall, err or "", watcher)


def run_guest(target: LiveTarget, script: str, outdir: Path, *, timeout: int = 300,
              env: Mapping[str, str] | None = None, files: Sequence[Path] = (),
              marks: Mapping[str, Callable[[], None]] | None = None,
              extra_args: Sequence[str] = ()) -> GuestRun:
    """Run tests/interop/guest/SCRIPT alone in a boot against `target`; never raises on the
    script's failure (check `.ok`).  `timeout` is the harness's whole-VM limit (-T)."""
    cmd = [str(HARNESS), "-p", str(target.port), "-t", target.iqn, "-f", str(COMMON)]
    for path in files:
        cmd += ["-f", str(path)]
    for key, value in {**(env or {}), **({"HOST_SYNC": "1"} if marks else {})}.items():
        cmd += ["-e", f"{key}={value}"]
    cmd += [*extra_args, str(GUEST_DIR / script)]
    done = _harness(cmd, outdir, timeout, {("", name): cb for name, cb in (marks or {}).items()})
    seen, errors = done.watcher.of("") if done.watcher else ({}, [])
    return GuestRun(script, done.returncode, done.wall, outdir, done.stderr, target.log,
                    seen, errors)


# ------------------------------------------------------------------------ shared boots
PARTS = GUEST_DIR / "parts.sh"
BOOT_SECONDS = 180      # the boot itself and the power-off, on a loaded TCG machine
RESET_SECONDS = 60      # parts.sh putting the guest back between two parts
PART_NAME = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass
class GuestPart:
    """One script of a shared boot, and what it runs against."""

    name: str                    # unique in the boot: its $OUT_DIR subdirectory
    script: str                  # a file in tests/interop/guest/
    ports: Sequence[int]         # its target's ports: the first is $TARGET_PORTAL
    iqn: str                     # $TARGET_IQN
    timeout: int                 # the script's own limit, in seconds
    env: Mapping[str, str] = field(default_factory=dict)
    files: Sequence[Path] = ()   # copied into $FILES_DIR (shared by every part of the boot)
    marks: Mapping[str, Callable[[], None]] = field(default_factory=dict)
    multipath: bool = False      # multipathd runs while this part does
    target_log: Path | None = None


def _part_env(part: GuestPart, index: dict[int, int]) -> dict[str, str]:
    """The harness's portal variables narrowed to the part's own ports (the n-th port of the
    boot is 10.0.2.(100+n):3260 in the guest), its IQN and its own environment."""
    guest = [f"10.0.2.{100 + index[port]}:3260" for port in part.ports]
    host = [f"127.0.0.1:{port}" for port in part.ports]
    return {"TARGET_IQN": part.iqn, "TARGET_PORTAL": guest[0],
            "TARGET_PORTALS": " ".join(guest), "TARGET_HOST_PORTAL": host[0],
            "TARGET_HOST_PORTALS": " ".join(host),
            **({"HOST_SYNC": "1"} if part.marks else {}), **part.env}


def run_guests(parts: Sequence[GuestPart], outdir: Path, *,
               initiator_iqn: str | None = None) -> dict[str, GuestRun]:
    """Run the parts in their order in ONE boot (guest/parts.sh); a `GuestRun` per part name,
    whose outputs are in outdir/NAME.  Never raises on a part's failure."""
    names = [part.name for part in parts]
    if len(set(names)) != len(names) or not all(PART_NAME.fullmatch(n) for n in names):
        raise ValueError(f"part names must be unique words: {names}")
    ports: list[int] = []
    for part in parts:
        ports += [port for port in part.ports if port not in ports]
    index = {port: n for n, port in enumerate(ports)}
    plan = outdir.parent / f"{outdir.name}.plan"
    shutil.rmtree(plan, ignore_errors=True)
    plan.mkdir(parents=True)
    lines = []
    for part in parts:
        env = _part_env(part, index)
        (plan / f"{part.name}.env").write_text(
            "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items()))
        lines.append(f"{part.name} {part.script} {part.timeout} {int(part.multipath)}\n")
    (plan / "parts.list").write_text("".join(lines))
    cmd = [str(HARNESS), "-t", parts[0].iqn, "-f", str(COMMON)]
    for path in sorted(plan.iterdir()):
        cmd += ["-f", str(path)]
    for port in ports:
        cmd += ["-p", str(port)]
    if initiator_iqn:
        cmd += ["--initiator-iqn", initiator_iqn]
    files = {GUEST_DIR / part.script for part in parts}
    files |= {path for part in parts for path in part.files}
    for path in sorted(files):
        cmd += ["-f", str(path)]
    cmd.append(str(PARTS))
    timeout = BOOT_SECONDS + sum(part.timeout + RESET_SECONDS for part in parts)
    marks = {(part.name, name): cb for part in parts for name, cb in part.marks.items()}
    done = _harness(cmd, outdir, timeout, marks)
    boot = (f"shared boot: {', '.join(names)}; exit status {done.returncode} after "
            f"{done.wall:.0f}s; its own outputs in {outdir}")
    runs = {}
    for part in parts:
        where = outdir / part.name
        rc, wall, note = _part_outcome(where)
        if rc is None:  # the part never ended: the boot failed, or the guest never got to it
            rc = done.returncode if done.returncode in (EXIT_TIMEOUT, EXIT_INFRA) else EXIT_INFRA
            note = f"\n{part.name} did not finish: {note or 'see the shared boot outputs'}"
        seen, errors = done.watcher.of(part.name) if done.watcher else ({}, [])
        runs[part.name] = GuestRun(part.script, rc, wall or done.wall, where, done.stderr,
                                   part.target_log, seen, errors, boot + note)
    return runs


def _part_outcome(where: Path) -> tuple[int | None, float | None, str]:
    """What parts.sh recorded for a part: exit status, seconds, and why it did not run."""
    def read(name: str) -> str:
        path = where / name
        return path.read_text().strip() if path.is_file() else ""
    rc, wall = read("rc"), read("wall")
    return (int(rc) if rc.isdigit() else None, float(wall) if wall else None, read("skipped"))
