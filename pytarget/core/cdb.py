"""Reading CDB fields by their SBC/SPC names."""

from __future__ import annotations

import struct

_H = struct.Struct(">H")
_I = struct.Struct(">I")
_Q = struct.Struct(">Q")


def be16(b: bytes | memoryview, off: int) -> int:
    return _H.unpack_from(b, off)[0]


def be32(b: bytes | memoryview, off: int) -> int:
    return _I.unpack_from(b, off)[0]


def be64(b: bytes | memoryview, off: int) -> int:
    return _Q.unpack_from(b, off)[0]


def lba_and_length(cdb: bytes) -> tuple[int, int, int]:
    """(LBA, TRANSFER LENGTH, byte offset of the length field) by CDB size (SBC-3 5)."""
    n = len(cdb)
    if n == 6:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return lba, cdb[4], 4
    if n == 10:
        return be32(cdb, 2), be16(cdb, 7), 7
    if n == 12:
        return be32(cdb, 2), be32(cdb, 6), 6
    return be64(cdb, 2), be32(cdb, 10), 10


def allocation_length(cdb: bytes) -> int:
    """ALLOCATION LENGTH of the SPC commands that carry one at the usual place for their size."""
    n = len(cdb)
    if n == 6:
        return cdb[4]
    if n == 10:
        return be16(cdb, 7)
    if n == 12:
        return be32(cdb, 6)
    return be32(cdb, 10)
