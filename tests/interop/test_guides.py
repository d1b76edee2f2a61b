"""docs/guides/linux-open-iscsi.md followed verbatim by the Linux kernel initiator.

The guide marks the blocks a reader runs with `<!-- test: KIND [NAME] -->`: `config` (the
target's YAML), `guest NAME` (commands on the Linux host), `host NAME` (commands on the target
host). The VM tests start pytarget with the guide's configuration (only the portals and the
size change), hand the guide's guest blocks unchanged to tests/interop/guest/guide_linux.sh,
which runs them in order with checks in between, and run the host blocks here when the guest
asks for them (`host_sync NAME`). Two runs: single path (CHAP, fstrim, growing the LUN) and
multipath over two portals. Without the harness only the guide's structure is checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytarget.config import parse

from ..conftest import REPO, LiveTarget, start_target
from .run import GUEST_DIR, GuestRun, run_guest, unavailable
from .test_linux_initiator import target_trouble

GUIDE = REPO / "docs" / "guides" / "linux-open-iscsi.md"
_BLOCK = re.compile(r"^<!-- test: (config|guest|host)(?: ([\w-]+))? -->\n```\w*\n(.*?)^```$",
                    re.M | re.S)
GUEST_BLOCKS_USED = re.compile(r"^\s*(?:out=\$\()?guide ([\w-]+)", re.M)
HOST_MARKS_USED = re.compile(r"host_sync ([\w-]+)")


def guide_blocks() -> list[tuple[str, str, str]]:
    """(kind, name, text) of every marked block, in the guide's order."""
    return [(m.group(1), m.group(2) or "", m.group(3)) for m in _BLOCK.finditer(GUIDE.read_text())]


def guide_config(directory: Path) -> tuple[dict[str, Any], str]:
    """The guide's configuration with loopback portals; and the initiator its ACL names."""
    (text,) = [t for kind, _, t in guide_blocks() if kind == "config"]
    doc = yaml.safe_load(text)
    doc["portals"] = ["127.0.0.1:0"] * len(doc["portals"])
    initiator = doc["targets"][0]["acl"][0]["initiator"]
    return doc, initiator


def test_guide_is_consistent(tmp_path: Path) -> None:
    """Runs without a VM: the blocks the guest script calls exist, the configuration loads,
    and the guest blocks are valid bash."""
    blocks = guide_blocks()
    guest = {name for kind, name, _ in blocks if kind == "guest"}
    host = {name for kind, name, _ in blocks if kind == "host"}
    script = (GUEST_DIR / "guide_linux.sh").read_text()
    assert set(GUEST_BLOCKS_USED.findall(script)) == guest
    assert set(HOST_MARKS_USED.findall(script)) - {"NAME"} == host
    doc, initiator = guide_config(tmp_path)
    config = parse(yaml.safe_dump(doc), "guide", tmp_path)
    assert config.targets[0].auth is not None and config.discovery_auth is not None
    assert initiator.startswith("iqn.")
    steps = tmp_path / "guide-steps.sh"
    write_steps(steps)
    check = subprocess.run(["bash", "-n", str(steps)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def write_steps(path: Path) -> None:
    """guide-steps.sh: one bash function per guest block, its text unchanged."""
    parts = ["# Generated from docs/guides/linux-open-iscsi.md by tests/interop/test_guides.py"]
    for kind, name, text in guide_blocks():
        if kind == "guest":
            parts.append(f"guide_{name.replace('-', '_')}() {{\n{text}}}\n")
    path.write_text("\n".join(parts))


def _pytarget_shim(directory: Path) -> dict[str, str]:
    """An environment where `pytarget` is this checkout's command line."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "pytarget"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pytarget "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")]))}


def _host_block(name: str, config: Path, env: dict[str, str]) -> None:
    (text,) = [t for kind, n, t in guide_blocks() if kind == "host" and n == name]
    proc = subprocess.run(["bash", "-e", "-c", text], env={**env, "CONFIG": str(config)},
                          cwd=config.parent, capture_output=True, text=True, timeout=60)
    print(f"host block {name!r}:\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"host block {name!r} failed: {proc.stdout}{proc.stderr}")


def _ports(target: LiveTarget, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ports = [int(p) for p in re.findall(r"listening on [0-9.]+:(\d+)", target.log_text())]
        if len(ports) >= count:
            return ports[:count]
        time.sleep(0.05)
    raise AssertionError(f"the target did not listen on {count} portals:\n{target.log_text()}")


@pytest.fixture
def guide_target(tmp_path: Path) -> Iterator[tuple[LiveTarget, list[int], str]]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    doc, initiator = guide_config(tmp_path)
    config = tmp_path / "pytarget.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    target = start_target(config)
    try:
        yield target, _ports(target, len(doc["portals"])), initiator
    finally:
        target.stop()


def _run(target: LiveTarget, ports: list[int], initiator: str, tmp_path: Path, part: str,
         marks: dict[str, Any] | None = None, multipath: bool = False) -> GuestRun:
    steps = tmp_path / "guide-steps.sh"
    write_steps(steps)
    extra = ["--initiator-iqn", initiator]
    for port in ports[1:]:
        extra += ["-p", str(port)]
    if multipath:
        extra.append("--multipath")
    target.iqn = guide_config(tmp_path)[0]["targets"][0]["name"]
    return run_guest(target, "guide_linux.sh", tmp_path / f"guest-{part}", timeout=480,
                     env={"GUIDE_PART": part}, files=[steps], marks=marks, extra_args=extra)


def _assert_ok(run: GuestRun, target: LiveTarget) -> None:
    if not run.ok or run.mark_errors:
        pytest.fail("; ".join(run.mark_errors) + "\n" + run.report(), pytrace=False)
    trouble = target_trouble(target)
    assert not trouble, "\n".join(trouble[:20])
    log = target.log_text()
    for secret in ("discovery-s3cret", "s3cret-s3cret-s3cret", "an0ther-s3cret-value"):
        assert secret not in log


@pytest.mark.interop
@pytest.mark.slow
def test_linux_guide_single_path(guide_target: tuple[LiveTarget, list[int], str],
                                 tmp_path: Path) -> None:
    """Discovery and login with CHAP, the disk, ext4 and fstrim, growing the LUN while it is
    mounted, logout — the guide's commands exactly."""
    target, ports, initiator = guide_target
    env = _pytarget_shim(tmp_path)
    run = _run(target, ports, initiator, tmp_path, "single",
               marks={"grow": lambda: _host_block("grow", target.config, env)})
    _assert_ok(run, target)
    assert (tmp_path / "disk0.img").stat().st_size == 6 << 30
    log = target.log_text()
    assert f"login: {initiator} normal session" in log
    assert "reload: target iqn.2026-11.io.pytarget:disk LUN 0 grown from 4GiB to 6GiB" in log


@pytest.mark.interop
@pytest.mark.slow
def test_linux_guide_multipath(guide_target: tuple[LiveTarget, list[int], str],
                               tmp_path: Path) -> None:
    """Both portals, one session each, one dm-multipath map with two paths, I/O through it,
    a path down and back — the guide's commands exactly."""
    target, ports, initiator = guide_target
    run = _run(target, ports, initiator, tmp_path, "multipath", multipath=True)
    _assert_ok(run, target)
    assert target.log_text().count(f"login: {initiator} normal session") >= 3
