"""Standard INQUIRY and the VPD pages."""

from __future__ import annotations

import struct

import pytest

from pytarget.core import limits
from pytarget.core.sense import Asc, Status

from .harness import make_lu, run


@pytest.fixture
def lu(tmp_path):
    return make_lu(tmp_path)


def inquiry(lu, page=None, alloc=255):
    evpd = 0 if page is None else 1
    return run(lu, bytes((0x12, evpd, page or 0)) + struct.pack(">H", alloc) + b"\0")


def test_standard_inquiry(lu) -> None:
    data = inquiry(lu).data
    assert data[0] == 0x00 and data[2] == 0x06 and data[3] & 0x0F == 2  # VERSION 06h: SPC-4
    assert data[4] == len(data) - 5
    assert data[7] & 0x02  # CMDQUE
    assert (data[5] >> 4) & 0x03 == 1  # implicit ALUA
    assert data[8:16] == b"PYTARGET"
    descriptors = {struct.unpack_from(">H", data, 58 + 2 * i)[0] for i in range(8)}
    assert {0x0460, 0x04C0, 0x0960} <= descriptors


def test_allocation_length_truncates_without_error(lu) -> None:
    for alloc in (0, 5, 36):
        result = inquiry(lu, alloc=alloc)
        assert result.ok() and len(result.data) == alloc


def test_page_code_without_evpd_is_invalid(lu) -> None:
    result = run(lu, bytes((0x12, 0, 0x80, 0, 255, 0)))
    assert result.asc == Asc.INVALID_FIELD_IN_CDB and result.field_pointer == (True, 2, 7)


def test_supported_pages_ascending_and_all_readable(lu) -> None:
    data = inquiry(lu, 0x00).data
    pages = list(data[4:4 + data[3]])
    assert pages == sorted(pages) and {0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2} <= set(pages)
    for page in pages:
        result = inquiry(lu, page)
        assert result.ok() and result.data[1] == page
        assert struct.unpack_from(">H", result.data, 2)[0] == len(result.data) - 4


def test_unknown_vpd_page(lu) -> None:
    assert inquiry(lu, 0xC9).asc == Asc.INVALID_FIELD_IN_CDB


def test_device_identification_designators(lu) -> None:
    data = inquiry(lu, 0x83).data
    pos, designators = 4, []
    while pos < len(data):
        code_set, kind, length = data[pos] & 0x0F, data[pos + 1], data[pos + 3]
        designators.append((code_set, (kind >> 4) & 3, kind & 0x0F, data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    assert designators[0][:3] == (1, 0, 3) and designators[0][3] == lu.naa  # NAA first
    types = {(assoc, kind) for _, assoc, kind, _ in designators}
    assert {(0, 3), (0, 1), (0, 8), (1, 4), (1, 5), (1, 8), (2, 8)} <= types
    names = [v.rstrip(b"\0") for cs, a, k, v in designators if k == 8]
    assert b"iqn.2026-11.io.pytarget:unit,t,0x0001" in names
    assert all(len(v) % 4 == 0 for cs, a, k, v in designators if k == 8)
    assert len(data) <= 255


def test_block_limits_match_the_limits_module(lu) -> None:
    data = inquiry(lu, 0xB0).data
    assert data[5] == limits.MAX_COMPARE_AND_WRITE_BLOCKS
    assert struct.unpack_from(">I", data, 8)[0] == limits.MAX_TRANSFER_BYTES // 512
    assert struct.unpack_from(">I", data, 20)[0] == limits.MAX_UNMAP_BLOCKS
    assert struct.unpack_from(">I", data, 24)[0] == limits.MAX_UNMAP_DESCRIPTORS
    assert struct.unpack_from(">I", data, 28)[0] * 512 == limits.UNMAP_GRANULARITY_BYTES
    assert (1 << 20) % (struct.unpack_from(">I", data, 28)[0] * 512) == 0  # divides 1 MiB
    assert struct.unpack_from(">Q", data, 36)[0] == limits.MAX_WRITE_SAME_BYTES // 512


def test_provisioning_pages_thin_and_thick(tmp_path) -> None:
    thin = make_lu(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    data = inquiry(thin, 0xB2).data
    assert data[5] == 0xE4 and data[6] & 0x07 == 2
    (tmp_path / "b").mkdir()
    thick = make_lu(tmp_path / "b", thin=False)
    assert 0xB2 not in inquiry(thick, 0x00).data[4:]
    rc16 = run(thick, bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + b"\0\0").data
    assert rc16[14] & 0xC0 == 0


def test_read_capacity(lu) -> None:
    rc10 = run(lu, bytes((0x25,)) + bytes(9)).data
    assert struct.unpack(">II", rc10) == (8191, 512)
    rc16 = run(lu, bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + b"\0\0").data
    assert struct.unpack_from(">QI", rc16) == (8191, 512)
    assert rc16[13] & 0x0F == 3 and rc16[14] & 0xC0 == 0xC0
    assert run(lu, bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0))).asc == Asc.INVALID_FIELD_IN_CDB


def test_missing_lun_inquiry(tmp_path) -> None:
    from pytarget.scsi.device import NoLogicalUnit

    from .harness import Directory
    lu = NoLogicalUnit(5, Directory())
    assert inquiry(lu).data[0] == 0x7F
    result = run(lu, bytes((0x00,)) + bytes(5))
    assert result.status == Status.CHECK_CONDITION and result.asc == Asc.LOGICAL_UNIT_NOT_SUPPORTED
    sense = run(lu, bytes((0x03, 0, 0, 0, 18, 0))).data
    assert (sense[12] << 8 | sense[13]) == Asc.LOGICAL_UNIT_NOT_SUPPORTED
