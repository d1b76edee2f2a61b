"""EXTENDED COPY parameter list checks: every error with its exact sense and field pointer, and
nothing read or written when a list is refused."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pytarget.core.sense import Asc, SenseKey, Status

from ..scsi.harness import run
from .helpers import NEXUS_A, Rig, b2b, e4, lid1, lid4, xcopy_cdb

DATA = bytes(range(256)) * 8  # four blocks


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    rig = Rig(tmp_path)
    src = rig.unit(0)
    rig.unit(1)
    src.backstore.write(memoryview(DATA), 0)
    return rig


def xcopy(rig: Rig, params: bytes, length: int | None = None, sa_lid4: bool = False):
    lu = rig.node.luns[0]
    n = len(params) if length is None else length
    return run(lu, xcopy_cdb(n, sa_lid4), params[:n], NEXUS_A)


def untouched(rig: Rig) -> bool:
    dst = rig.node.luns[1]
    buf = bytearray(len(DATA))
    dst.backstore.read_into(memoryview(buf), 0)
    return not any(buf) and not dst.stats_copy_paths


def good_list(rig: Rig, **kw: object) -> bytes:
    src, dst = rig.node.luns[0], rig.node.luns[1]
    return lid1([e4(src), e4(dst)], [b2b(0, 1, 4, 0, 0)], **kw)  # type: ignore[arg-type]


def test_zero_parameter_list_length_is_good(rig: Rig) -> None:
    r = run(rig.node.luns[0], xcopy_cdb(0), b"", NEXUS_A)
    assert r.status == Status.GOOD


def test_good_list_copies(rig: Rig) -> None:
    assert xcopy(rig, good_list(rig)).ok()
    buf = bytearray(len(DATA))
    rig.node.luns[1].backstore.read_into(memoryview(buf), 0)
    assert buf == DATA


@pytest.mark.parametrize("length", [10, 47, 75])
def test_short_parameter_list(rig: Rig, length: int) -> None:
    r = xcopy(rig, good_list(rig), length)
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.PARAMETER_LIST_LENGTH_ERROR, None)
    assert untouched(rig)


def test_descriptor_lists_longer_than_the_limit(rig: Rig) -> None:
    src = rig.node.luns[0]
    params = lid1([e4(src)] * 33, [b2b(0, 0, 1, 0, 1)] * 110)
    r = xcopy(rig, params)
    assert (r.key, r.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_too_many_target_descriptors(rig: Rig) -> None:
    src = rig.node.luns[0]
    r = xcopy(rig, lid1([e4(src)] * 33, [b2b(0, 0, 1, 0, 1)]))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.TOO_MANY_TARGET_DESCRIPTORS, (False, 2, 7))


def test_too_many_segment_descriptors(rig: Rig) -> None:
    src = rig.node.luns[0]
    r = xcopy(rig, lid1([e4(src)], [b2b(0, 0, 1, 0, 1)] * 65))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.TOO_MANY_SEGMENT_DESCRIPTORS, (False, 8, 7))


def test_unsupported_target_descriptor(rig: Rig) -> None:
    fc = bytes((0xE0,)) + bytes(31)
    r = xcopy(rig, lid1([e4(rig.node.luns[0]), fc], [b2b(0, 1, 1, 0, 0)]))
    assert (r.key, r.asc, r.field_pointer) == (
        SenseKey.ILLEGAL_REQUEST, Asc.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, (False, 48, 7))
    assert untouched(rig)


def test_unsupported_segment_descriptor(rig: Rig) -> None:
    stream = struct.pack(">BBH", 0x03, 0, 0x10) + bytes(16)
    r = xcopy(rig, lid1([e4(rig.node.luns[0])], [b2b(0, 0, 1, 0, 1), stream]))
    assert (r.key, r.asc, r.field_pointer) == (
        SenseKey.ILLEGAL_REQUEST, Asc.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, (False, 76, 7))


@pytest.mark.parametrize("mutate, pointer", [
    (lambda d: d.__setitem__(1, 0x01), (False, 17, 4)),  # peripheral device type 01h
    (lambda d: d.__setitem__(5, 0x13), (False, 21, 5)),  # association: port
    (lambda d: d.__setitem__(7, 0), (False, 23, 7)),  # designator length 0
    (lambda d: d.__setitem__(7, 21), (False, 23, 7)),  # longer than the field
    (lambda d: d.__setitem__(28, 0x01), (False, 44, 7)),  # reserved bit in the parameters
])
def test_invalid_identification_descriptor(rig: Rig, mutate, pointer) -> None:  # type: ignore[no-untyped-def]
    desc = bytearray(e4(rig.node.luns[0]))
    mutate(desc)
    r = xcopy(rig, lid1([bytes(desc), e4(rig.node.luns[1])], [b2b(0, 1, 1, 0, 0)]))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, pointer)
    assert untouched(rig)


@pytest.mark.parametrize("lu_id_type", [0b00, 0b01, 0b10, 0b11])
def test_identification_descriptor_ignores_lu_id_type(rig: Rig, lu_id_type: int) -> None:
    """SPC-4 6.4.5.6: "The LU ID TYPE field shall be ignored in the Identification Descriptor
    CSCD descriptor" (SPC-3 had those bits reserved)."""
    src, dst = rig.node.luns[0], rig.node.luns[1]
    params = lid1([e4(src, lu_id_type=lu_id_type), e4(dst, lu_id_type=lu_id_type)],
                  [b2b(0, 1, 4, 0, 0)])
    assert xcopy(rig, params).ok()
    buf = bytearray(len(DATA))
    dst.backstore.read_into(memoryview(buf), 0)
    assert buf == DATA


