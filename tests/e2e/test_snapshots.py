"""Snapshots exposed over NBD to QEMU's client (qemu-img, qemu-io, qemu-nbd --list): a snapshot
taken with reflink on XFS (tests/xfs.py) reads as the LUN read when it was taken while the LUN
moves on, is listed and read-only, maps its holes, is still exported after the target
restarts, and gives back the blocks only it held when deleted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TARGET_IQN, LiveTarget, start_target, write_config
from tests.e2e.test_reload import cli_env
from tests.xfs import xfs_mount

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None
                                or shutil.which("qemu-io") is None
                                or shutil.which("qemu-nbd") is None,
                                reason="qemu-utils (qemu-img, qemu-io, qemu-nbd) not installed")

SIZE = 64 << 20
EXPORT = f"{TARGET_IQN}/0"
SNAPSHOT = f"{TARGET_IQN}/0@before"


def nbd_port(target: LiveTarget, after: int = 0) -> int:
    for _ in range(400):
        m = re.search(r"NBD exports served on 127\.0\.0\.1:(\d+)", target.log_text()[after:])
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(target.log_text())


def qemu(*args: str, ok: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == ok, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def snapshot_cli(config: Path, *args: str) -> str:
    done = subprocess.run(["python3", "-m", "pytarget", "snapshot", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=120,
                          env=cli_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    with xfs_mount(tmp_path, 512 << 20) as mount:
        yield mount


def test_reflink_snapshot_over_nbd_survives_a_restart(xfs_dir: Path) -> None:
    config = write_config(xfs_dir, nbd="127.0.0.1:0")
    target = start_target(config)
    try:
        port = nbd_port(target)
        url = f"nbd://127.0.0.1:{port}/{EXPORT}"
        qemu("qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0xbb 8M 1M",
             url)
        out = snapshot_cli(config, "create", "before", "0")
        assert "(reflink)" in out, out
        qemu("qemu-io", "-f", "raw", "-c", "write -P 0xcc 0 1M", "-c", "discard 8M 1M", url)
        snapshot_cli(config, "expose", "0@before", "--nbd")

        listing = qemu("qemu-nbd", "--list", "-b", "127.0.0.1", "-p", str(port))
        assert f"export: '{EXPORT}'" in listing
        snapshot_entry = listing.split(f"export: '{SNAPSHOT}'", 1)[1]
        assert "readonly" in snapshot_entry.split("export:", 1)[0], listing
        snap = f"nbd://127.0.0.1:{port}/{SNAPSHOT}"
        info = json.loads(qemu("qemu-img", "info", "--output=json", snap))
        assert info["virtual-size"] == SIZE
        out = qemu("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xaa 0 1M",
                   "-c", "read -P 0xbb 8M 1M", "-c", "read -P 0 2M 1M", snap)
        assert "Pattern verification failed" not in out, out
        refused = qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", snap, ok=False)
        assert "permission denied" in refused.lower()  # NBD_FLAG_READ_ONLY
        extents = json.loads(qemu("qemu-img", "map", "--output=json", "-f", "raw", snap))
        data = [(e["start"], e["length"]) for e in extents if e["data"]]
        assert data == [(0, 1 << 20), (8 << 20, 1 << 20)]
        out = qemu("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xcc 0 1M",
                   "-c", "read -P 0 8M 1M", url)
        assert "Pattern verification failed" not in out, out
    finally:
        target.stop()

    target = start_target(config)
    try:
        port = nbd_port(target)
        snap = f"nbd://127.0.0.1:{port}/{SNAPSHOT}"
        out = qemu("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xaa 0 1M", snap)
        assert "Pattern verification failed" not in out, out
        (row,) = json.loads(snapshot_cli(config, "list", "--json"))
        assert row["method"] == "reflink" and row["nbd"] and row["export"] == SNAPSHOT

        # the 2 MiB only the snapshot still holds (overwritten and discarded since) come back
        snapshot_cli(config, "unexpose", "0@before", "--nbd")
        before = free_bytes(xfs_dir)
        snapshot_cli(config, "delete", "0@before")
        assert not (xfs_dir / "lun0.img.snapshots").exists()
        freed = 0
        for _ in range(200):  # XFS may free an unlinked file's blocks in the background
            os.sync()
            freed = free_bytes(xfs_dir) - before
            if freed >= 2 << 20:
                break
            time.sleep(0.05)
        assert freed >= 2 << 20, freed
    finally:
        target.stop()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize
