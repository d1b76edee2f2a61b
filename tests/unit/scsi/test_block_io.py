"""READ/WRITE/VERIFY/WRITE AND VERIFY/ORWRITE/SYNCHRONIZE CACHE/PRE-FETCH against a file."""

from __future__ import annotations

import os
import struct

import pytest

from pytarget.core.sense import Asc, SenseKey, Status

from .harness import make_lu, run


@pytest.fixture
def lu(tmp_path):
    return make_lu(tmp_path)


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def test_write_then_read_all_sizes_of_cdb(lu) -> None:
    data = os.urandom(4096)
    assert run(lu, rw10(0x2A, 10, 8), data).ok()
    assert run(lu, rw10(0x28, 10, 8)).data == data
    assert run(lu, struct.pack(">BBIIBB", 0xA8, 0, 10, 8, 0, 0)).data == data
    assert run(lu, rw16(0x88, 10, 8)).data == data
    assert run(lu, bytes((0x08, 0, 0, 10, 8, 0))).data == data
    with open(lu.backstore.path, "rb") as f:
        f.seek(10 * 512)
        assert f.read(4096) == data


def test_read6_zero_means_256_blocks(lu) -> None:
    assert len(run(lu, bytes((0x08, 0, 0, 0, 0, 0))).data) == 256 * 512


def test_range_checks(lu) -> None:
    last = lu.nblocks - 1
    assert run(lu, rw10(0x28, last, 1)).ok()
    for lba, n in ((last, 2), (lu.nblocks, 1), (lu.nblocks + 1, 0), (0xFFFFFFFF, 1)):
        assert run(lu, rw10(0x28, lba, n)).asc == Asc.LBA_OUT_OF_RANGE
    assert run(lu, rw16(0x88, 2 ** 64 - 1, 1)).asc == Asc.LBA_OUT_OF_RANGE
    assert run(lu, rw10(0x28, 0, 0)).ok()


def test_transfer_length_above_the_limit(tmp_path) -> None:
    from pytarget.core import limits
    lu = make_lu(tmp_path, blocks=40000)
    most = limits.MAX_TRANSFER_BYTES // 512
    assert run(lu, rw16(0x88, 0, most)).ok()
    result = run(lu, rw16(0x88, 0, most + 1))
    assert result.asc == Asc.INVALID_FIELD_IN_CDB and result.field_pointer == (True, 10, 7)


def test_fua_write_is_flushed(lu, monkeypatch) -> None:
    flushed = []
    monkeypatch.setattr(lu.backstore, "flush", lambda: flushed.append(1))
    assert run(lu, rw10(0x2A, 0, 1, 0x08), bytes(512)).ok()
    assert flushed == [1]
    assert run(lu, rw10(0x2A, 0, 1, 0x00), bytes(512)).ok()
    assert flushed == [1]


def test_short_data_out_writes_only_whole_blocks_received(lu) -> None:
    assert run(lu, rw10(0x2A, 0, 2), b"a" * 1024).ok()
    assert run(lu, rw10(0x2A, 0, 2), b"b" * 512).ok()
    assert run(lu, rw10(0x28, 0, 2)).data == b"b" * 512 + b"a" * 512
    partial = run(lu, rw10(0x2A, 0, 1), b"c" * 200)
    assert (partial.key == SenseKey.ILLEGAL_REQUEST
            and partial.asc == Asc.INVALID_FIELD_IN_INFORMATION_UNIT)


def test_verify_bytchk(lu) -> None:
    data = os.urandom(1024)
    run(lu, rw10(0x2A, 5, 2), data)
    assert run(lu, rw10(0x2F, 5, 2, 0x02), data).ok()
    bad = bytearray(data)
    bad[700] ^= 1
    result = run(lu, rw10(0x2F, 5, 2, 0x02), bytes(bad))
    assert result.key == SenseKey.MISCOMPARE and result.information == 700
    assert run(lu, rw10(0x2F, 5, 2, 0x00)).ok()  # medium verification
    same = os.urandom(512)
    run(lu, rw10(0x2A, 20, 3), same * 3)
    assert run(lu, rw10(0x2F, 20, 3, 0x06), same).ok()  # BYTCHK=11b: one block for all
    assert run(lu, rw10(0x2F, 20, 3, 0x04)).asc == Asc.INVALID_FIELD_IN_CDB


def test_write_and_verify(lu) -> None:
    data = os.urandom(512)
    assert run(lu, rw10(0x2E, 3, 1, 0x02), data).ok()
    assert run(lu, rw10(0x28, 3, 1)).data == data


def test_orwrite(lu) -> None:
    run(lu, rw10(0x2A, 0, 1), b"\x0f" * 512)
    assert run(lu, rw16(0x8B, 0, 1), b"\xf0" * 512).ok()
    assert run(lu, rw10(0x28, 0, 1)).data == b"\xff" * 512


def test_synchronize_cache_and_prefetch(lu) -> None:
    assert run(lu, rw10(0x35, 0, 0)).ok()
    assert run(lu, rw10(0x35, lu.nblocks, 1)).asc == Asc.LBA_OUT_OF_RANGE
    result = run(lu, rw10(0x34, 0, 16))
    assert result.status == Status.CONDITION_MET


def test_read_only_lun(tmp_path) -> None:
    lu = make_lu(tmp_path)
    lu.backstore.close()
    ro = make_lu(tmp_path, readonly=True)
    result = run(ro, rw10(0x2A, 0, 1), bytes(512))
    assert result.key == SenseKey.DATA_PROTECT and result.asc == Asc.WRITE_PROTECTED
    assert run(ro, rw10(0x28, 0, 1)).ok()


def test_io_error_becomes_medium_error(lu, monkeypatch) -> None:
    def fail(*_a):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(lu.backstore, "read_nowait", lambda *a: False)
    monkeypatch.setattr(lu.backstore, "read_into", fail)
    result = run(lu, rw10(0x28, 7, 1))
    assert result.key == SenseKey.MEDIUM_ERROR and result.asc == Asc.UNRECOVERED_READ_ERROR
    assert result.information == 7
    monkeypatch.setattr(lu.backstore, "write", fail)
    assert run(lu, rw10(0x2A, 7, 1), bytes(512)).asc == Asc.WRITE_ERROR


def test_unexpected_exception_is_internal_target_failure(lu, monkeypatch) -> None:
    monkeypatch.setattr(lu.backstore, "read_nowait", lambda *a: 1 / 0)
    result = run(lu, rw10(0x28, 0, 1))
    assert result.key == SenseKey.HARDWARE_ERROR and result.asc == Asc.INTERNAL_TARGET_FAILURE