def ipv4(lu_id_type: int, lun: int = 1) -> bytes:
    """IPv4 CSCD descriptor (SPC-4 7.6.3.8) naming LUN `lun` behind 127.0.0.1:3260 over TCP."""
    desc = bytearray(32)
    desc[0] = 0xE5
    desc[1] = lu_id_type << 6
    desc[4:6] = bytes((0x00, lun))  # peripheral device addressing
    desc[12:16] = bytes((127, 0, 0, 1))
    desc[16:18] = (3260).to_bytes(2, "big")
    desc[20:22] = (6).to_bytes(2, "big")  # TCP
    desc[29:32] = (512).to_bytes(3, "big")
    return bytes(desc)


@pytest.mark.parametrize("lu_id_type", [0b01, 0b10, 0b11])
def test_ipv4_descriptor_unsupported_lu_id_type(rig: Rig, lu_id_type: int) -> None:
    """SPC-4 6.4.5.1: only LU ID TYPE 00b (a LUN) is supported here; another value gives
    ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (byte 1 of the descriptor, bit 7)."""
    r = xcopy(rig, lid1([e4(rig.node.luns[0]), ipv4(lu_id_type)], [b2b(0, 1, 1, 0, 0)]))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 49, 7))
    assert untouched(rig)


def test_block_length_mismatch(rig: Rig) -> None:
    src, dst = rig.node.luns[0], rig.node.luns[1]
    r = xcopy(rig, lid1([e4(src), e4(dst, block_length=4096)], [b2b(0, 1, 1, 0, 0)]))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 77, 7))
    assert untouched(rig)


def test_segment_descriptor_length(rig: Rig) -> None:
    seg = bytearray(b2b(0, 1, 1, 0, 0))
    seg[3] = 0x14
    seg = seg[:24]
    r = xcopy(rig, lid1([e4(rig.node.luns[0]), e4(rig.node.luns[1])], [bytes(seg)]))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 82, 7))


def test_reserved_list_id_usage(rig: Rig) -> None:
    r = xcopy(rig, good_list(rig, usage=0b01))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 1, 4))


def test_inline_data_not_supported(rig: Rig) -> None:
    params = bytearray(good_list(rig)) + bytes(4)
    struct.pack_into(">I", params, 12, 4)
    r = xcopy(rig, bytes(params))
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INLINE_DATA_LENGTH_EXCEEDED, (False, 12, 7))


