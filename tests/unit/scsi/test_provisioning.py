"""UNMAP, WRITE SAME and GET LBA STATUS on sparse files."""

from __future__ import annotations

import os
import struct

import pytest

from pytarget.core import limits
from pytarget.core.sense import Asc

from .harness import make_lu, run


@pytest.fixture
def lu(tmp_path):
    return make_lu(tmp_path, blocks=262144)  # 128 MiB


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def unmap(lu, *ranges):
    data = unmap_list(*ranges)
    return run(lu, struct.pack(">BB4xBHB", 0x42, 0, 0, len(data), 0), data)


def write(lu, lba, data):
    return run(lu, struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0), data)


def read(lu, lba, n):
    return run(lu, struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0)).data


def allocated(lu) -> int:
    return os.fstat(lu.backstore.fd).st_blocks * 512


def test_unmap_64_mib_gives_the_space_back(lu) -> None:
    chunk = os.urandom(1 << 20)
    for i in range(64):
        assert write(lu, i * 2048, chunk).ok()
    os.fsync(lu.backstore.fd)
    before = allocated(lu)
    assert before >= 64 << 20
    # 64 MiB in descriptors of at most MAXIMUM UNMAP LBA COUNT blocks in total per command
    per_command = limits.MAX_UNMAP_BLOCKS
    lba = 0
    while lba < 131072:
        n = min(per_command, 131072 - lba)
        assert unmap(lu, (lba, n)).ok()
        lba += n
    after = allocated(lu)
    assert before - after >= 60 << 20
    assert read(lu, 0, 2048) == bytes(1 << 20)
    assert read(lu, 129024, 2048) == bytes(1 << 20)


def test_unmap_partial_granules_read_zero(lu) -> None:
    write(lu, 0, b"\xaa" * 8192)
    assert unmap(lu, (1, 3), (6, 1)).ok()
    data = read(lu, 0, 16)
    assert data[:512] == b"\xaa" * 512 and data[512:2048] == bytes(1536)
    assert data[2048:3072] == b"\xaa" * 1024 and data[3072:3584] == bytes(512)


def test_unmap_parameter_list_errors(lu) -> None:
    assert run(lu, struct.pack(">BB4xBHB", 0x42, 0, 0, 0, 0)).ok()  # no data: no-op
    assert run(lu, struct.pack(">BB4xBHB", 0x42, 0, 0, 6, 0), bytes(6)).asc \
        == Asc.PARAMETER_LIST_LENGTH_ERROR
    assert unmap(lu).ok()  # header only
    assert unmap(lu, (lu.nblocks, 0)).ok()
    assert unmap(lu, (lu.nblocks - 1, 2)).asc == Asc.LBA_OUT_OF_RANGE
    too_many = [(i, 1) for i in range(limits.MAX_UNMAP_DESCRIPTORS + 1)]
    assert unmap(lu, *too_many).asc in (Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                                        Asc.INVALID_FIELD_IN_CDB)
    per = 200000  # overlapping descriptors whose total passes MAXIMUM UNMAP LBA COUNT
    n = limits.MAX_UNMAP_BLOCKS // per + 1
    big = unmap(lu, *[(0, per)] * n)
    assert big.asc == Asc.INVALID_FIELD_IN_PARAMETER_LIST
    assert big.field_pointer == (False, 8 + 16 * (n - 1) + 8, 7)
    anchored = run(lu, struct.pack(">BB4xBHB", 0x42, 1, 0, 24, 0), unmap_list((0, 1)))
    assert anchored.asc == Asc.INVALID_FIELD_IN_CDB and anchored.field_pointer == (True, 1, 0)


def ws16(lu, lba, n, flags, data=b""):
    return run(lu, struct.pack(">BBQIBB", 0x93, flags, lba, n, 0, 0), data)


def test_write_same_pattern_and_zero(lu) -> None:
    block = os.urandom(512)
    assert ws16(lu, 100, 1000, 0, block).ok()
    assert read(lu, 100, 1000) == block * 1000
    before = allocated(lu)
    assert ws16(lu, 0, 16384, 0, bytes(512)).ok()  # zeros punch on a thin LUN
    assert allocated(lu) < before
    assert read(lu, 100, 10) == bytes(5120)


def test_write_same_unmap_ndob_and_limits(lu) -> None:
    write(lu, 0, b"\x11" * 4096)
    assert ws16(lu, 0, 8, 0x08 | 0x01).ok()  # UNMAP + NDOB
    assert read(lu, 0, 8) == bytes(4096)
    assert ws16(lu, 0, 1, 0x10 | 0x08, bytes(512)).field_pointer == (True, 1, 4)  # ANCHOR
    assert ws16(lu, 0, 1, 0, bytes(256)).asc == Asc.INVALID_FIELD_IN_INFORMATION_UNIT
    assert ws16(lu, 0, 1, 0x01, bytes(512)).asc == Asc.INVALID_FIELD_IN_INFORMATION_UNIT
    most = lu.max_write_same_blocks
    assert ws16(lu, 0, most + 1, 0, bytes(512)).field_pointer == (True, 10, 7)
    assert ws16(lu, lu.nblocks - 10, 0, 0x08, bytes(512)).ok()  # 0 blocks: to the end
    assert ws16(lu, lu.nblocks, 0, 0, bytes(512)).asc == Asc.LBA_OUT_OF_RANGE
    pb = ws16(lu, 0, 1, 0x04, bytes(512))
    assert pb.field_pointer == (True, 1, 2)  # PBDATA
    lb = ws16(lu, 0, 1, 0x02, bytes(512))
    assert lb.field_pointer == (True, 1, 1)  # LBDATA


def test_write_same_on_thick_lun(tmp_path) -> None:
    lu = make_lu(tmp_path, thin=False)
    write(lu, 0, b"\x22" * 4096)
    assert ws16(lu, 0, 8, 0x08, bytes(512)).field_pointer == (True, 1, 3)  # no LBPWS
    assert ws16(lu, 0, 8, 0, bytes(512)).ok()
    assert read(lu, 0, 8) == bytes(4096)


def gls(lu, lba, alloc=4096):
    return run(lu, struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0))


def descriptors(data):
    n = (struct.unpack_from(">I", data)[0] - 4) // 16
    return [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(n)]


def test_get_lba_status(lu) -> None:
    write(lu, 2048, os.urandom(1 << 20))
    descs = descriptors(gls(lu, 0).data)
    assert descs[0] == (0, 2048, 1) and descs[1] == (2048, 2048, 0)
    assert descs[2][0] == 4096 and descs[2][2] == 1
    assert descs[-1][0] + descs[-1][1] == lu.nblocks
    assert gls(lu, lu.nblocks).asc == Asc.LBA_OUT_OF_RANGE
    assert gls(lu, 2 ** 64 - 1).asc == Asc.LBA_OUT_OF_RANGE
    assert len(gls(lu, 0, alloc=24).data) == 24
