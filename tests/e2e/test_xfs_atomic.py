"""Atomic writes on a real filesystem: the file backstore on an XFS image the test creates and
loop-mounts (reflink=1), where Linux gives RWF_ATOMIC direct writes, and WRITE ATOMIC(16) and
VPD B0h of a logical unit on it."""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytarget.backstore.file import FileBackstore, atomic_write_units

from ..unit.scsi.harness import make_lu, run
from ..xfs import xfs_mount


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with xfs_mount(tmp_path) as mountpoint:
        yield mountpoint


def test_statx_reports_the_atomic_units_and_the_backstore_offers_them(xfs: Path) -> None:
    path = xfs / "lun.img"
    FileBackstore.create(str(path), 64 << 20)
    store = FileBackstore(str(path))
    try:
        unit_min, unit_max, _ = atomic_write_units(store.fd)
        if not unit_max:
            pytest.skip("this kernel gives no RWF_ATOMIC on XFS (Linux 6.11 and later do)")
        assert (store.caps.atomic_write_unit_min, store.caps.atomic_write_unit_max) == \
            (unit_min, unit_max)
        assert unit_min <= 4096 and unit_max >= 65536

        async def go() -> None:
            n = unit_min
            while n <= unit_max:
                data = bytes((n.bit_length(),)) * n
                await store.awrite_atomic(memoryview(data), n)
                buf = bytearray(n)
                store.read_into(memoryview(buf), n)
                assert buf == data
                n *= 2
            for length, offset in ((3 * unit_min, 0), (unit_min, unit_min // 2),
                                   (2 * unit_max, 0)):
                with pytest.raises(OSError) as info:
                    await store.awrite_atomic(memoryview(bytes(length)), offset)
                assert info.value.errno == errno.EINVAL
        asyncio.run(go())
    finally:
        store.close()


def test_read_only_backstores_offer_no_atomic_writes(xfs: Path) -> None:
    path = xfs / "ro.img"
    FileBackstore.create(str(path), 1 << 20)
    store = FileBackstore(str(path), readonly=True)
    try:
        assert store.caps.atomic_write_unit_max == 0
    finally:
        store.close()


def test_a_logical_unit_on_xfs_advertises_and_honours_one_atomic_length(xfs: Path) -> None:
    lu = make_lu(xfs, blocks=131072)
    try:
        if not lu.caps.atomic_write_unit_max:
            pytest.skip("this kernel gives no RWF_ATOMIC on XFS")
        page = run(lu, bytes((0x12, 0x01, 0xB0, 0, 64, 0))).data
        assert page[44:64] == struct.pack(">IIIII", 32, 32, 32, 0, 0)
        data = bytes(range(256)) * 64
        cdb = struct.pack(">BBQHHBB", 0x9C, 0x08, 64, 0, 32, 0, 0)
        assert run(lu, cdb, data).ok()
        assert run(lu, struct.pack(">BBQIBB", 0x88, 0, 64, 32, 0, 0)).data == data
        misaligned = struct.pack(">BBQHHBB", 0x9C, 0, 16, 0, 32, 0, 0)
        assert run(lu, misaligned, data).key == 0x05
    finally:
        lu.close()
