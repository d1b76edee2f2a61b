"""iSCSI PDU codec: the 48-byte Basic Header Segment of every PDU type (RFC 7143 11).

Incoming headers are unpacked once into a `Bhs` whose fields carry the RFC's names; outgoing
headers are packed straight into a fresh 48-byte bytearray by one builder per target PDU type.
Data segments never pass through this module: callers hand them to the transport as views.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from ..core.task import TaskAttr

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF
MAX_DATA_SEGMENT = (1 << 24) - 1


class Op(IntEnum):
    """PDU opcodes (RFC 7143 11.1.1)."""

    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TASK_MGMT_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK_REQ = 0x10
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TASK_MGMT_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC_MSG = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(
    {Op.NOP_OUT, Op.SCSI_CMD, Op.TASK_MGMT_REQ, Op.LOGIN_REQ, Op.TEXT_REQ, Op.DATA_OUT,
     Op.LOGOUT_REQ, Op.SNACK_REQ}
)


class RejectReason(IntEnum):
    """Reject PDU reason codes (RFC 7143 11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(IntEnum):
    """Task management function codes (RFC 7143 11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """Task management response codes (RFC 7143 11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    TASK_REASSIGN_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResponse(IntEnum):
    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class AsyncEvent(IntEnum):
    SCSI_ASYNC_EVENT = 0
    REQUEST_LOGOUT = 1
    DROP_CONNECTION = 2
    DROP_ALL_CONNECTIONS = 3
    REQUEST_NEGOTIATION = 4


class LoginStage(IntEnum):
    """CSG and NSG of a Login PDU (RFC 7143 11.12.3); 2 is reserved."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic a < b (RFC 1982, 32 bits; CmdSN, StatSN, DataSN: RFC 7143
    4.2.2.1)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


class WireTaskAttr(IntEnum):
    """ATTR field of the SCSI Command PDU (RFC 7143 11.3.1): iSCSI's numbering, which differs
    from SAM's (`core.task.TaskAttr`); `TASK_ATTRS` maps one onto the other."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


# ATTR on the wire -> the SAM-5 task attribute (8.6); an untagged task is a simple one
# (RFC 7143 11.3.1), as are the values 5-7 the RFC reserves.
TASK_ATTRS = {WireTaskAttr.UNTAGGED: TaskAttr.SIMPLE, WireTaskAttr.SIMPLE: TaskAttr.SIMPLE,
              WireTaskAttr.ORDERED: TaskAttr.ORDERED,
              WireTaskAttr.HEAD_OF_QUEUE: TaskAttr.HEAD_OF_QUEUE, WireTaskAttr.ACA: TaskAttr.ACA,
              5: TaskAttr.SIMPLE, 6: TaskAttr.SIMPLE, 7: TaskAttr.SIMPLE}
WIRE_TASK_ATTRS = {TaskAttr.SIMPLE: WireTaskAttr.SIMPLE, TaskAttr.ORDERED: WireTaskAttr.ORDERED,
                   TaskAttr.HEAD_OF_QUEUE: WireTaskAttr.HEAD_OF_QUEUE,
                   TaskAttr.ACA: WireTaskAttr.ACA}


# Flags of byte 1.
F_FINAL = 0x80
F_CMD_READ = 0x40
F_CMD_WRITE = 0x20
F_CONTINUE = 0x40  # Login/Text C bit
F_TRANSIT = 0x80  # Login T bit
F_DATAIN_ACK = 0x40
F_RSP_BIDI_OVERFLOW = 0x10
F_RSP_BIDI_UNDERFLOW = 0x08
F_OVERFLOW = 0x04
F_UNDERFLOW = 0x02
F_DATAIN_STATUS = 0x01

_BHS = struct.Struct(">BBBBIQIIIIIIII")


class Bhs:
    """A parsed Basic Header Segment.

    Byte ranges shared by many opcodes are unpacked as 32-bit words and exposed under the RFC
    field names of the opcodes that use them; `raw` keeps the header bytes for Reject PDUs and
    for fields (CDB, ISID) read as bytes.
    """

    __slots__ = ("raw", "opcode", "immediate", "flags", "b2", "b3", "total_ahs_length",
                 "data_segment_length", "lun", "itt", "w20", "w24", "w28", "w32", "w36",
                 "w40", "w44")

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        (b0, self.flags, self.b2, self.b3, lens, self.lun, self.itt, self.w20, self.w24,
         self.w28, self.w32, self.w36, self.w40, self.w44) = _BHS.unpack_from(raw)
        self.raw = bytes(raw[:BHS_LEN])
        self.opcode = b0 & 0x3F
        self.immediate = bool(b0 & 0x40)
        self.total_ahs_length = (lens >> 24) * 4
        self.data_segment_length = lens & 0xFFFFFF

    # Field names by opcode (RFC 7143 11.2 - 11.18).
    @property
    def final(self) -> bool:
        return bool(self.flags & F_FINAL)

    @property
    def ttt(self) -> int:
        return self.w20

    @property
    def expected_data_transfer_length(self) -> int:
        return self.w20

    @property
    def referenced_task_tag(self) -> int:
        return self.w20

    @property
    def cid(self) -> int:
        return self.w20 >> 16

    @property
    def cmd_sn(self) -> int:
        return self.w24

    @property
    def exp_stat_sn(self) -> int:
        return self.w28

    @property
    def ref_cmd_sn(self) -> int:
        return self.w32

    @property
    def data_sn(self) -> int:
        return self.w36

    @property
    def buffer_offset(self) -> int:
        return self.w40

    @property
    def cdb(self) -> bytes:
        return self.raw[32:48]

    @property
    def isid(self) -> bytes:
        return self.raw[8:14]

    @property
    def tsih(self) -> int:
        return self.lun & 0xFFFF

    @property
    def version_max(self) -> int:
        return self.b2

    @property
    def version_min(self) -> int:
        return self.b3

    def __repr__(self) -> str:
        try:
            name = Op(self.opcode).name
        except ValueError:
            name = f"0x{self.opcode:02x}"
        return f"<Bhs {name} itt=0x{self.itt:08x} dsl={self.data_segment_length}>"


def _header(opcode: int, flags: int, dsl: int) -> bytearray:
    hdr = bytearray(BHS_LEN)
    hdr[0] = opcode
    hdr[1] = flags
    hdr[5] = (dsl >> 16) & 0xFF
    hdr[6] = (dsl >> 8) & 0xFF
    hdr[7] = dsl & 0xFF
    return hdr


_I = struct.Struct(">I")
_Q = struct.Struct(">Q")
_SEQ = struct.Struct(">III")  # StatSN, ExpCmdSN, MaxCmdSN at offset 24


def encode_lun(lun: int) -> int:
    """SAM-5 4.7: single-level LUN in peripheral (<256) or flat space addressing."""
    if lun < 256:
        return lun << 48
    return (0x4000 | (lun & 0x3FFF)) << 48


def decode_lun(field: int) -> int | None:
    """The LUN addressed by an 8-byte LUN field, or None for a form this target never assigns."""
    if field & 0x0000FFFFFFFFFFFF:
        return None
    top = field >> 48
    method = top >> 14
    if method == 0:
        return None if top & 0x3F00 else top & 0xFF
    if method == 1:
        return top & 0x3FFF
    return None


def nop_in(itt: int, ttt: int, lun: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
           dsl: int = 0) -> bytearray:
    hdr = _header(Op.NOP_IN, F_FINAL, dsl)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, ttt)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    return hdr


# The two headers of every command's response are packed whole, in one call, in the BHS
# layout (`_BHS`; TotalAHSLength is zero, so bytes 4-7 hold DataSegmentLength).
_SCSI_RSP = int(Op.SCSI_RSP)
_DATA_IN = int(Op.DATA_IN)


def scsi_response(itt: int, status: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
                  residual_flags: int, residual: int, dsl: int, exp_data_sn: int,
                  response: int = 0) -> bytes:
    return _BHS.pack(_SCSI_RSP, F_FINAL | residual_flags, response, status, dsl & 0xFFFFFF, 0,
                     itt, 0, stat_sn, exp_cmd_sn, max_cmd_sn, exp_data_sn, 0, residual)


def data_in(itt: int, flags: int, status: int, dsl: int, lun: int, stat_sn: int,
            exp_cmd_sn: int, max_cmd_sn: int, data_sn: int, buffer_offset: int,
            residual: int) -> bytes:
    return _BHS.pack(_DATA_IN, flags, 0, status if flags & F_DATAIN_STATUS else 0,
                     dsl & 0xFFFFFF, lun, itt, RESERVED_TAG, stat_sn, exp_cmd_sn, max_cmd_sn,
                     data_sn, buffer_offset, residual)


def r2t(itt: int, ttt: int, lun: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
        r2t_sn: int, buffer_offset: int, desired_length: int) -> bytearray:
    hdr = _header(Op.R2T, F_FINAL, 0)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, ttt)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    _I.pack_into(hdr, 36, r2t_sn)
    _I.pack_into(hdr, 40, buffer_offset)
    _I.pack_into(hdr, 44, desired_length)
    return hdr


