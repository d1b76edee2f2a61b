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
from ..core.sense import Asc
from . import alua, vpd

if TYPE_CHECKING:
    from ..core.table import Cdb
    from ..core.task import ScsiTask
    from .unit import Unit as LogicalUnit

log = logging.getLogger("pytarget.scsi")


def reply(task: ScsiTask, data: bytes | bytearray, allocation_length: int) -> None:
    """Data-In of at most ALLOCATION LENGTH bytes (SPC-4 4.2.5.6)."""
    if len(data) > allocation_length:
        data = data[:allocation_length]
    task.set_data_in(data)


async def test_unit_ready(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    return None


async def inquiry(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    evpd = cdb[1] & 0x01
    page = cdb[2]
    alloc = cdb.allocation_length
    if not evpd:
        if page:
            raise S.invalid_field_in_cdb(2, 7)
        reply(task, vpd.standard_inquiry(lu), alloc)
        return
    reply(task, vpd.page(lu, task, page), alloc)


async def request_sense(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """REQUEST SENSE (SPC-4 6.39): a pending unit attention or the LU's current state: a
    sanitize in progress with its progress indication, or its failure (SBC-4 4.11)."""
    descriptor = bool(cdb[1] & 0x01)
    if not lu.exists:
        state = S.logical_unit_not_supported()
    else:
        asc = lu.take_unit_attention(task.nexus)
        sanitizing = lu.sanitize.request_sense() if lu.sanitize.active else None
        if asc is not None:
            state = S.unit_attention(asc)
        elif sanitizing is not None:
            state = sanitizing
        elif not lu.medium_present:
            state = S.not_ready(Asc.MEDIUM_NOT_PRESENT)
        else:
            state = S.no_sense()
    reply(task, state.encode(descriptor), cdb.allocation_length)


async def report_luns(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """REPORT LUNS (SPC-4 6.33): the LUNs this initiator may see."""
    select = cdb[2]
    alloc = cdb.allocation_length
    if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise S.invalid_field_in_cdb(2, 7)
    if alloc < 16:
        raise S.invalid_field_in_cdb(cdb.offset_of("allocation_length"), 7)
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


async def mode_sense_6(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """MODE SENSE(6) (SPC-4 6.11)."""
    await _mode_sense(lu, task, cdb, ten=False)


async def mode_sense_10(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """MODE SENSE(10) (SPC-4 6.12)."""
    await _mode_sense(lu, task, cdb, ten=True)


async def _mode_sense(lu: LogicalUnit, task: ScsiTask, cdb: Cdb, ten: bool) -> None:
    dbd = bool(cdb[1] & 0x08)
    llbaa = bool(cdb[1] & 0x10)  # MODE SENSE(10) only: reserved in MODE SENSE(6)
    pc = cdb[2] >> 6
    code = cdb[2] & 0x3F
    subpage = cdb[3]
    alloc = cdb.allocation_length
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


async def mode_select_6(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """MODE SELECT(6) (SPC-4 6.9)."""
    await _mode_select(lu, task, cdb, ten=False)


async def mode_select_10(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """MODE SELECT(10) (SPC-4 6.10)."""
    await _mode_select(lu, task, cdb, ten=True)


async def _mode_select(lu: LogicalUnit, task: ScsiTask, cdb: Cdb, ten: bool) -> None:
    if cdb[1] & 0x01:
        raise S.invalid_field_in_cdb(1, 0)  # SP: no saved pages
    length = cdb.parameter_list_length
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
async def report_supported_operation_codes(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), generated from the opcode table."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    sa = be16(cdb, 4)
    alloc = cdb.allocation_length
    table = lu.table
    if options == 0:
        body = bytearray()
        for row in table.specs:
            flags = (0x01 if row.sa is not None else 0) | (0x02 if rctd else 0)
            body += struct.pack(">BxHxBH", row.opcode, row.sa or 0, flags, row.cdb_len)
            if rctd:
                body += row.timeouts_descriptor()
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


async def report_supported_tmf(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 6.36)."""
    repd = bool(cdb[2] & 0x80)
    alloc = cdb.allocation_length
    if alloc < 4:
        raise S.invalid_field_in_cdb(cdb.offset_of("allocation_length"), 7)
    # ATS ATSS CACAS CTSS LURS QTS TRS WAKES; then QAES QTSS ITNRS
    data = bytearray(16 if repd else 4)
    data[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02  # ATS, ATSS, CTSS, LURS, TRS
    if repd:
        data[3] = 0x0C
    reply(task, data, alloc)


async def report_target_port_groups(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """REPORT TARGET PORT GROUPS (SPC-4 6.37): every target port group of the target with
    this LU's access state in it (`alua`), in the length-only or extended format."""
    parameter_data_format = cdb[1] >> 5
    if parameter_data_format not in (alua.FORMAT_LENGTH_ONLY, alua.FORMAT_EXTENDED):
        raise S.invalid_field_in_cdb(1, 7)
    reply(task, lu.alua.report(parameter_data_format), cdb.allocation_length)


# ------------------------------------------------------------------ SPC-2 reservations
async def reserve(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """RESERVE(6/10) (SPC-2 7.21): whole-LU reservation for this I_T nexus.

    It waits for every command queued before it that holds or waits for an LBA range, so a
    RESERVE never completes while an earlier COMPARE AND WRITE is pending.
    """
    holder = lu.reservation
    if holder is not None and holder != task.nexus.key:
        raise S.reservation_conflict()
    if lu.persistent_reservation_active():
        raise S.reservation_conflict()
    async with lu.ranges.exclusive(0, 1 << 64):
        pass
    if await lu.pr.reserve_unit(task.nexus):
        _reservation_log(lu, task, "RESERVE")


async def release(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """RELEASE(6/10): only the holder's release has any effect; others get GOOD."""
    if lu.persistent_reservation_active():
        raise S.reservation_conflict()
    if await lu.pr.release_unit(task.nexus.key):
        _reservation_log(lu, task, "RELEASE")


def _reservation_log(lu: LogicalUnit, task: ScsiTask, action: str) -> None:
    nexus = task.nexus
    log.info("LUN %d: %s by %s", lu.lun, action, nexus.initiator_port_name,
             extra={"event": "reservation", "operation": action,
                    "initiator": nexus.initiator_port_name, "target": nexus.target_name,
                    "lun": lu.lun})
