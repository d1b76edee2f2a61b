"""Runs of C initiators timed by the initiators themselves, with the target's CPU time over
exactly the interval they time.

`qemu-img bench` prints "Sending ..." right before it starts its clock and "Run completed in
X seconds." right after it stops it; `iscsi-perf` prints "will run for N seconds." right
before its clock starts and its final "iops average" when the run time is up. Both write to
a pseudo-terminal here, so each line arrives as it is printed (a pipe would hold it in
stdio's buffer), and the target's CPU time (utime + stime of its process and descendants,
every thread counted) is read from /proc when the first line arrives and again when the
last one does. Start-up, login, READ CAPACITY, the final flush and logout fall outside both
the initiator's time and the CPU interval. The scheduler's statistics of the target's main
thread (/proc/PID/schedstat) tell how long it waited for a CPU: the sign of a machine busy
with other work.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STRIDE_BLOCKS = 104729  # a prime: a stride that visits the LUN in scattered order
STEP_MAX = (1 << 31) - 1  # qemu-img bench takes a step of at most INT_MAX bytes


def stride_blocks(size: int) -> int:
    """The scattered writes' stride in commands of `size` bytes: STRIDE_BLOCKS where the step
    fits qemu-img bench's limit (4 KiB), else STRIDE_BLOCKS modulo the commands that fit, an
    odd number as STRIDE_BLOCKS is (64 KiB: 6,425; 1 MiB: 281)."""
    return STRIDE_BLOCKS % (STEP_MAX // size + 1)

QEMU_START = re.compile(r"Sending \d+ (?:read|write) requests")
QEMU_END = re.compile(r"Run completed in ([0-9.]+) seconds")
PERF_START = re.compile(r"will run for \d+ seconds\.")
PERF_END = re.compile(r"iops average (\d+) \(\d+ MB/s\) {4}")  # the final line only


class MeasureError(RuntimeError):
    pass


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def _stat_ticks(pid: int, reaped: bool) -> tuple[int, int]:
    """(utime + stime, stime) of all threads of a process, with its reaped children's."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    user, system = int(fields[11]), int(fields[12])
    if reaped:
        user += int(fields[13])  # cutime, cstime: children it has waited for
        system += int(fields[14])
    return user + system, system


def _schedstat(pid: int) -> tuple[int, int]:
    """Nanoseconds the process's main thread (the event loop, in both targets) spent on a
    CPU and waiting for one (runnable, not running). Worker threads are left out: they queue
    behind each other by design."""
    try:
        fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    except OSError:
        return 0, 0
    return int(fields[0]), int(fields[1])


@dataclass(frozen=True)
class Times:
    """CPU accounting of a target's process tree at one moment, or between two."""

    cpu: float  # utime + stime, seconds: what the target cost
    on_cpu: float  # main threads' time on a CPU, seconds (the scheduler's clock)
    waiting: float  # main threads' time runnable but waiting for a CPU, seconds
    system: float  # stime, seconds: the part of `cpu` spent in the kernel

    def __sub__(self, other: Times) -> Times:
        return Times(self.cpu - other.cpu, self.on_cpu - other.on_cpu,
                     self.waiting - other.waiting, self.system - other.system)


ZERO = Times(0.0, 0.0, 0.0, 0.0)


def process_times(pid: int) -> Times:
    """utime + stime of a process, its live descendants and the children it has reaped, and
    how long their main threads ran and waited for a CPU."""
    ticks, system = _stat_ticks(pid, True)
    running, waiting = _schedstat(pid)
    pending = _children(pid)
    while pending:
        child = pending.pop()
        t, k = _stat_ticks(child, False)
        ticks += t
        system += k
        r, w = _schedstat(child)
        running += r
        waiting += w
        pending += _children(child)
    return Times(ticks / CLOCK_TICKS, running / 1e9, waiting / 1e9, system / CLOCK_TICKS)


@dataclass(frozen=True)
class Sample:
    """One run of one cell on one target, as the initiator measured it."""

    rate: float  # commands per second, the initiator's own figure
    seconds: float  # the initiator's timed interval
    commands: float  # commands completed in that interval
    times: Times  # the target's CPU accounting over the same interval
    observed: float  # the same interval on this process's clock, between the two lines

    @property
    def cpu_seconds(self) -> float:
        return self.times.cpu

    @property
    def cpu_us_per_command(self) -> float:
        return self.cpu_seconds * 1e6 / self.commands if self.commands else float("nan")

    @property
    def system_us_per_command(self) -> float:
        """The kernel's part of `cpu_us_per_command` (the target's stime)."""
        return self.times.system * 1e6 / self.commands if self.commands else float("nan")

    @property
    def cores(self) -> float:
        return self.cpu_seconds / self.observed if self.observed else float("nan")

    @property
    def waited(self) -> float:
        """Share of the time the target's main threads were runnable that they spent
        waiting for a CPU: low when the initiator, the target and the kernel have the CPUs
        to themselves; high when other work takes them."""
        runnable = self.times.on_cpu + self.times.waiting
        return self.times.waiting / runnable if runnable > 0 else 0.0


