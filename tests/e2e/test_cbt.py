"""Changed-block tracking on a live target: checkpoints made with `pytarget checkpoint`, writes
through iSCSI and NBD, `qemu-img map` of the `qemu:dirty-bitmap:` context, and what a clean
stop and a SIGKILL leave for the next start."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytarget.initiator.client import Initiator

from ..conftest import (
    INITIATOR1,
    TARGET_IQN,
    LiveTarget,
    child_env,
    start_target,
    write_config,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None
                                or shutil.which("qemu-io") is None,
                                reason="qemu-utils (qemu-img, qemu-io) not installed")

EXPORT = f"{TARGET_IQN}/0"
G = 64 << 10
BS = 512


def nbd_port(target: LiveTarget) -> int:
    for _ in range(400):
        m = re.search(r"NBD exports served on 127\.0\.0\.1:(\d+)", target.log_text())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(target.log_text())


def pytarget(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env()
    return subprocess.run([sys.executable, "-m", "pytarget", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def dirty_granules(port: int, checkpoint: str) -> set[int]:
    """The granules `qemu-img map` reports dirty: QEMU's client reads the dirty-bitmap context
    in place of base:allocation, so NBD_STATE_DIRTY shows as "data": false."""
    done = qemu("qemu-img", "map", "--output=json", "--image-opts",
                f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                f"export={EXPORT},x-dirty-bitmap=qemu:dirty-bitmap:{checkpoint}")
    assert done.returncode == 0, done.stderr
    out: set[int] = set()
    for extent in json.loads(done.stdout):
        if not extent["data"]:
            assert extent["start"] % G == 0
            out |= set(range(extent["start"] // G, -(-(extent["start"] + extent["length"]) // G)))
    return out


def iscsi_writes(target: LiveTarget) -> None:
    async def go() -> None:
        ini = await Initiator.connect(target.host, target.port)
        await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
        await ini.clear_unit_attentions(0)
        (await ini.write(0, 0, b"\x11" * 8 * BS)).check()  # granule 0
        (await ini.write(0, (1 << 20) // BS + 1, b"\x22" * BS)).check()  # granule 16
        desc = struct.pack(">QI4x", (4 << 20) // BS, G // BS)  # UNMAP: granule 64
        params = struct.pack(">HH4x", 6 + len(desc), len(desc)) + desc
        cdb = struct.pack(">BB4xBHB", 0x42, 0, 0, len(params), 0) + bytes(6)
        (await ini.command(0, cdb, params)).check()
        await ini.logout()

    asyncio.run(go())


def nbd_writes(port: int) -> None:
    done = qemu("qemu-io", "-f", "raw", "-c", "write -P 0x33 8M 4k", "-c", "discard 10M 128k",
                "-c", "write -z 12M 64k", f"nbd://127.0.0.1:{port}/{EXPORT}")
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done


WRITTEN = {0, 16, 64, 128, 160, 161, 192}


def test_qemu_img_map_reports_the_granules_written_through_iscsi_and_nbd(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, nbd="127.0.0.1:0")
    target = start_target(config)
    try:
        port = nbd_port(target)
        iscsi_writes(target)  # before the checkpoint: not reported
        created = pytarget(config, "checkpoint", "create", "0", "full")
        assert created.returncode == 0, created.stderr
        assert dirty_granules(port, "full") == set()
        iscsi_writes(target)
        nbd_writes(port)
        assert dirty_granules(port, "full") == WRITTEN
        # a later checkpoint sees only what follows it; the earlier one keeps its answer
        assert pytarget(config, "checkpoint", "create", "0", "incr1").returncode == 0
        done = qemu("qemu-io", "-f", "raw", "-c", "write -P 0x44 20M 4k",
                    f"nbd://127.0.0.1:{port}/{EXPORT}")
        assert done.returncode == 0
        assert dirty_granules(port, "incr1") == {320}
        assert dirty_granules(port, "full") == WRITTEN | {320}
        missing = qemu("qemu-img", "map", "--output=json", "--image-opts",
                       f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                       f"export={EXPORT},x-dirty-bitmap=qemu:dirty-bitmap:nonesuch")
        assert missing.returncode != 0
    finally:
        target.stop()


def test_clean_stop_keeps_bitmaps_exact_and_sigkill_makes_them_inconsistent(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, nbd="127.0.0.1:0")
    target = start_target(config)
    try:
        port = nbd_port(target)
        assert pytarget(config, "checkpoint", "create", "0", "c1").returncode == 0
        nbd_writes(port)
        assert target.stop() == 0  # SIGTERM: a clean stop
        state = tmp_path / "lun0.img.cbt"
        assert state.exists()

        target = start_target(config)
        port = nbd_port(target)
        listing = pytarget(config, "checkpoint", "list", "0", "--json")
        assert listing.returncode == 0, listing.stderr
        (entry,) = json.loads(listing.stdout)
        assert [(c["name"], c["state"]) for c in entry["checkpoints"]] == [("c1", "exact")]
        assert dirty_granules(port, "c1") == {128, 160, 161, 192}
        assert pytarget(config, "checkpoint", "create", "0", "c2").returncode == 0
        iscsi_writes(target)
        target.stop(signal.SIGKILL)  # a crash: the bitmaps since c2 were never saved

        target = start_target(config)
        port = nbd_port(target)
        assert "not closed cleanly" in target.log_text()
        listing = pytarget(config, "checkpoint", "list", "0")
        assert listing.returncode == 0
        assert re.search(r"c1 .*inconsistent", listing.stdout), listing.stdout
        assert re.search(r"c2 .*inconsistent", listing.stdout), listing.stdout
        status = pytarget(config, "status")
        assert "checkpoints:2" in status.stdout and "checkpoint-inconsistent" in status.stdout
        refused = qemu("qemu-img", "map", "--output=json", "--image-opts",
                       f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                       f"export={EXPORT},x-dirty-bitmap=qemu:dirty-bitmap:c2")
        assert refused.returncode != 0  # never served as exact
        # a checkpoint made after the restart is exact again
        assert pytarget(config, "checkpoint", "create", "0", "c3").returncode == 0
        nbd_writes(port)
        assert dirty_granules(port, "c3") == {128, 160, 161, 192}
    finally:
        target.stop()


def bitmap_map(port: int, export: str, checkpoint: str) -> list[dict[str, object]]:
    done = qemu("qemu-img", "map", "--output=json", "--image-opts",
                f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                f"export={export},x-dirty-bitmap=qemu:dirty-bitmap:{checkpoint}")
    assert done.returncode == 0, done.stderr
    return [{k: e[k] for k in ("start", "length", "zero", "data")}
            for e in json.loads(done.stdout)]


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed")
def test_the_same_answers_as_qemu_nbd_serving_a_qcow2_bitmap(tmp_path: Path) -> None:
    """qemu-nbd exporting a persistent qcow2 bitmap of the same granularity, after the same
    writes, is the reference for the whole `qemu-img map`."""
    reference = tmp_path / "ref.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(reference), "64M"],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "64K", str(reference), "c1"],
                   check=True)
    done = qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 8M 4k", "-c", "discard 10M 128k",
                "-c", "write -z 12M 64k", str(reference))
    assert done.returncode == 0, done.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        ref_port = probe.getsockname()[1]
    server = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-r", "-b", "127.0.0.1", "-p",
                               str(ref_port), "-x", "ref", "-B", "c1", "--persistent",
                               str(reference)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", ref_port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "qemu-nbd exited"
                time.sleep(0.05)
        theirs = bitmap_map(ref_port, "ref", "c1")
    finally:
        server.terminate()
        server.wait(30)

    config = write_config(tmp_path, nbd="127.0.0.1:0")
    target = start_target(config)
    try:
        port = nbd_port(target)
        assert pytarget(config, "checkpoint", "create", "0", "c1").returncode == 0
        nbd_writes(port)
        assert bitmap_map(port, EXPORT, "c1") == theirs
    finally:
        target.stop()
