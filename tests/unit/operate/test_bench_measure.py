"""tools/bench_measure.py's CPU accounting: a target's time is utime + stime of its process
tree, and the kernel's part (stime) is kept apart, so that `tools/bench` can show where each
target's CPU per command goes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ...conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from bench_measure import Sample, Times, process_times  # noqa: E402


def _reaped(argv: list[str]) -> Times:
    """What running `argv` to its end adds to this process's accounting (its children, once
    reaped, count in cutime and cstime)."""
    before = process_times(os.getpid())
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process_times(os.getpid()) - before


@pytest.mark.skipif(shutil.which("dd") is None, reason="needs dd")
def test_a_child_in_the_kernel_counts_as_system_time() -> None:
    spent = _reaped(["dd", "if=/dev/zero", "of=/dev/null", "bs=64k", "count=40000"])
    assert spent.cpu > 0
    assert spent.system > spent.cpu / 2
    assert spent.system <= spent.cpu + 1e-9  # both are whole clock ticks, as floats


def test_a_child_in_user_space_counts_little_system_time() -> None:
    spent = _reaped([sys.executable, "-S", "-c", "x = 0\nfor i in range(4_000_000): x += i"])
    assert spent.cpu > 0
    assert spent.system < spent.cpu / 2


def test_per_command_figures_split_the_same_interval() -> None:
    times = Times(cpu=0.050, on_cpu=0.045, waiting=0.005, system=0.020) - Times(0, 0, 0, 0)
    sample = Sample(rate=20_000.0, seconds=0.05, commands=1_000.0, times=times, observed=0.05)
    assert sample.cpu_us_per_command == pytest.approx(50.0)
    assert sample.system_us_per_command == pytest.approx(20.0)
    assert sample.cores == pytest.approx(1.0)
    assert sample.waited == pytest.approx(0.1)