@dataclass
class _Timed:
    argv: list[str]
    proc: subprocess.Popen[bytes]
    fd: int
    start: re.Pattern[str]
    end: re.Pattern[str]
    text: str = ""
    t0: float | None = None
    t1: float | None = None
    end_match: re.Match[str] | None = None


@dataclass(frozen=True)
class Timed:
    output: str
    t0: float
    t1: float
    end: re.Match[str]


def run_timed(commands: Sequence[tuple[Sequence[str], re.Pattern[str], re.Pattern[str]]],
              cpu: Callable[[], Times], timeout: float) -> tuple[list[Timed], Times, float]:
    """Run initiators side by side, each on its own pseudo-terminal. Returns each one's
    output and the moments its start and end lines arrived, and the target's CPU accounting and
    wall seconds from the first start line to the last end line."""
    runs: list[_Timed] = []
    cpu0 = cpu1 = ZERO
    try:
        for argv, start, end in commands:
            master, slave = pty.openpty()
            try:
                proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=slave,
                                        stderr=slave, start_new_session=True)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            runs.append(_Timed(list(argv), proc, master, start, end))
        deadline = time.monotonic() + timeout
        open_fds = {r.fd: r for r in runs}
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeasureError(f"{runs[0].argv[0]} did not finish in {timeout:.0f} s")
            ready, _, _ = select.select(list(open_fds), [], [], left)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the initiator closed the terminal
                    data = b""
                now = time.perf_counter()
                run = open_fds[fd]
                if not data:
                    del open_fds[fd]
                    continue
                run.text += data.decode(errors="replace")
                if run.t0 is None and run.start.search(run.text):
                    if all(r.t0 is None for r in runs):
                        cpu0 = cpu()
                    run.t0 = now
                if run.t0 is not None and run.t1 is None:
                    run.end_match = run.end.search(run.text)
                    if run.end_match:
                        if all(r.t1 is not None or r is run for r in runs):
                            cpu1 = cpu()
                        run.t1 = now
        for run in runs:
            run.proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for run in runs:
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
            os.close(run.fd)
    for run in runs:
        if run.t0 is None or run.t1 is None or run.end_match is None:
            raise MeasureError(f"{' '.join(run.argv)}: no timed run in its output "
                               f"(exit {run.proc.returncode}): {run.text[-400:]!r}")
    done = [Timed(r.text, r.t0, r.t1, r.end_match)  # type: ignore[arg-type]
            for r in runs]
    wall = max(t.t1 for t in done) - min(t.t0 for t in done)
    return done, cpu1 - cpu0, wall


def iscsi_perf_argv(url: str, size: int, depth: int, random: bool, seconds: int) -> list[str]:
    argv = ["iscsi-perf", "-t", str(seconds), "-m", str(depth), "-b", str(size // 512)]
    return argv + (["-r"] if random else []) + [url]


def qemu_bench_argv(url: str, size: int, depth: int, scattered: bool, count: int,
                    offset: int = 0) -> list[str]:
    argv = ["qemu-img", "bench", "-f", "raw", "-w", "-s", str(size), "-d", str(depth),
            "-c", str(count)]
    if offset:
        argv += ["-o", str(offset)]
    if scattered:
        argv += ["-S", str(stride_blocks(size) * size)]
    return argv + [url]


def iscsi_perf(url: str, size: int, depth: int, random: bool, seconds: int,
               cpu: Callable[[], Times]) -> Sample:
    """READs for `seconds` by libiscsi's iscsi-perf: its own average rate; the commands are
    that rate over the interval between its start and final lines."""
    argv = iscsi_perf_argv(url, size, depth, random, seconds)
    (run,), times, wall = run_timed([(argv, PERF_START, PERF_END)], cpu, seconds + 60)
    rate = float(run.end.group(1))
    return Sample(rate, wall, rate * wall, times, wall)


def qemu_bench(url: str, size: int, depth: int, scattered: bool, count: int,
               cpu: Callable[[], Times]) -> Sample:
    """`count` WRITEs by QEMU's iSCSI driver: the time qemu-img bench reports for them."""
    argv = qemu_bench_argv(url, size, depth, scattered, count)
    (run,), times, wall = run_timed([(argv, QEMU_START, QEMU_END)], cpu, 900)
    seconds = float(run.end.group(1))
    return Sample(count / seconds, seconds, float(count), times, wall)
