"""Big-endian integers in CDBs and parameter lists; named CDB fields are read through the
row's layout (`core.table.Cdb`)."""

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
