"""What the copy manager tells initiators about itself: VPD 8Fh (Third-party Copy, SPC-4
7.8.17), VPD 85h (Management Network Addresses, SPC-4 7.8.9) and RECEIVE COPY RESULTS'
OPERATING PARAMETERS (SPC-4 6.18.4). Every number comes from `core.limits`, which the parser
and the token code enforce.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..core import limits
from ..core.table import Opcode
from .descriptors import CSCD_ID_SELF, SUPPORTED_CSCD_TYPES, SUPPORTED_SEGMENT_TYPES
from .tokens import ROD_TYPE_AUR, ROD_TYPE_BLOCK_ZERO

if TYPE_CHECKING:
    from .unit import LogicalUnit

IMPLEMENTED_DESCRIPTORS = bytes(sorted((*SUPPORTED_SEGMENT_TYPES, *SUPPORTED_CSCD_TYPES)))

COPY_SERVICE = 0x06  # SERVICE TYPE of a copy service (SPC-4 7.8.9 table 663)


def _descriptor(kind: int, body: bytes) -> bytes:
    body += bytes(-(len(body) + 4) % 4)
    return struct.pack(">HH", kind, len(body)) + body


def supported_commands(lu: LogicalUnit) -> bytes:
    """Copy commands and their service actions, from the opcode table."""
    listed = bytearray()
    for opcode in (Opcode.EXTENDED_COPY, Opcode.RECEIVE_COPY_RESULTS):
        actions = sorted(s.sa for s in lu.table.specs if s.opcode == opcode and s.sa is not None)
        if actions:
            listed += bytes((opcode, len(actions), *actions))
    return bytes((len(listed),)) + bytes(listed)


def block_device_rod_limits(lu: LogicalUnit) -> bytes:
    bs = lu.block_size
    return bytes(6) + struct.pack(">HIIQQ", limits.MAX_ROD_RANGES, limits.MAX_INACTIVITY_TIMEOUT,
                                  limits.DEFAULT_INACTIVITY_TIMEOUT,
                                  limits.MAX_TOKEN_TRANSFER_BYTES // bs,
                                  limits.OPTIMAL_TOKEN_TRANSFER_BYTES // bs)


def rod_token_features(lu: LogicalUnit) -> bytes:
    block = struct.pack(">BxHxxHQQQQ8x", 0x00, 0x2C, 1, limits.MAX_TOKEN_TRANSFER_BYTES,
                        limits.OPTIMAL_TOKEN_TRANSFER_BYTES, limits.OPTIMAL_TOKEN_TRANSFER_BYTES,
                        limits.COPY_CHUNK_MAX_BYTES)
    return (bytes(12) + struct.pack(">III", limits.MIN_TOKEN_LIFETIME, limits.MAX_TOKEN_LIFETIME,
                                    limits.MAX_INACTIVITY_TIMEOUT)
            + bytes(18) + struct.pack(">H", len(block)) + block)


def supported_rod_types(lu: LogicalUnit) -> bytes:
    types = (struct.pack(">IBxH56x", ROD_TYPE_AUR, 0x02 | 0x01, 0),  # TOKEN_IN, TOKEN_OUT
             struct.pack(">IBxH56x", ROD_TYPE_BLOCK_ZERO, 0x02, 0))  # TOKEN_IN only
    body = b"".join(types)
    return struct.pack(">xxH", len(body)) + body


def parameter_data(lu: LogicalUnit) -> bytes:
    return bytes(4) + struct.pack(">HHII12x", limits.MAX_CSCD_DESCRIPTORS,
                                  limits.MAX_SEGMENT_DESCRIPTORS,
                                  limits.MAX_DESCRIPTOR_LIST_BYTES, limits.MAX_INLINE_DATA_BYTES)


def general_copy_operations(lu: LogicalUnit) -> bytes:
    return struct.pack(">IIIBB18x", limits.MAX_CONCURRENT_COPIES, limits.MAX_CONCURRENT_COPIES,
                       limits.MAX_SEGMENT_BYTES, granularity(lu), 0)


def granularity(lu: LogicalUnit) -> int:
    """DATA SEGMENT GRANULARITY: log2 of the logical block size."""
    return lu.block_size.bit_length() - 1


def third_party_copy_page(lu: LogicalUnit) -> bytes:
    """VPD 8Fh body: one descriptor per capability (SPC-4 7.8.17.1)."""
    parts = [
        _descriptor(0x0000, block_device_rod_limits(lu)),
        _descriptor(0x0001, supported_commands(lu)),
        _descriptor(0x0004, parameter_data(lu)),
        _descriptor(0x0008, bytes((len(IMPLEMENTED_DESCRIPTORS),)) + IMPLEMENTED_DESCRIPTORS),
        _descriptor(0x000C, struct.pack(">HH", 2, CSCD_ID_SELF)),
        _descriptor(0x0106, rod_token_features(lu)),
        _descriptor(0x0108, supported_rod_types(lu)),
        _descriptor(0x8001, general_copy_operations(lu)),
    ]
    return b"".join(parts)


def operating_parameters(lu: LogicalUnit) -> bytes:
    """RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 6.18.4 table 385)."""
    body = struct.pack(">BxxxHHIIIIIxxHBBBBxxxB", 0x01,  # SNLID: LID4 supported
                       limits.MAX_CSCD_DESCRIPTORS, limits.MAX_SEGMENT_DESCRIPTORS,
                       limits.MAX_DESCRIPTOR_LIST_BYTES, limits.MAX_SEGMENT_BYTES,
                       limits.MAX_INLINE_DATA_BYTES, limits.HELD_DATA_LIMIT_BYTES, 0,
                       limits.MAX_CONCURRENT_COPIES, min(limits.MAX_CONCURRENT_COPIES, 255),
                       granularity(lu), 0, 0, len(IMPLEMENTED_DESCRIPTORS))
    body += IMPLEMENTED_DESCRIPTORS
    return struct.pack(">I", len(body)) + body


def management_network_addresses(entries: list[tuple[int, str]]) -> bytes:
    """VPD 85h body: (SERVICE TYPE, URL) entries, the copy service on each portal among them."""
    body = bytearray()
    for kind, url in entries:
        text = url.encode() + b"\0"
        text += bytes(-len(text) % 4)
        body += struct.pack(">BxH", kind & 0x1F, len(text)) + text  # ASSOCIATION 00b: the LU
    return bytes(body)
