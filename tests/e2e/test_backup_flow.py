"""The backup flow of docs/guides/backup.md, step by step with qemu-img and dd against a live
target: a full backup after a checkpoint, writes through iSCSI and NBD, an incremental backup
that reads only the extents the checkpoint's bitmap reports dirty, and a restore from full +
incremental that is byte-identical to the LUN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import start_target, write_config
from .test_cbt import EXPORT, iscsi_writes, nbd_port, nbd_writes, pytarget, qemu

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None
                                or shutil.which("qemu-io") is None,
                                reason="qemu-utils (qemu-img, qemu-io) not installed")

SIZE = 64 << 20


def nbd_opts(port: int, **extra: str) -> str:
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={EXPORT}"
    return ",".join([opts, *(f"{k.replace('_', '-')}={v}" for k, v in extra.items())])


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}: {done.stdout}{done.stderr}"
    return done.stdout


def dirty_extents(port: int, checkpoint: str) -> list[tuple[int, int]]:
    """(offset, length) of what changed since `checkpoint` ("data": false under
    x-dirty-bitmap)."""
    extents = json.loads(ok(qemu("qemu-img", "map", "--output=json", "--image-opts",
                                 nbd_opts(port, x_dirty_bitmap=f"qemu:dirty-bitmap:{checkpoint}"))))
    return [(e["start"], e["length"]) for e in extents if not e["data"]]


def copy_extent(port: int, offset: int, length: int, image: Path) -> None:
    """Read [offset, offset+length) of the export into the same place of `image`."""
    source = "driver=raw,offset={},size={},file.{}".format(
        offset, length, nbd_opts(port).replace(",", ",file."))
    target = f"driver=raw,offset={offset},size={length},file.driver=file,file.filename={image}"
    ok(qemu("qemu-img", "convert", "-n", "--image-opts", source, "--target-image-opts", target))


def test_full_then_incremental_backup_restores_byte_identical(tmp_path: Path) -> None:
    config = write_config(tmp_path, nbd="127.0.0.1:0")
    target = start_target(config)
    try:
        port = nbd_port(target)
        url = f"nbd://127.0.0.1:{port}/{EXPORT}"
        ok(qemu("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0x6b 40M 1M",
                url))
        # 1. checkpoint, then the full backup (a snapshot export would be read instead, below)
        ok(pytarget(config, "checkpoint", "create", "0", "backup-1"))
        full = tmp_path / "full.raw"
        ok(qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(full)))
        # 2. the LUN keeps changing
        iscsi_writes(target)
        nbd_writes(port)
        # 3. next checkpoint; the incremental copies what changed since the previous one
        ok(pytarget(config, "checkpoint", "create", "0", "backup-2"))
        extents = dirty_extents(port, "backup-1")
        incremental = tmp_path / "incr-1.raw"
        subprocess.run(["truncate", "-s", str(SIZE), str(incremental)], check=True)
        for offset, length in extents:
            copy_extent(port, offset, length, incremental)
        (tmp_path / "incr-1.json").write_text(json.dumps(extents))
        read = sum(length for _, length in extents)
        assert 0 < read <= 8 * (64 << 10), extents  # 7 granules written: only those are read
        ok(pytarget(config, "checkpoint", "delete", "0", "backup-1"))

        # 4. restore: the full image, then each incremental extent over it
        restored = tmp_path / "restored.raw"
        subprocess.run(["cp", "--sparse=always", str(full), str(restored)], check=True)
        for offset, length in json.loads((tmp_path / "incr-1.json").read_text()):
            subprocess.run(["dd", f"if={incremental}", f"of={restored}", "bs=64K",
                            f"skip={offset}", f"seek={offset}", f"count={length}",
                            "iflag=skip_bytes,count_bytes", "oflag=seek_bytes", "conv=notrunc",
                            "status=none"], check=True)
        now = tmp_path / "now.raw"
        ok(qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(now)))
        assert restored.read_bytes() == now.read_bytes()
        assert full.read_bytes() != now.read_bytes()  # the incremental mattered
        assert os.path.getsize(restored) == SIZE
    finally:
        target.stop()
