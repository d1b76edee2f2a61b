"""Running guest scripts under the Linux-initiator harness (../shared/interop/linux-initiator).

The harness boots a throw-away Debian VM whose kernel initiator (open-iscsi) reaches only the
target ports it is given, runs a bash script there as root and exits with the script's status
(124: timeout, 125: infrastructure failure).  `run_guest` starts it against a `LiveTarget`,
keeps everything it returns in an output directory and hands back a `GuestRun` whose
`report()` is short enough for an assertion message: the script's exit status and stdout
tail, the guest kernel log tail and the target log tail.

Host <-> guest rendezvous: the harness shares a per-run job directory (made under $TMPDIR)
with the guest over virtio-9p; the guest's $OUT_DIR is its `out/` and $FILES_DIR its
`files/`.  A guest script that calls common.sh's `host_sync NAME` (with HOST_SYNC=1) creates
`out/mark.NAME` and waits for `files/ack.NAME`.  `run_guest(..., marks={NAME: callback})`
points the harness's TMPDIR at a private directory, watches it for the mark, calls the
callback (e.g. to measure a backing file while the guest is paused) and then writes the ack.
"""

from __future__ import annotations

import functools
import os
import re
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
    marks: dict[str, float] = field(default_factory=dict)  # NAME -> seconds into the run
    mark_errors: list[str] = field(default_factory=list)

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
    """Answers the guest's `host_sync NAME` while the harness runs (see the module doc)."""

    def __init__(self, tmpdir: Path, marks: Mapping[str, Callable[[], None]]) -> None:
        super().__init__(daemon=True)
        self.tmpdir = tmpdir
        self.marks = dict(marks)
        self.seen: dict[str, float] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(0.1) and len(self.seen) < len(self.marks):
            for job in self.tmpdir.glob("linux-initiator.*"):
                for name, callback in self.marks.items():
                    if name in self.seen or not (job / "out" / f"mark.{name}").exists():
                        continue
                    self.seen[name] = time.monotonic() - self.start_time
                    try:
                        callback()
                    except Exception as exc:  # reported by the test, the guest goes on
                        self.errors.append(f"mark {name}: {exc!r}")
                    (job / "files" / f"ack.{name}").write_text("ok\n")


def run_guest(target: LiveTarget, script: str, outdir: Path, *, timeout: int = 300,
              env: Mapping[str, str] | None = None, files: Sequence[Path] = (),
              marks: Mapping[str, Callable[[], None]] | None = None,
              extra_args: Sequence[str] = ()) -> GuestRun:
    """Run tests/interop/guest/SCRIPT in the guest against `target`; never raises on the
    script's failure (check `.ok`).  `timeout` is the harness's whole-VM limit (-T)."""
    outdir.mkdir(parents=True, exist_ok=True)
    tmpdir = outdir.parent / f"{outdir.name}.tmp"
    tmpdir.mkdir(exist_ok=True)
    cmd = [str(HARNESS), "run", "-p", str(target.port), "-t", target.iqn, "-o", str(outdir),
           "-T", str(timeout), "-f", str(COMMON)]
    for path in files:
        cmd += ["-f", str(path)]
    for key, value in {**(env or {}), **({"HOST_SYNC": "1"} if marks else {})}.items():
        cmd += ["-e", f"{key}={value}"]
    cmd += [*extra_args, str(GUEST_DIR / script)]
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
    return GuestRun(script, rc, wall, outdir, err or "", target.log,
                    dict(watcher.seen) if watcher else {}, list(watcher.errors) if watcher else [])
