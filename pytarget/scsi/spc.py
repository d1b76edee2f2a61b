"""Primary command handlers (SPC-4): INQUIRY, MODE SENSE/SELECT, REPORT LUNS, REQUEST SENSE,
REPORT SUPPORTED OPERATION CODES and TASK MANAGEMENT FUNCTIONS, TEST UNIT READY, RESERVE/RELEASE.

Handlers take (lu, task, cdb), raise SenseError on failure, and leave Data-In on the task.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from ..core import sense as S
from ..core.cdb import be16, be32
from ..core.sense import Asc, SenseKey, encode_sense
from . import vpd

if TYPE_CHECKING:
    from ..core.task import ScsiTask
    from .device import LogicalUnit

log = logging.getLogger("pytarget.scsi")


def reply(task: ScsiTask, data: bytes | bytearray, allocation_length: int) -> None:
    """Data-In of at most ALLOCATION LENGTH bytes (SPC-4 4.2.5.6)."""
    if len(data) > allocation_length:
        data = data[:allocation_length]
    task.set_data_in(data)


async def test_unit_ready(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    return None


async def inquiry(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    evpd = cdb[1] & 0x01
    page = cdb[2]
    alloc = be16(cdb, 3)
    if not evpd:
        if page:
            raise S.invalid_field_in_cdb(2, 7)
        reply(task, vpd.standard_inquiry(lu), alloc)
        return
    reply(task, vpd.page(lu, task, page), alloc)


async def request_sense(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    """REQUEST SENSE (SPC-4 6.39): a pending unit attention or the LU's current state."""
    descriptor = bool(cdb[1] & 0x01)
    alloc = cdb[4]
    if not lu.exists:
        data = encode_sense(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED, descriptor)
    else:
        asc = lu.take_unit_attention(task.nexus)
        if asc is not None:
            data = encode_sense(SenseKey.UNIT_ATTENTION, asc, descriptor)
        elif not lu.medium_present:
            data = encode_sense(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT, descriptor)
        else:
            data = encode_sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE, descriptor)
    reply(task, data, alloc)


async def report_luns(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    """REPORT LUNS (SPC-4 6.33): the LUNs this initiator may see."""
    select = cdb[2]
    alloc = be32(cdb, 6)
    if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise S.invalid_field_in_cdb(2, 7)
    if alloc < 16:
        raise S.invalid_field_in_cdb(6, 7)
    luns: list[int] = []
    if select in (0x00, 0x02, 0x11):
        luns = sorted(lu.directory.visible_luns(task.nexus))
        if select == 0x11 and 0 not in luns and lu.lun != 0:
            raise S.invalid_field_in_cdb(2, 7)
    body = bytearray()
    for lun in luns:
        if lun < 256:
            body += bytes((0, lun)) + bytes(6)
        else:
            body += bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)
    data = struct.pack(">II", len(body), 0) + body
    reply(task, data, alloc)
    # The LUN inventory is now known: REPORTED LUNS DATA HAS CHANGED is cleared for this I_T
    # nexus on every logical unit of the target (SPC-4 6.33).
    for unit in getattr(lu.directory, "luns", {}).values():
        queue = unit.ua.get(task.nexus.key)
        if queue and Asc.REPORTED_LUNS_DATA_HAS_CHANGED in queue:
            queue.remove(Asc.REPORTED_LUNS_DATA_HAS_CHANGED)


# ------------------------------------------------------------------ MODE SENSE / SELECT
def _block_descriptor(lu: LogicalUnit, long_lba: bool) -> bytes:
    if long_lba:
        return struct.pack(">QII", lu.nblocks, 0, lu.block_size)
    count = min(lu.nblocks, 0xFFFFFFFF)
    return struct.pack(">IBBH", count, 0, lu.block_size >> 16, lu.block_size & 0xFFFF)


def _device_specific(lu: LogicalUnit) -> int:
    """SBC-3 6.4.1: WP and DPOFUA."""
    return (0x80 if lu.write_protected else 0) | 0x10


