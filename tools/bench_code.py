"""Which pytarget the benchmarks' targets run, and the environment that makes a child process
run it: the data path compiled as `pip install .` compiles it (tools/build-compiled, built
afresh from this checkout), or the sources as they are (`--pure`). tools/bench chooses once
and hands the choice to the sections it calls (tools/bench_backup.py, tools/bench_scaleout.py,
tools/failover_measure.py), so every target of one run runs the same code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class BuildError(RuntimeError):
    """tools/build-compiled failed; the message is its output."""


def pytarget_code(pure: bool) -> Path:
    """The directory that goes first on a target's PYTHONPATH: this checkout's sources when
    `pure`, else its compiled build (BuildError when the data path did not compile)."""
    if pure:
        return REPO
    built = subprocess.run([str(REPO / "tools" / "build-compiled")], capture_output=True,
                           text=True)
    if built.returncode != 0:
        raise BuildError(built.stderr)
    return Path(built.stdout.strip().splitlines()[-1])


def add_pure_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pure", action="store_true",
                        help="run pytarget's sources as they are, not the data path compiled "
                        "as `pip install .` compiles it (tools/build-compiled)")


def chosen_code(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """`pytarget_code` for the parsed `--pure`; a build that fails is a usage error naming
    --pure, after the compiler's output."""
    try:
        return pytarget_code(args.pure)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        parser.error("the data path did not compile (tools/build-compiled); --pure runs "
                     "the sources")


def child_env(code: Path) -> dict[str, str]:
    """This process's environment with `code` first on PYTHONPATH."""
    pythonpath = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath}