def copy_aborted(r, asc: Asc, pointer: int) -> None:  # type: ignore[no-untyped-def]
    assert (r.key, r.asc) == (SenseKey.COPY_ABORTED, asc)
    assert r.field_pointer == (False, pointer, None)
    assert int.from_bytes(r.sense[8:12], "big") == 0  # segment 0 (COMMAND-SPECIFIC INFORMATION)


def test_index_beyond_the_descriptors(rig: Rig) -> None:
    r = xcopy(rig, lid1([e4(rig.node.luns[0])], [b2b(0, 1, 4, 0, 0)]))
    copy_aborted(r, Asc.COPY_TARGET_DEVICE_NOT_REACHABLE, 16 + 32 + 6)
    assert untouched(rig)


@pytest.mark.parametrize("src_lba, dst_lba, pointer", [(8190, 0, 60), (0, 8191, 68)])
def test_lba_beyond_the_end(rig: Rig, src_lba: int, dst_lba: int, pointer: int) -> None:
    src, dst = rig.node.luns[0], rig.node.luns[1]
    r = xcopy(rig, lid1([e4(src), e4(dst)], [b2b(0, 1, 4, src_lba, dst_lba)]))
    copy_aborted(r, Asc.COPY_TARGET_DEVICE_NOT_REACHABLE, 16 + 64 + pointer - 48)
    assert untouched(rig)


def test_later_segment_out_of_range_moves_nothing(rig: Rig) -> None:
    src, dst = rig.node.luns[0], rig.node.luns[1]
    r = xcopy(rig, lid1([e4(src), e4(dst)], [b2b(0, 1, 4, 0, 0), b2b(0, 1, 4, 0, 8190)]))
    assert (r.key, r.asc) == (SenseKey.COPY_ABORTED, Asc.COPY_TARGET_DEVICE_NOT_REACHABLE)
    assert int.from_bytes(r.sense[8:12], "big") == 1
    assert untouched(rig)


def test_null_descriptor(rig: Rig) -> None:
    """Byte 1 bit 5, SPC-3's NUL bit, is obsolete in SPC-4 (table 132): a descriptor that sets
    it still names no unit to read or write, so no data moves."""
    src, dst = rig.node.luns[0], rig.node.luns[1]
    r = xcopy(rig, lid1([e4(src), e4(dst, nul=True)], [b2b(0, 1, 4, 0, 0)]))
    copy_aborted(r, Asc.COPY_TARGET_DEVICE_NOT_REACHABLE, 48)
    assert untouched(rig)


def test_designator_naming_no_unit(rig: Rig) -> None:
    desc = bytearray(e4(rig.node.luns[1]))
    desc[8:16] = bytes.fromhex("3fffffffffffffff")
    r = xcopy(rig, lid1([e4(rig.node.luns[0]), bytes(desc)], [b2b(0, 1, 4, 0, 0)]))
    copy_aborted(r, Asc.COPY_TARGET_DEVICE_NOT_REACHABLE, 48)
    assert untouched(rig)


def test_lid4_list_format(rig: Rig) -> None:
    src, dst = rig.node.luns[0], rig.node.luns[1]
    params = bytearray(lid4([e4(src), e4(dst)], [b2b(0, 1, 4, 0, 0)]))
    params[0] = 0x02
    r = xcopy(rig, bytes(params), sa_lid4=True)
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 0, 7))


def test_lid4_copies(rig: Rig) -> None:
    src, dst = rig.node.luns[0], rig.node.luns[1]
    assert xcopy(rig, lid4([e4(src), e4(dst)], [b2b(0, 1, 4, 0, 0)]), sa_lid4=True).ok()
    assert dst.stats_copy_paths


def test_reserved_cdb_bits(rig: Rig) -> None:
    cdb = bytearray(xcopy_cdb(0))
    cdb[5] = 1
    r = run(rig.node.luns[0], bytes(cdb), b"", NEXUS_A)
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_CDB, (True, 5, 0))
