"""docs/guides/linux-open-iscsi.md followed verbatim by the Linux kernel initiator.

The guide marks the blocks a reader runs with `<!-- test: KIND [NAME] -->`: `config` (the
target's YAML), `guest NAME` (commands on the Linux host), `host NAME` (commands on the target
host). The VM tests start pytarget with the guide's configuration (only the portals and the
size change), hand the guide's guest blocks unchanged to tests/interop/guest/guide_linux.sh,
which runs them in order with checks in between, and run the host blocks here when the guest
asks for them (`host_sync NAME`). Two parts of lane.py's shared boot, each with a target of its
own: single path (CHAP, fstrim, growing the LUN) and multipath over two portals. Without the
harness only the guide's structure is checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytarget.config import parse

from ..conftest import REPO, LiveTarget, child_env, start_target
from .lane import GUEST, PartContext, PartOutcome, PartPlan
from .run import GUEST_DIR, GuestPart, GuestRun
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
    """An environment where `pytarget` is the command line of the code the tests' targets run
    (conftest's `child_env`)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "pytarget"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pytarget "$@"\n')
    shim.chmod(0o755)
    env = child_env()
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


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


def guide_part(part: str, multipath: bool = False) -> Any:
    """guide_linux.sh's GUIDE_PART `part` against the guide's target, as a part of the shared
    boot (under the guide's initiator name); the test gets the target and the initiator."""
    @contextmanager
    def setup(context: PartContext) -> Iterator[PartPlan]:
        doc, initiator = guide_config(context.directory)
        config = context.directory / "pytarget.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        steps = context.directory / "guide-steps.sh"
        write_steps(steps)
        env = _pytarget_shim(context.directory)
        target = start_target(config)
        try:
            target.iqn = doc["targets"][0]["name"]
            marks = {} if multipath else {"grow": lambda: _host_block("grow", config, env)}
            yield PartPlan(GuestPart(f"guide_{part}", "guide_linux.sh",
                                     _ports(target, len(doc["portals"])), target.iqn, 480,
                                     env={"GUIDE_PART": part}, files=[steps], marks=marks,
                                     multipath=multipath, target_log=target.log),
                           (target, initiator), initiator_iqn=initiator)
        finally:
            target.stop()
    return GUEST.part(f"guide_{part}", setup)


guest_guide_single = guide_part("single")
guest_guide_multipath = guide_part("multipath", multipath=True)


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
def test_linux_guide_single_path(guest_guide_single: PartOutcome) -> None:
    """Discovery and login with CHAP, the disk, ext4 and fstrim, growing the LUN while it is
    mounted, logout — the guide's commands exactly."""
    run, (target, initiator) = guest_guide_single.run, guest_guide_single.state
    _assert_ok(run, target)
    assert (target.config.parent / "disk0.img").stat().st_size == 6 << 30
    log = target.log_text()
    assert f"login: {initiator} normal session" in log
    assert "reload: target iqn.2026-11.io.pytarget:disk LUN 0 grown from 4GiB to 6GiB" in log


@pytest.mark.interop
@pytest.mark.slow
def test_linux_guide_multipath(guest_guide_multipath: PartOutcome) -> None:
    """Both portals, one session each, one dm-multipath map with two paths, I/O through it,
    a path down and back — the guide's commands exactly."""
    run, (target, initiator) = guest_guide_multipath.run, guest_guide_multipath.state
    _assert_ok(run, target)
    assert target.log_text().count(f"login: {initiator} normal session") >= 3
