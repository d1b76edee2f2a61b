"""Initiator-side PDU builders: one function per request PDU type (RFC 7143 11).

Each builder packs a fresh 48-byte Basic Header Segment with the RFC's field names as
arguments; parsing of target PDUs stays in `pytarget.iscsi.pdu.Bhs`. Data segments, padding and
digests are added by the caller.
"""

from __future__ import annotations

import struct

from ..iscsi.pdu import (
    BHS_LEN,
    F_CMD_READ,
    F_CMD_WRITE,
    F_CONTINUE,
    F_FINAL,
    F_TRANSIT,
    RESERVED_TAG,
    Op,
)

IMMEDIATE = 0x40
_I = struct.Struct(">I")
_Q = struct.Struct(">Q")
_CMD_SN = struct.Struct(">II")  # CmdSN, ExpStatSN at offset 24


def _header(opcode: int, immediate: bool, flags: int, dsl: int, ahs_len: int = 0) -> bytearray:
    hdr = bytearray(BHS_LEN)
    hdr[0] = opcode | (IMMEDIATE if immediate else 0)
    hdr[1] = flags
    hdr[4] = ahs_len // 4
    hdr[5] = (dsl >> 16) & 0xFF
    hdr[6] = (dsl >> 8) & 0xFF
    hdr[7] = dsl & 0xFF
    return hdr


def login_request(*, transit: bool, cont: bool, csg: int, nsg: int, dsl: int, isid: bytes,
                  tsih: int, itt: int, cid: int, cmd_sn: int, exp_stat_sn: int,
                  version_max: int = 0, version_min: int = 0) -> bytearray:
    """Login Request (RFC 7143 11.12); the I bit is always set."""
    flags = (F_TRANSIT if transit else 0) | (F_CONTINUE if cont else 0) | (csg << 2) | nsg
    hdr = _header(Op.LOGIN_REQ, True, flags, dsl)
    hdr[2] = version_max
    hdr[3] = version_min
    hdr[8:14] = isid
    struct.pack_into(">H", hdr, 14, tsih)
    _I.pack_into(hdr, 16, itt)
    struct.pack_into(">H", hdr, 20, cid)
    _CMD_SN.pack_into(hdr, 24, cmd_sn, exp_stat_sn)
    return hdr


def text_request(*, final: bool, cont: bool, dsl: int, itt: int, ttt: int, cmd_sn: int,
                 exp_stat_sn: int, lun: int = 0, immediate: bool = False) -> bytearray:
    """Text Request (RFC 7143 11.10)."""
    flags = (F_FINAL if final else 0) | (F_CONTINUE if cont else 0)
    hdr = _header(Op.TEXT_REQ, immediate, flags, dsl)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, ttt)
    _CMD_SN.pack_into(hdr, 24, cmd_sn, exp_stat_sn)
    return hdr


def extended_cdb_ahs(cdb: bytes) -> bytes:
    """The Extended CDB AHS carrying CDB bytes 16 and on (RFC 7143 11.2.1.3)."""
    rest = cdb[16:]
    body = struct.pack(">HBB", len(rest) + 1, 1, 0) + rest
    return body + bytes(-len(body) & 3)


def scsi_command(*, lun: int, itt: int, edtl: int, cmd_sn: int, exp_stat_sn: int, cdb: bytes,
                 read: bool, write: bool, final: bool, attr: int, dsl: int,
                 ahs_len: int = 0, immediate: bool = False) -> bytearray:
    """SCSI Command (RFC 7143 11.3); F=1 means no unsolicited Data-Out follows."""
    flags = ((F_FINAL if final else 0) | (F_CMD_READ if read else 0)
             | (F_CMD_WRITE if write else 0) | (attr & 0x07))
    hdr = _header(Op.SCSI_CMD, immediate, flags, dsl, ahs_len)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, edtl)
    _CMD_SN.pack_into(hdr, 24, cmd_sn, exp_stat_sn)
    head = cdb[:16]
    hdr[32:32 + len(head)] = head
    return hdr


def data_out(*, final: bool, dsl: int, lun: int, itt: int, ttt: int, exp_stat_sn: int,
             data_sn: int, buffer_offset: int) -> bytearray:
    """SCSI Data-Out (RFC 7143 11.7)."""
    hdr = _header(Op.DATA_OUT, False, F_FINAL if final else 0, dsl)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, ttt)
    _I.pack_into(hdr, 28, exp_stat_sn)
    _I.pack_into(hdr, 36, data_sn)
    _I.pack_into(hdr, 40, buffer_offset)
    return hdr


def nop_out(*, itt: int, ttt: int, cmd_sn: int, exp_stat_sn: int, lun: int = 0, dsl: int = 0,
            immediate: bool = True) -> bytearray:
    """NOP-Out (RFC 7143 11.18): a ping (ITT valid) or an answer to a NOP-In (TTT valid)."""
    hdr = _header(Op.NOP_OUT, immediate, F_FINAL, dsl)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, ttt)
    _CMD_SN.pack_into(hdr, 24, cmd_sn, exp_stat_sn)
    return hdr


def task_mgmt_request(*, function: int, lun: int, itt: int, referenced_task_tag: int,
                      cmd_sn: int, exp_stat_sn: int, ref_cmd_sn: int = 0, exp_data_sn: int = 0,
                      immediate: bool = True) -> bytearray:
    """Task Management Function Request (RFC 7143 11.5)."""
    hdr = _header(Op.TASK_MGMT_REQ, immediate, F_FINAL | (function & 0x7F), 0)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, referenced_task_tag)
    _CMD_SN.pack_into(hdr, 24, cmd_sn, exp_stat_sn)
    _I.pack_into(hdr, 32, ref_cmd_sn)
    _I.pack_into(hdr, 36, exp_data_sn)
    return hdr


def logout_request(*, reason: int, itt: int, cid: int, cmd_sn: int, exp_stat_sn: int,
                   immediate: bool = True) -> bytearray:
    """Logout Request (RFC 7143 11.14)."""
    hdr = _header(Op.LOGOUT_REQ, immediate, F_FINAL | (reason & 0x7F), 0)
    _I.pack_into(hdr, 16, itt)
    struct.pack_into(">H", hdr, 20, cid)
    _CMD_SN.pack_into(hdr, 24, cmd_sn, exp_stat_sn)
    return hdr


def snack_request(*, snack_type: int, lun: int, itt: int, ttt: int, exp_stat_sn: int,
                  beg_run: int, run_length: int) -> bytearray:
    """SNACK Request (RFC 7143 11.16); this initiator sends it only to test targets."""
    hdr = _header(Op.SNACK_REQ, False, F_FINAL | (snack_type & 0x0F), 0)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, ttt)
    _I.pack_into(hdr, 28, exp_stat_sn)
    _I.pack_into(hdr, 40, beg_run)
    _I.pack_into(hdr, 44, run_length)
    return hdr


__all__ = ["IMMEDIATE", "RESERVED_TAG", "data_out", "extended_cdb_ahs", "login_request",
           "logout_request", "nop_out", "scsi_command", "snack_request", "task_mgmt_request",
           "text_request"]