def task_mgmt_response(itt: int, response: int, stat_sn: int, exp_cmd_sn: int,
                       max_cmd_sn: int) -> bytearray:
    hdr = _header(Op.TASK_MGMT_RSP, F_FINAL, 0)
    hdr[2] = response
    _I.pack_into(hdr, 16, itt)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    return hdr


def login_response(flags: int, version_max: int, version_active: int, dsl: int, isid: bytes,
                   tsih: int, itt: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
                   status_class: int, status_detail: int) -> bytearray:
    hdr = _header(Op.LOGIN_RSP, flags, dsl)
    hdr[2] = version_max
    hdr[3] = version_active
    hdr[8:14] = isid
    hdr[14] = tsih >> 8
    hdr[15] = tsih & 0xFF
    _I.pack_into(hdr, 16, itt)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    hdr[36] = status_class
    hdr[37] = status_detail
    return hdr


def text_response(flags: int, dsl: int, lun: int, itt: int, ttt: int, stat_sn: int,
                  exp_cmd_sn: int, max_cmd_sn: int) -> bytearray:
    hdr = _header(Op.TEXT_RSP, flags, dsl)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, itt)
    _I.pack_into(hdr, 20, ttt)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    return hdr


def logout_response(itt: int, response: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
                    time2wait: int = 0, time2retain: int = 0) -> bytearray:
    hdr = _header(Op.LOGOUT_RSP, F_FINAL, 0)
    hdr[2] = response
    _I.pack_into(hdr, 16, itt)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    struct.pack_into(">HH", hdr, 40, time2wait, time2retain)
    return hdr


def async_message(event: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, lun: int = 0,
                  parameter1: int = 0, parameter2: int = 0, parameter3: int = 0,
                  dsl: int = 0) -> bytearray:
    hdr = _header(Op.ASYNC_MSG, F_FINAL, dsl)
    _Q.pack_into(hdr, 8, lun)
    _I.pack_into(hdr, 16, RESERVED_TAG)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    hdr[36] = event
    struct.pack_into(">HHH", hdr, 38, parameter1, parameter2, parameter3)
    return hdr


def reject(reason: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
           data_sn: int = 0) -> bytearray:
    """Reject header; its data segment is the rejected PDU's BHS (RFC 7143 11.17)."""
    hdr = _header(Op.REJECT, F_FINAL, BHS_LEN)
    hdr[2] = reason
    _I.pack_into(hdr, 16, RESERVED_TAG)
    _SEQ.pack_into(hdr, 24, stat_sn, exp_cmd_sn, max_cmd_sn)
    _I.pack_into(hdr, 36, data_sn)
    return hdr


def pad_len(n: int) -> int:
    """Bytes of padding after a data segment of n bytes (RFC 7143 11.1)."""
    return -n & 3
