"""Standard INQUIRY data and the vital product data pages (SPC-4 6.6, 7.8; SBC-4 6.6)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core import designators, limits
from ..core import sense as S
from ..core.designators import ascii_field

if TYPE_CHECKING:
    from ..core.task import Nexus, ScsiTask
    from .unit import Unit as LogicalUnit

# VERSION 06h: the device server and its copy manager follow SPC-4 (6.6.2),
# including its reading of the EXTENDED COPY CSCD descriptors (copy/descriptors.py).
VERSION = 0x06
VERSION_DESCRIPTORS = (
    0x00A0,  # SAM-5 (no version claimed)
    0x0460,  # SPC-4 (no version claimed)
    0x04C0,  # SBC-3 (no version claimed)
    0x0600,  # SBC-4 (no version claimed): SANITIZE, WRITE ATOMIC(16)
    0x0960,  # iSCSI (no version claimed)
)


def standard_inquiry(lu: LogicalUnit) -> bytes:
    data = bytearray(96)
    if not lu.exists:
        data[0] = 0x7F  # PERIPHERAL QUALIFIER 011b, type 1Fh: no LU at this LUN
    if lu.removable:
        data[1] = 0x80  # RMB
    data[2] = VERSION
    data[3] = 0x12  # HISUP, RESPONSE DATA FORMAT 2
    data[4] = len(data) - 5
    data[5] = 0x10 | (0x08 if lu.third_party_copy else 0)  # TPGS=01b implicit ALUA; 3PC
    data[7] = 0x02  # CMDQUE
    data[8:16] = ascii_field(lu.vendor, 8)
    data[16:32] = ascii_field(lu.product, 16)
    data[32:36] = ascii_field(lu.revision, 4)
    for i, desc in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", data, 58 + 2 * i, desc)
    return bytes(data)


def lu_designators(lu: LogicalUnit) -> list[bytes]:
    """Designators naming the logical unit itself, NAA first."""
    return designators.lu_designators(lu.naa, lu.vendor, lu.serial)


def port_designators(nexus: Nexus) -> list[bytes]:
    return designators.port_designators(nexus.relative_port, nexus.tpgt,
                                        nexus.target_port_name, nexus.target_name)


def _page(code: int, body: bytes, byte0: int = 0) -> bytes:
    return struct.pack(">BBH", byte0, code, len(body)) + body


def supported_pages(lu: LogicalUnit, task: ScsiTask) -> bytes:
    return bytes(lu.vpd_pages())


def unit_serial_number(lu: LogicalUnit, task: ScsiTask) -> bytes:
    return lu.serial.encode("ascii")


def device_identification(lu: LogicalUnit, task: ScsiTask) -> bytes:
    return b"".join(lu_designators(lu) + port_designators(task.nexus))


def extended_inquiry(lu: LogicalUnit, task: ScsiTask) -> bytes:
    """Extended INQUIRY Data (SPC-4 7.8.7): simple task attribute, volatile cache."""
    body = bytearray(60)
    body[1] = 0x01  # SIMPSUP
    body[2] = 0x01  # V_SUP: a volatile write cache exists (the page cache)
    return bytes(body)


def block_limits(lu: LogicalUnit, task: ScsiTask) -> bytes:
    """Block Limits (SBC-4 6.6.4): the values from `limits`, the unmap granularity and the
    atomic write unit from the backstore's capabilities."""
    bs = lu.block_size
    body = bytearray(60)
    body[1] = lu.max_compare_and_write_blocks
    struct.pack_into(">H", body, 2, max(1, 4096 // bs))  # OPTIMAL TRANSFER LENGTH GRANULARITY
    struct.pack_into(">I", body, 4, limits.MAX_TRANSFER_BYTES // bs)
    struct.pack_into(">I", body, 8, limits.OPTIMAL_TRANSFER_BYTES // bs)
    struct.pack_into(">I", body, 12, limits.MAX_PREFETCH_BYTES // bs)
    if lu.thin:
        struct.pack_into(">I", body, 16, limits.MAX_UNMAP_BLOCKS)
        struct.pack_into(">I", body, 20, limits.MAX_UNMAP_DESCRIPTORS)
        struct.pack_into(">I", body, 24, max(1, lu.caps.deallocate_granularity // bs))
        alignment = lu.caps.deallocate_alignment // bs
        struct.pack_into(">I", body, 28, 0x80000000 | alignment)  # UGAVALID
    struct.pack_into(">Q", body, 32, lu.max_write_same_blocks)
    unit = lu.atomic_write_blocks
    if unit:
        # SBC-4 6.6.4: MAXIMUM ATOMIC TRANSFER LENGTH, ATOMIC ALIGNMENT, ATOMIC TRANSFER LENGTH
        # GRANULARITY (one length, at multiples of itself: limits.ATOMIC_WRITE_BYTES); no
        # atomic boundaries (MAXIMUM ATOMIC TRANSFER LENGTH WITH ATOMIC BOUNDARY and MAXIMUM
        # ATOMIC BOUNDARY SIZE 0).
        struct.pack_into(">III", body, 40, unit, unit, unit)
    return bytes(body)


def block_device_characteristics(lu: LogicalUnit, task: ScsiTask) -> bytes:
    """Block Device Characteristics (SBC-4 6.6.2): non-rotating medium; WABEREQ 01b: a read
    after a SANITIZE BLOCK ERASE completes with GOOD status (zeros)."""
    body = bytearray(60)
    struct.pack_into(">H", body, 0, 0x0001)
    body[3] = 0x40  # WABEREQ 01b, WACEREQ 00b (no CRYPTOGRAPHIC ERASE)
    return bytes(body)


def logical_block_provisioning(lu: LogicalUnit, task: ScsiTask) -> bytes:
    """Logical Block Provisioning (SBC-3 6.6.4)."""
    body = bytearray(4)
    if lu.thin:
        body[1] = 0x80 | 0x40 | 0x20  # LBPU LBPWS LBPWS10
        if lu.caps.deallocated_reads_zero:
            body[1] |= 0x04  # LBPRZ
        body[2] = 0x02  # PROVISIONING TYPE: thin
    return bytes(body)


PAGES: dict[int, Callable[[LogicalUnit, ScsiTask], bytes]] = {
    0x00: supported_pages,
    0x80: unit_serial_number,
    0x83: device_identification,
    0x86: extended_inquiry,
    0xB0: block_limits,
    0xB1: block_device_characteristics,
    0xB2: logical_block_provisioning,
}


def page(lu: LogicalUnit, task: ScsiTask, code: int) -> bytes:
    builder = lu.vpd.get(code) if lu.exists else None
    if builder is None:
        raise S.invalid_field_in_cdb(2, 7)
    return _page(code, builder(lu, task))
