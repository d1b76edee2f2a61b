"""EXTENDED COPY parameter lists (SPC-4 6.4.3, 6.4.4): header, CSCD descriptors, segment
descriptors, parsed into frozen dataclasses.

Parsing checks what can be checked without looking at any logical unit, in the order libiscsi's
conformance suite and SPC-4 expect: lengths first (PARAMETER LIST LENGTH ERROR), then counts
(TOO MANY TARGET / SEGMENT DESCRIPTORS), then each descriptor's type and fields. Every error is a
`SenseError` whose field pointer is the byte offset in the parameter list.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum

from ..core import limits
from ..core import sense as S
from ..core.cdb import be16, be32, be64
from ..core.sense import Asc

LID1_HEADER = 16
LID4_HEADER = 48
CSCD_SIZE = 32
CSCD_LONG_SIZE = 64
CSCD_ID_SELF = 0xFFFF  # the logical unit that holds the copy manager (SPC-4 6.4.5.1)
DESIGNATOR_MAX = 20
IP_PROTOCOL_TCP = 6


class ListIdUsage(IntEnum):
    """LIST ID USAGE (SPC-4 6.4.3.2 table 112)."""

    HOLD = 0b00  # hold status for RECEIVE COPY RESULTS; identifier unique
    RESERVED = 0b01
    NO_HOLD = 0b10  # status while active only; identifier unique
    NONE = 0b11  # no status at all; identifier ignored


class CscdType(IntEnum):
    IDENTIFICATION = 0xE4
    IPV4 = 0xE5
    IPV6 = 0xEA


class SegmentType(IntEnum):
    BLOCK_TO_BLOCK = 0x02
    VERIFY_CSCD = 0x07
    BLOCK_TO_BLOCK_OFFSET = 0x0A


SUPPORTED_CSCD_TYPES = tuple(CscdType)
SUPPORTED_SEGMENT_TYPES = tuple(SegmentType)
_SEGMENT_LENGTH = {SegmentType.BLOCK_TO_BLOCK: 0x18, SegmentType.VERIFY_CSCD: 0x08,
                   SegmentType.BLOCK_TO_BLOCK_OFFSET: 0x1C}
_LONG_CSCD_TYPES = frozenset({0xEA, 0xFE, 0xFF})  # 64-byte CSCD descriptors


@dataclass(frozen=True)
class Cscd:
    """One copy source/destination descriptor; `at` is its offset in the parameter list."""

    index: int
    at: int
    type: int
    nul: bool
    device_type: int
    block_length: int  # 0: the resolved logical unit's own
    pad: bool
    designator_type: int = 0  # E4h
    code_set: int = 0
    designator: bytes = b""
    address: str = ""  # E5h/EAh
    port: int = 0
    lun: int = 0


@dataclass(frozen=True)
class Segment:
    """One segment descriptor; lengths are in blocks of the side DC names."""

    index: int
    at: int
    type: SegmentType
    src: int
    dst: int
    dc: bool = False
    cat: bool = False
    blocks: int = 0
    src_lba: int = 0
    dst_lba: int = 0
    src_offset: int = 0
    dst_offset: int = 0
    test_unit_ready: bool = False


@dataclass(frozen=True)
class CopyList:
    """A parsed EXTENDED COPY parameter list."""

    lid4: bool
    list_id: int
    usage: ListIdUsage
    priority: int
    immediate: bool
    cscds: tuple[Cscd, ...]
    segments: tuple[Segment, ...]


def parse(data: bytes | memoryview, lid4: bool) -> CopyList:
    """Parse and check a whole parameter list (its length is the PARAMETER LIST LENGTH)."""
    data = bytes(data)
    header = LID4_HEADER if lid4 else LID1_HEADER
    if len(data) < header:
        raise S.parameter_list_length_error()
    if lid4:
        if data[0] != 0x01:
            raise S.invalid_field_in_parameter_list(0, 7)  # LIST FORMAT
        if be16(data, 2):
            raise S.invalid_field_in_parameter_list(2, 7)  # no header CSCD descriptors
        list_id = be32(data, 20)
        immediate = bool(data[15] & 0x01)
        cscd_len, seg_len, inline_len = be16(data, 42), be16(data, 44), be16(data, 46)
        at_cscd_len, at_seg_len, at_inline = 42, 44, 46
    else:
        list_id = data[0]
        immediate = False
        cscd_len, seg_len, inline_len = be16(data, 2), be32(data, 8), be32(data, 12)
        at_cscd_len, at_seg_len, at_inline = 2, 8, 12
    flags = data[1]
    usage = ListIdUsage((flags >> 3) & 0x03)
    priority = flags & 0x07
    if header + cscd_len + seg_len + inline_len > len(data):
        raise S.parameter_list_length_error()
    if cscd_len + seg_len > limits.MAX_DESCRIPTOR_LIST_BYTES:
        raise S.parameter_list_length_error()
    if inline_len > limits.MAX_INLINE_DATA_BYTES:
        raise S.parameter_list_error(Asc.INLINE_DATA_LENGTH_EXCEEDED, at_inline, 7)
    if usage is ListIdUsage.RESERVED:
        raise S.invalid_field_in_parameter_list(1, 4)
    cscd_at = header
    seg_at = header + cscd_len
    cscd_bounds = _walk_cscds(data, cscd_at, cscd_len, at_cscd_len)
    seg_bounds = _walk_segments(data, seg_at, seg_len, at_seg_len)
    if len(cscd_bounds) > limits.MAX_CSCD_DESCRIPTORS:
        raise S.parameter_list_error(Asc.TOO_MANY_TARGET_DESCRIPTORS, at_cscd_len, 7)
    if len(seg_bounds) > limits.MAX_SEGMENT_DESCRIPTORS:
        raise S.parameter_list_error(Asc.TOO_MANY_SEGMENT_DESCRIPTORS, at_seg_len, 7)
    cscds = tuple(_cscd(data, i, at) for i, at in enumerate(cscd_bounds))
    segments = tuple(_segment(data, i, at) for i, at in enumerate(seg_bounds))
    return CopyList(lid4, list_id, usage, priority, immediate, cscds, segments)


def _walk_cscds(data: bytes, start: int, length: int, at_length: int) -> list[int]:
    bounds = []
    at = start
    while at < start + length:
        size = CSCD_LONG_SIZE if data[at] in _LONG_CSCD_TYPES else CSCD_SIZE
        if at + size > start + length:
            raise S.invalid_field_in_parameter_list(at_length, 7)
        bounds.append(at)
        at += size
    return bounds


def _walk_segments(data: bytes, start: int, length: int, at_length: int) -> list[int]:
    bounds = []
    at = start
    while at < start + length:
        if at + 4 > start + length:
            raise S.invalid_field_in_parameter_list(at_length, 7)
        size = 4 + be16(data, at + 2)
        if at + size > start + length:
            raise S.invalid_field_in_parameter_list(at + 2, 7)
        bounds.append(at)
        at += size
    return bounds


def _device_parameters(data: bytes, at: int, size: int) -> tuple[bool, int]:
    """(PAD, DISK BLOCK LENGTH) from the block device type specific parameters (SPC-4 6.4.5.2)."""
    dtsp = at + size - 4
    return bool(data[dtsp] & 0x04), int.from_bytes(data[dtsp + 1:dtsp + 4], "big")


def _cscd(data: bytes, index: int, at: int) -> Cscd:
    kind = data[at]
    if kind not in SUPPORTED_CSCD_TYPES:
        raise S.parameter_list_error(Asc.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, at, 7)
    lu_id_type = data[at + 1] >> 6
    # byte 1 bit 5 is obsolete in SPC-4 (table 132); it was SPC-3's NUL bit, and a descriptor
    # that sets it still moves no data (engine: COPY TARGET DEVICE NOT REACHABLE)
    nul = bool(data[at + 1] & 0x20)
    device_type = data[at + 1] & 0x1F
    if device_type != 0x00:
        raise S.invalid_field_in_parameter_list(at + 1, 4)  # only direct-access block devices
    size = CSCD_LONG_SIZE if kind in _LONG_CSCD_TYPES else CSCD_SIZE
    pad, block_length = _device_parameters(data, at, size)
    if data[at + size - 4] & ~0x04:
        raise S.invalid_field_in_parameter_list(at + size - 4, 7)
    if kind == CscdType.IDENTIFICATION:
        # the LU ID TYPE field is ignored here: there is no LU IDENTIFIER (SPC-4 6.4.5.6)
        code_set = data[at + 4] & 0x0F
        assoc = (data[at + 5] >> 4) & 0x03
        dtype = data[at + 5] & 0x0F
        length = data[at + 7]
        if assoc != 0:
            raise S.invalid_field_in_parameter_list(at + 5, 5)  # must name a logical unit
        if length > DESIGNATOR_MAX or length == 0:
            raise S.invalid_field_in_parameter_list(at + 7, 7)
        designator = data[at + 8:at + 8 + length]
        return Cscd(index, at, kind, nul, device_type, block_length, pad, dtype, code_set,
                    designator)
    if lu_id_type != 0:
        # only 00b (a LUN) is supported; others: INVALID FIELD IN PARAMETER LIST (SPC-4 6.4.5.1)
        raise S.invalid_field_in_parameter_list(at + 1, 7)
    lun = _decode_lun(data[at + 4:at + 12])
    if lun is None:
        raise S.invalid_field_in_parameter_list(at + 4, 7)
    if kind == CscdType.IPV4:
        address = str(ipaddress.IPv4Address(data[at + 12:at + 16]))
        port, protocol = be16(data, at + 16), be16(data, at + 20)
        protocol_at = at + 20
    else:
        address = str(ipaddress.IPv6Address(data[at + 12:at + 28]))
        port, protocol = be16(data, at + 28), be16(data, at + 32)
        protocol_at = at + 32
    if protocol != IP_PROTOCOL_TCP:
        raise S.invalid_field_in_parameter_list(protocol_at, 7)
    return Cscd(index, at, kind, nul, device_type, block_length, pad, address=address,
                port=port, lun=lun)


def _decode_lun(field: bytes) -> int | None:
    """Peripheral (00b) or flat (01b) single-level LUN (SAM-5 4.7)."""
    if any(field[2:]):
        return None
    method = field[0] >> 6
    if method == 0 and field[0] == 0:
        return field[1]
    if method == 1:
        return ((field[0] & 0x3F) << 8) | field[1]
    return None


def _segment(data: bytes, index: int, at: int) -> Segment:
    kind = data[at]
    if kind not in SUPPORTED_SEGMENT_TYPES:
        raise S.parameter_list_error(Asc.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, at, 7)
    kind = SegmentType(kind)
    if be16(data, at + 2) != _SEGMENT_LENGTH[kind]:
        raise S.invalid_field_in_parameter_list(at + 2, 7)
    if kind is SegmentType.VERIFY_CSCD:
        if data[at + 1] or data[at + 8] & ~0x01:
            raise S.invalid_field_in_parameter_list(at + (1 if data[at + 1] else 8), 7)
        return Segment(index, at, kind, be16(data, at + 4), CSCD_ID_SELF,
                       test_unit_ready=bool(data[at + 8] & 0x01))
    if data[at + 1] & ~0x03:
        raise S.invalid_field_in_parameter_list(at + 1, 7)
    seg = Segment(index, at, kind, be16(data, at + 4), be16(data, at + 6),
                  dc=bool(data[at + 1] & 0x02), cat=bool(data[at + 1] & 0x01),
                  blocks=be16(data, at + 10), src_lba=be64(data, at + 12),
                  dst_lba=be64(data, at + 20))
    if kind is SegmentType.BLOCK_TO_BLOCK_OFFSET:
        seg = Segment(index, at, kind, seg.src, seg.dst, seg.dc, seg.cat, seg.blocks,
                      seg.src_lba, seg.dst_lba, be16(data, at + 28), be16(data, at + 30))
    return seg
