"""A throw-away XFS filesystem for tests: a sparse image made with `mkfs.xfs -m reflink=1`,
loop-mounted in a temporary directory and unmounted when the test ends, even when it fails.

XFS with reflink is where Linux (6.11 and later) gives RWF_ATOMIC direct writes of 4 KiB to
1 MiB, the atomic writes WRITE ATOMIC(16) passes on. Mounting needs root and xfsprogs
(tools/test installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MKFS_XFS = shutil.which("mkfs.xfs")


def skip_unless_mountable() -> None:
    if MKFS_XFS is None:
        pytest.skip("mkfs.xfs (xfsprogs) is not installed")
    if os.geteuid() != 0:
        pytest.skip("loop-mounting an XFS image needs root")


@contextmanager
def xfs_mount(directory: Path, size: int = 512 << 20) -> Iterator[Path]:
    """Yield the mount point of a fresh XFS filesystem of `size` bytes (an image in
    `directory`); unmount it and remove the image afterwards, whatever happened."""
    skip_unless_mountable()
    assert MKFS_XFS is not None
    image = directory / "xfs.img"
    mountpoint = directory / "xfs"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([MKFS_XFS, "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        image.unlink(missing_ok=True)
