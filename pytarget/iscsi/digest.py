"""CRC32C header and data digests (RFC 7143 13.1, appendix B.4).

The `crc32c` package computes CRC32C with SSE4.2/ARMv8 instructions (about 12-28 GB/s here);
`crcmod` is a table-driven fallback at about 0.4 GB/s, used only when `crc32c` is missing.
The digest travels least significant byte first.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

try:
    from crc32c import crc32c as _crc32c

    def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
        return _crc32c(data, value)

    IMPLEMENTATION = "crc32c"
except ImportError:  # pragma: no cover - exercised only without the crc32c package
    import crcmod.predefined

    _fn: Callable[..., int] = crcmod.predefined.mkCrcFun("crc-32c")

    def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
        return _fn(bytes(data), value)

    IMPLEMENTATION = "crcmod"

_LE = struct.Struct("<I")


def digest(parts: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """The 4-byte digest over the concatenation of parts, as sent on the wire."""
    value = 0
    for part in parts:
        value = crc32c(part, value)
    return _LE.pack(value)


def digest_value(raw: bytes | bytearray | memoryview) -> int:
    """The CRC carried in a received 4-byte digest field."""
    return _LE.unpack_from(raw)[0]
