"""Designation descriptors naming logical units, ports and targets (SPC-4 7.8.6).

VPD 83h lists them; the copy manager matches CSCD descriptors against them and writes one into
each ROD token it creates.
"""

from __future__ import annotations

import struct

PROTOCOL_ISCSI = 0x5
CODE_BINARY = 1
CODE_ASCII = 2
CODE_UTF8 = 3
ASSOC_LU = 0
ASSOC_PORT = 1
ASSOC_TARGET = 2
TYPE_VENDOR = 0
TYPE_T10 = 1
TYPE_EUI64 = 2
TYPE_NAA = 3
TYPE_RELATIVE_PORT = 4
TYPE_PORT_GROUP = 5
TYPE_SCSI_NAME = 8


def ascii_field(text: str, width: int) -> bytes:
    """A left-aligned, space-padded ASCII field (SPC-4 4.4.1)."""
    return text.encode("ascii", "replace")[:width].ljust(width)


def designator(code_set: int, assoc: int, kind: int, value: bytes, piv: bool = False) -> bytes:
    proto = PROTOCOL_ISCSI << 4 if piv else 0
    return bytes((proto | code_set, (0x80 if piv else 0) | (assoc << 4) | kind, 0,
                  len(value))) + value


def scsi_name(text: str) -> bytes:
    """A SCSI name string: UTF-8, null-terminated, padded to a multiple of 4 (SPC-4 7.8.6.11)."""
    raw = text.encode() + b"\0"
    return raw + bytes(-len(raw) & 3)


def lu_designators(naa: bytes, vendor: str, serial: str) -> list[bytes]:
    """Designators naming a logical unit itself, NAA first (the one copy managers use)."""
    return [
        designator(CODE_BINARY, ASSOC_LU, TYPE_NAA, naa),
        designator(CODE_ASCII, ASSOC_LU, TYPE_T10, ascii_field(vendor, 8) + serial.encode()),
        designator(CODE_UTF8, ASSOC_LU, TYPE_SCSI_NAME, scsi_name("naa." + naa.hex().upper())),
    ]


def port_designators(relative_port: int, tpgt: int, target_port_name: str,
                     target_name: str) -> list[bytes]:
    """Designators of the target port a command came through and of its target."""
    return [
        designator(CODE_BINARY, ASSOC_PORT, TYPE_RELATIVE_PORT,
                   struct.pack(">HH", 0, relative_port), piv=True),
        designator(CODE_BINARY, ASSOC_PORT, TYPE_PORT_GROUP, struct.pack(">HH", 0, tpgt),
                   piv=True),
        designator(CODE_UTF8, ASSOC_PORT, TYPE_SCSI_NAME, scsi_name(target_port_name), piv=True),
        designator(CODE_UTF8, ASSOC_TARGET, TYPE_SCSI_NAME, scsi_name(target_name), piv=True),
    ]