async def mode_sense(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    ten = len(cdb) == 10
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    code = cdb[2] & 0x3F
    subpage = cdb[3]
    alloc = be16(cdb, 7) if ten else cdb[4]
    if pc == 3:
        raise S.saving_parameters_not_supported(2, 7)
    pages = lu.mode.sense_pages(pc, code, subpage)
    blockdesc = b"" if dbd else _block_descriptor(lu, llbaa)
    dsp = _device_specific(lu)
    if ten:
        length = 6 + len(blockdesc) + len(pages)
        header = struct.pack(">HBBBBH", length, 0, dsp, 1 if llbaa and blockdesc else 0, 0,
                             len(blockdesc))
    else:
        length = 3 + len(blockdesc) + len(pages)
        if length > 255:
            raise S.invalid_field_in_cdb(2, 5)
        header = bytes((length, 0, dsp, len(blockdesc)))
    reply(task, header + blockdesc + pages, alloc)


async def mode_select(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    ten = len(cdb) == 10
    if cdb[1] & 0x01:
        raise S.invalid_field_in_cdb(1, 0)  # SP: no saved pages
    length = be16(cdb, 7) if ten else cdb[4]
    if length == 0:
        return
    data = bytes(await task.receive_data_out(length))
    header_len = 8 if ten else 4
    if len(data) < header_len:
        raise S.parameter_list_length_error()
    if ten:
        bd_len = be16(data, 6)
        long_lba = bool(data[4] & 0x01)
    else:
        bd_len = data[3]
        long_lba = False
    if header_len + bd_len > len(data):
        raise S.parameter_list_length_error()
    if bd_len:
        size = 16 if long_lba else 8
        if bd_len != size:
            raise S.invalid_field_in_parameter_list(7 if ten else 3, 7)
        bd = data[header_len:header_len + bd_len]
        block_len = be32(bd, 12) if long_lba else int.from_bytes(bd[5:8], "big")
        if block_len != lu.block_size:
            raise S.invalid_field_in_parameter_list(header_len + (12 if long_lba else 5), 7)
        count = int.from_bytes(bd[0:8], "big") if long_lba else be32(bd, 0)
        if count not in (0, lu.nblocks, min(lu.nblocks, 0xFFFFFFFF)):
            raise S.invalid_field_in_parameter_list(header_len, 7)
    start = header_len + bd_len
    if lu.mode.select(data[start:], start):
        lu.establish_ua(Asc.MODE_PARAMETERS_CHANGED, skip=task.nexus)


# ------------------------------------------------------------------ REPORT SUPPORTED ...
async def report_supported_operation_codes(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), generated from the opcode table."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    sa = be16(cdb, 4)
    alloc = be32(cdb, 6)
    table = lu.table
    if options == 0:
        body = bytearray()
        for spec in table.specs:
            flags = (0x01 if spec.sa is not None else 0) | (0x02 if rctd else 0)
            body += struct.pack(">BxHxBH", spec.opcode, spec.sa or 0, flags, spec.cdb_len)
            if rctd:
                body += spec.timeouts_descriptor()
        reply(task, struct.pack(">I", len(body)) + body, alloc)
        return
    if options not in (1, 2, 3):
        raise S.invalid_field_in_cdb(2, 2)
    has_sa = table.has_service_actions(opcode)
    if options == 1 and has_sa:
        raise S.invalid_field_in_cdb(2, 2)
    if options == 2 and not has_sa and table.known_opcode(opcode):
        raise S.invalid_field_in_cdb(2, 2)
    if options == 1 or (options == 3 and not has_sa):
        spec = table.get(opcode, None)
        if options == 3 and sa:
            spec = None
    else:
        spec = table.get(opcode, sa)
    if spec is None:
        data = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    else:
        usage = spec.usage
        data = bytes((0, 0x03 | (0x80 if rctd else 0))) + struct.pack(">H", len(usage)) + usage
        if rctd:
            data += spec.timeouts_descriptor()
    reply(task, data, alloc)


async def report_supported_tmf(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 6.36)."""
    repd = bool(cdb[2] & 0x80)
    alloc = be32(cdb, 6)
    if alloc < 4:
        raise S.invalid_field_in_cdb(6, 7)
    # ATS ATSS CACAS CTSS LURS QTS TRS WAKES; then QAES QTSS ITNRS
    data = bytearray(16 if repd else 4)
    data[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02  # ATS, ATSS, CTSS, LURS, TRS
    if repd:
        data[3] = 0x0C
    reply(task, data, alloc)


async def report_target_port_groups(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    """REPORT TARGET PORT GROUPS (SPC-4 6.37): one group, active/optimized, implicit ALUA."""
    alloc = be32(cdb, 6)
    extended = (cdb[1] >> 5) == 1
    port = task.nexus
    desc = struct.pack(">BBHBBBB", 0x80, 0x01, port.tpgt, 0, 0, 0, 1)
    desc += struct.pack(">HH", 0, port.relative_port)
    if extended:
        data = struct.pack(">IBBH", len(desc) + 4, 0x10, 0, 0) + desc
    else:
        data = struct.pack(">I", len(desc)) + desc
    reply(task, data, alloc)


# ------------------------------------------------------------------ SPC-2 reservations
async def reserve(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    """RESERVE(6/10) (SPC-2 7.21): whole-LU reservation for this I_T nexus.

    It waits for every command queued before it that holds or waits for an LBA range, so a
    RESERVE never completes while an earlier COMPARE AND WRITE is pending.
    """
    if len(cdb) == 10 and cdb[1] & 0x02:
        raise S.invalid_field_in_cdb(1, 1)  # third-party reservations
    holder = lu.reservation
    if holder is not None and holder != task.nexus.key:
        raise S.reservation_conflict()
    if lu.persistent_reservation_active():
        raise S.reservation_conflict()
    async with lu.ranges.exclusive(0, 1 << 64):
        pass
    holder = lu.reservation
    if (holder is not None and holder != task.nexus.key) or lu.persistent_reservation_active():
        raise S.reservation_conflict()
    if holder is None:
        _reservation_log(lu, task, "RESERVE")
    lu.reservation = task.nexus.key


async def release(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    """RELEASE(6/10): only the holder's release has any effect; others get GOOD."""
    if len(cdb) == 10 and cdb[1] & 0x02:
        raise S.invalid_field_in_cdb(1, 1)
    if lu.persistent_reservation_active():
        raise S.reservation_conflict()
    if lu.reservation == task.nexus.key:
        lu.reservation = None
        _reservation_log(lu, task, "RELEASE")


def _reservation_log(lu: LogicalUnit, task: ScsiTask, action: str) -> None:
    nexus = task.nexus
    log.info("LUN %d: %s by %s", lu.lun, action, nexus.initiator_port_name,
             extra={"event": "reservation", "operation": action,
                    "initiator": nexus.initiator_port_name, "target": nexus.target_name,
                    "lun": lu.lun})
