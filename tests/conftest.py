"""Shared fixtures: configurations on disk and live pytarget processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from .ceph_cluster import CephCluster, missing, running

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import bench_code  # noqa: E402  (tools/bench_code.py: the child environment)

# The code of the targets and CLIs the tests start: this checkout's sources, or, in tools/test's
# full run, the same sources with the data path compiled by setup.py (PYTARGET_CODE).
CODE = Path(os.environ.get("PYTARGET_CODE") or REPO)
TARGET_IQN = "iqn.2026-11.io.pytarget:test"
INITIATOR1 = "iqn.2026-11.io.pytarget.test:initiator1"
INITIATOR2 = "iqn.2026-11.io.pytarget.test:initiator2"
GATEWAYS = ("gw1", "gw2")

T = TypeVar("T")

# End-to-end tests that run the target inside the test process (`Server` on an ephemeral
# loopback port, the project's initiator): no child process, libiscsi or guest, so they belong
# to the fast lane (tools/test --fast) with the unit tests.
IN_PROCESS = ("e2e/test_lent_reads.py", "e2e/test_polling.py", "e2e/test_gateways.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(REPO / "tests"):
            continue
        where = item.path.relative_to(REPO / "tests").as_posix()
        if where.startswith("unit/"):
            item.add_marker(pytest.mark.unit)
        elif where in IN_PROCESS:
            item.add_marker(pytest.mark.inprocess)
        # With pytest-xdist (tools/test runs two workers), the guest tests stay in one worker,
        # so two TCG guests never compete for the two cores, and the other tests of the
        # session's Ceph cluster in one worker, so it starts once more at most.
        if item.get_closest_marker("interop") is not None or where.startswith("interop/"):
            item.add_marker(pytest.mark.xdist_group("guest"))
        elif "ceph_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ceph"))


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends the run as Ctrl-C does, so fixtures still stop the daemons they started."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run a coroutine on a fresh event loop; a test that hangs fails after `timeout`."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def until(predicate: Any, what: str) -> None:
    """Wait (up to 10 s) for a condition on the in-process target's state."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def write_config(directory: Path, luns: list[dict[str, Any]] | None = None,
                 targets: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
    """A YAML config in `directory` with one target (TARGET_IQN) unless `targets` is given."""
    if targets is None:
        if luns is None:
            luns = [{"id": 0, "path": "lun0.img", "size": "64MiB"}]
        targets = [{"name": TARGET_IQN, "luns": luns}]
    doc = {"portals": ["127.0.0.1:0"], "targets": targets, **extra}
    path = directory / "pytarget.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class LiveTarget:
    """A `pytarget serve` child process listening on an ephemeral loopback port."""

    config: Path
    process: subprocess.Popen[str]
    host: str
    port: int
    log: Path
    iqn: str = TARGET_IQN
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, lun: int = 0, iqn: str | None = None) -> str:
        return f"iscsi://{self.host}:{self.port}/{iqn or self.iqn}/{lun}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def child_env() -> dict[str, str]:
    """The environment of a pytarget process a test starts: it runs `CODE` whatever
    `pip install` points at (the benchmarks' own helper, with the tests' code)."""
    return bench_code.child_env(CODE)


def start_target(config: Path, *args: str, log_name: str = "pytarget.log",
                 env: dict[str, str] | None = None) -> LiveTarget:
    """Start `pytarget serve` and wait until it reports its listening port."""
    log = config.parent / log_name
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytarget", "serve", "--config", str(config), *args],
        stdout=out, stderr=subprocess.STDOUT, text=True, cwd=config.parent,
        env={**child_env(), **(env or {})})
    deadline = time.monotonic() + 30
    pattern = re.compile(r"listening on ([0-9.:a-f]+):(\d+)")
    while time.monotonic() < deadline:
        m = pattern.search(log.read_text(errors="replace"))
        if m:
            return LiveTarget(config, proc, m.group(1), int(m.group(2)), log)
        if proc.poll() is not None:
            raise RuntimeError(f"pytarget exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"pytarget did not start:\n{log.read_text()}")


@contextlib.contextmanager
def gateway_targets(directory: Path, luns: list[dict[str, Any]], **extra: Any
                    ) -> Iterator[list[LiveTarget]]:
    """One target (TARGET_IQN) with `luns` served by two gateway processes started from one
    configuration, `directory`/pytarget.yaml (`extra`: more of its top-level keys), as
    `pytarget serve --gateway gw1|gw2`, each on an ephemeral loopback portal and logging to
    gw1.log or gw2.log (docs/guides/scale-out.md). Every target in the list, with any a test
    appends (a gateway started again), is stopped on exit, also when one failed to start."""
    config = directory / "pytarget.yaml"
    config.write_text(yaml.safe_dump({
        "gateways": [{"name": name, "portals": ["127.0.0.1:0"]} for name in GATEWAYS],
        **extra, "targets": [{"name": TARGET_IQN, "luns": luns}]}, sort_keys=False))
    started: list[LiveTarget] = []
    try:
        for name in GATEWAYS:
            started.append(start_target(config, "--gateway", name, log_name=f"{name}.log"))
        yield started
    finally:
        for target in started:
            target.stop()


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """The session's throw-away Ceph cluster (tests/ceph_cluster.py), for tests marked `ceph`.

    They are skipped only when Ceph is not installed here; once it is, a cluster that fails to
    start is an error of every test that needs it, not a skip."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    with running(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


@pytest.fixture
def live_target(tmp_path: Path) -> Iterator[LiveTarget]:
    """One target (TARGET_IQN) with a 64 MiB thin LUN 0 of 512-byte blocks."""
    target = start_target(write_config(tmp_path))
    yield target
    target.stop()
