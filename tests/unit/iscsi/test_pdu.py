"""PDU codec: every target and initiator builder round-trips through `Bhs` (RFC 7143 11)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytarget.initiator import pdus
from pytarget.iscsi import digest as dg
from pytarget.iscsi import pdu
from pytarget.iscsi.pdu import BHS_LEN, RESERVED_TAG, Bhs, Op

U32 = st.integers(0, 0xFFFFFFFF)
DSL = st.integers(0, pdu.MAX_DATA_SEGMENT)
LUN = st.integers(0, 0xFFFFFFFFFFFFFFFF)


def parse(hdr: bytes | bytearray) -> Bhs:
    assert len(hdr) == BHS_LEN
    return Bhs(hdr)


# ---------------------------------------------------------------------------------- target
@given(itt=U32, ttt=U32, lun=LUN, sn=st.tuples(U32, U32, U32), dsl=DSL)
def test_nop_in(itt: int, ttt: int, lun: int, sn: tuple[int, int, int], dsl: int) -> None:
    b = parse(pdu.nop_in(itt, ttt, lun, *sn, dsl=dsl))
    assert (b.opcode, b.final, b.immediate) == (Op.NOP_IN, True, False)
    assert (b.itt, b.ttt, b.lun, b.data_segment_length) == (itt, ttt, lun, dsl)
    assert (b.w24, b.w28, b.w32) == sn


@given(itt=U32, status=st.integers(0, 255), response=st.integers(0, 255),
       sn=st.tuples(U32, U32, U32), flags=st.sampled_from([0, pdu.F_OVERFLOW, pdu.F_UNDERFLOW]),
       residual=U32, dsl=DSL, exp_data_sn=U32)
def test_scsi_response(itt: int, status: int, response: int, sn: tuple[int, int, int],
                       flags: int, residual: int, dsl: int, exp_data_sn: int) -> None:
    b = parse(pdu.scsi_response(itt, status, *sn, flags, residual, dsl, exp_data_sn,
                                response=response))
    assert b.opcode == Op.SCSI_RSP and b.final
    assert b.flags & 0x7F == flags
    assert (b.b2, b.b3, b.itt, b.data_segment_length) == (response, status, itt, dsl)
    assert (b.w24, b.w28, b.w32, b.w36, b.w44) == (*sn, exp_data_sn, residual)
    assert b.w40 == 0  # bidirectional residual


@pytest.mark.parametrize("flags", [0, pdu.F_FINAL, pdu.F_FINAL | pdu.F_DATAIN_STATUS,
                                   pdu.F_FINAL | pdu.F_DATAIN_STATUS | pdu.F_UNDERFLOW])
def test_data_in(flags: int) -> None:
    b = parse(pdu.data_in(7, flags, 2, 4096, pdu.encode_lun(3), 10, 11, 12, 5, 8192, 99))
    assert b.opcode == Op.DATA_IN
    assert b.flags == flags
    assert b.b3 == (2 if flags & pdu.F_DATAIN_STATUS else 0)  # status only with S
    assert (b.itt, b.ttt, b.data_segment_length) == (7, RESERVED_TAG, 4096)
    assert pdu.decode_lun(b.lun) == 3
    assert (b.w24, b.w28, b.w32) == (10, 11, 12)
    assert (b.data_sn, b.buffer_offset, b.w44) == (5, 8192, 99)


@given(itt=U32, ttt=U32, lun=LUN, sn=st.tuples(U32, U32, U32), r2t_sn=U32, offset=U32,
       length=U32)
def test_r2t(itt: int, ttt: int, lun: int, sn: tuple[int, int, int], r2t_sn: int, offset: int,
             length: int) -> None:
    b = parse(pdu.r2t(itt, ttt, lun, *sn, r2t_sn, offset, length))
    assert b.opcode == Op.R2T and b.final and b.data_segment_length == 0
    assert (b.itt, b.ttt, b.lun) == (itt, ttt, lun)
    assert (b.w24, b.w28, b.w32, b.w36, b.w40, b.w44) == (*sn, r2t_sn, offset, length)


@pytest.mark.parametrize("response", list(pdu.TmfResponse))
def test_task_mgmt_response(response: int) -> None:
    b = parse(pdu.task_mgmt_response(0x1234, response, 1, 2, 3))
    assert (b.opcode, b.final, b.b2, b.itt) == (Op.TASK_MGMT_RSP, True, response, 0x1234)
    assert (b.w24, b.w28, b.w32) == (1, 2, 3)


@given(isid=st.binary(min_size=6, max_size=6), tsih=st.integers(0, 0xFFFF), itt=U32,
       sn=st.tuples(U32, U32, U32), status=st.integers(0, 0xFFFF), dsl=DSL,
       csg=st.integers(0, 3), nsg=st.integers(0, 3), transit=st.booleans())
def test_login_response(isid: bytes, tsih: int, itt: int, sn: tuple[int, int, int],
                        status: int, dsl: int, csg: int, nsg: int, transit: bool) -> None:
    flags = (pdu.F_TRANSIT if transit else 0) | csg << 2 | nsg
    b = parse(pdu.login_response(flags, 0, 0, dsl, isid, tsih, itt, *sn, status >> 8,
                                 status & 0xFF))
    assert b.opcode == Op.LOGIN_RSP and b.flags == flags
    assert (b.isid, b.tsih, b.itt, b.data_segment_length) == (isid, tsih, itt, dsl)
    assert (b.w24, b.w28, b.w32) == sn
    assert (b.raw[36] << 8 | b.raw[37]) == status
    assert (b.version_max, b.version_min) == (0, 0)


@given(flags=st.sampled_from([pdu.F_FINAL, pdu.F_CONTINUE]), itt=U32, ttt=U32, lun=LUN,
       sn=st.tuples(U32, U32, U32), dsl=DSL)
def test_text_response(flags: int, itt: int, ttt: int, lun: int, sn: tuple[int, int, int],
                       dsl: int) -> None:
    b = parse(pdu.text_response(flags, dsl, lun, itt, ttt, *sn))
    assert (b.opcode, b.flags, b.itt, b.ttt, b.lun) == (Op.TEXT_RSP, flags, itt, ttt, lun)
    assert (b.w24, b.w28, b.w32, b.data_segment_length) == (*sn, dsl)


def test_logout_response() -> None:
    b = parse(pdu.logout_response(9, pdu.LogoutResponse.CID_NOT_FOUND, 4, 5, 6, 2, 20))
    assert (b.opcode, b.final, b.b2, b.itt) == (Op.LOGOUT_RSP, True, 1, 9)
    assert (b.w24, b.w28, b.w32) == (4, 5, 6)
    assert struct.unpack_from(">HH", b.raw, 40) == (2, 20)


def test_async_message() -> None:
    b = parse(pdu.async_message(pdu.AsyncEvent.REQUEST_LOGOUT, 4, 5, 6, lun=pdu.encode_lun(1),
                                parameter1=1, parameter2=2, parameter3=30, dsl=8))
    assert (b.opcode, b.itt, b.data_segment_length) == (Op.ASYNC_MSG, RESERVED_TAG, 8)
    assert pdu.decode_lun(b.lun) == 1
    assert b.raw[36] == pdu.AsyncEvent.REQUEST_LOGOUT
    assert struct.unpack_from(">HHH", b.raw, 38) == (1, 2, 30)


@pytest.mark.parametrize("reason", list(pdu.RejectReason))
def test_reject(reason: int) -> None:
    b = parse(pdu.reject(reason, 4, 5, 6, data_sn=3))
    assert (b.opcode, b.final, b.b2, b.itt) == (Op.REJECT, True, reason, RESERVED_TAG)
    assert b.data_segment_length == BHS_LEN  # the rejected header follows (RFC 7143 11.17)
    assert (b.w24, b.w28, b.w32, b.w36) == (4, 5, 6, 3)


# ---------------------------------------------------------------------------------- initiator
@given(transit=st.booleans(), cont=st.booleans(), csg=st.integers(0, 3), nsg=st.integers(0, 3),
       isid=st.binary(min_size=6, max_size=6), tsih=st.integers(0, 0xFFFF), itt=U32,
       cid=st.integers(0, 0xFFFF), cmd_sn=U32, exp_stat_sn=U32, dsl=DSL)
def test_login_request(transit: bool, cont: bool, csg: int, nsg: int, isid: bytes, tsih: int,
                       itt: int, cid: int, cmd_sn: int, exp_stat_sn: int, dsl: int) -> None:
    b = parse(pdus.login_request(transit=transit, cont=cont, csg=csg, nsg=nsg, dsl=dsl,
                                 isid=isid, tsih=tsih, itt=itt, cid=cid, cmd_sn=cmd_sn,
                                 exp_stat_sn=exp_stat_sn, version_max=0, version_min=0))
    assert b.opcode == Op.LOGIN_REQ and b.immediate
    assert bool(b.flags & pdu.F_TRANSIT) == transit and bool(b.flags & pdu.F_CONTINUE) == cont
    assert ((b.flags >> 2) & 3, b.flags & 3) == (csg, nsg)
    assert (b.isid, b.tsih, b.itt, b.cid) == (isid, tsih, itt, cid)
    assert (b.cmd_sn, b.exp_stat_sn, b.data_segment_length) == (cmd_sn, exp_stat_sn, dsl)


def test_text_request() -> None:
    b = parse(pdus.text_request(final=False, cont=True, dsl=100, itt=3, ttt=44, cmd_sn=7,
                                exp_stat_sn=8, lun=pdu.encode_lun(2), immediate=True))
    assert (b.opcode, b.immediate, b.flags) == (Op.TEXT_REQ, True, pdu.F_CONTINUE)
    assert (b.itt, b.ttt, b.cmd_sn, b.exp_stat_sn) == (3, 44, 7, 8)
    assert pdu.decode_lun(b.lun) == 2 and b.data_segment_length == 100


@given(lun=st.integers(0, 16383), itt=U32, edtl=U32, cmd_sn=U32, exp_stat_sn=U32,
       cdb=st.binary(min_size=6, max_size=16), read=st.booleans(), write=st.booleans(),
       final=st.booleans(), attr=st.integers(0, 4), dsl=DSL, immediate=st.booleans())
def test_scsi_command(lun: int, itt: int, edtl: int, cmd_sn: int, exp_stat_sn: int, cdb: bytes,
                      read: bool, write: bool, final: bool, attr: int, dsl: int,
                      immediate: bool) -> None:
    b = parse(pdus.scsi_command(lun=pdu.encode_lun(lun), itt=itt, edtl=edtl, cmd_sn=cmd_sn,
                                exp_stat_sn=exp_stat_sn, cdb=cdb, read=read, write=write,
                                final=final, attr=attr, dsl=dsl, immediate=immediate))
    assert b.opcode == Op.SCSI_CMD and b.immediate == immediate and b.final == final
    assert bool(b.flags & pdu.F_CMD_READ) == read and bool(b.flags & pdu.F_CMD_WRITE) == write
    assert b.flags & 7 == attr
    assert pdu.decode_lun(b.lun) == lun
    assert (b.itt, b.expected_data_transfer_length, b.cmd_sn, b.exp_stat_sn) == (
        itt, edtl, cmd_sn, exp_stat_sn)
    assert b.cdb == cdb + bytes(16 - len(cdb)) and b.data_segment_length == dsl


@pytest.mark.parametrize("length", [17, 18, 20, 32, 260])
def test_extended_cdb_ahs(length: int) -> None:
    cdb = bytes(i & 0xFF for i in range(length))
    ahs = pdus.extended_cdb_ahs(cdb)
    assert len(ahs) % 4 == 0
    ahs_length, kind, reserved = struct.unpack_from(">HBB", ahs)
    assert (ahs_length, kind, reserved) == (length - 16 + 1, 1, 0)
    assert ahs[4:4 + length - 16] == cdb[16:]
    b = parse(pdus.scsi_command(lun=0, itt=1, edtl=0, cmd_sn=1, exp_stat_sn=1, cdb=cdb,
                                read=False, write=False, final=True, attr=1, dsl=0,
                                ahs_len=len(ahs)))
    assert b.total_ahs_length == len(ahs) and b.cdb == cdb[:16]


@given(final=st.booleans(), dsl=DSL, lun=LUN, itt=U32, ttt=U32, exp_stat_sn=U32, data_sn=U32,
       offset=U32)
def test_data_out(final: bool, dsl: int, lun: int, itt: int, ttt: int, exp_stat_sn: int,
                  data_sn: int, offset: int) -> None:
    b = parse(pdus.data_out(final=final, dsl=dsl, lun=lun, itt=itt, ttt=ttt,
                            exp_stat_sn=exp_stat_sn, data_sn=data_sn, buffer_offset=offset))
    assert (b.opcode, b.final, b.immediate) == (Op.DATA_OUT, final, False)
    assert (b.data_segment_length, b.lun, b.itt, b.ttt) == (dsl, lun, itt, ttt)
    assert (b.exp_stat_sn, b.data_sn, b.buffer_offset, b.cmd_sn) == (exp_stat_sn, data_sn,
                                                                      offset, 0)


def test_nop_out() -> None:
    b = parse(pdus.nop_out(itt=RESERVED_TAG, ttt=77, cmd_sn=5, exp_stat_sn=6,
                           lun=pdu.encode_lun(1), dsl=0))
    assert (b.opcode, b.immediate, b.final) == (Op.NOP_OUT, True, True)
    assert (b.itt, b.ttt, b.cmd_sn, b.exp_stat_sn) == (RESERVED_TAG, 77, 5, 6)


@pytest.mark.parametrize("function", list(pdu.TmfFunction))
def test_task_mgmt_request(function: int) -> None:
    b = parse(pdus.task_mgmt_request(function=function, lun=pdu.encode_lun(4), itt=8,
                                     referenced_task_tag=9, cmd_sn=10, exp_stat_sn=11,
                                     ref_cmd_sn=12, exp_data_sn=13))
    assert (b.opcode, b.immediate, b.final, b.flags & 0x7F) == (Op.TASK_MGMT_REQ, True, True,
                                                                 function)
    assert (b.itt, b.referenced_task_tag, b.cmd_sn, b.exp_stat_sn) == (8, 9, 10, 11)
    assert (b.ref_cmd_sn, b.data_sn) == (12, 13)
    assert pdu.decode_lun(b.lun) == 4


@pytest.mark.parametrize("reason", list(pdu.LogoutReason))
def test_logout_request(reason: int) -> None:
    b = parse(pdus.logout_request(reason=reason, itt=5, cid=3, cmd_sn=6, exp_stat_sn=7,
                                  immediate=False))
    assert (b.opcode, b.immediate, b.flags) == (Op.LOGOUT_REQ, False, pdu.F_FINAL | reason)
    assert (b.itt, b.cid, b.cmd_sn, b.exp_stat_sn) == (5, 3, 6, 7)


def test_snack_request() -> None:
    b = parse(pdus.snack_request(snack_type=1, lun=0, itt=5, ttt=6, exp_stat_sn=7, beg_run=8,
                                 run_length=9))
    assert (b.opcode, b.flags) == (Op.SNACK_REQ, pdu.F_FINAL | 1)
    assert (b.itt, b.ttt, b.exp_stat_sn, b.buffer_offset, b.w44) == (5, 6, 7, 8, 9)


# ---------------------------------------------------------------------------------- fields
@pytest.mark.parametrize("lun", [0, 1, 255, 256, 1000, 16383])
def test_lun_round_trip(lun: int) -> None:
    field = pdu.encode_lun(lun)
    assert pdu.decode_lun(field) == lun
    assert (field >> 62) == (0 if lun < 256 else 1)  # peripheral, then flat space (SAM-5 4.7)


@pytest.mark.parametrize("field", [
    1,  # second level present
    0x0100 << 48,  # peripheral with a bus number
    0x8000 << 48,  # logical unit addressing
    0xC000 << 48,  # extended addressing
])
def test_lun_forms_never_assigned(field: int) -> None:
    assert pdu.decode_lun(field) is None


@given(st.binary(min_size=BHS_LEN, max_size=BHS_LEN))
def test_any_header_parses(raw: bytes) -> None:
    b = Bhs(raw)
    assert b.opcode == raw[0] & 0x3F and b.immediate == bool(raw[0] & 0x40)
    assert b.total_ahs_length == raw[4] * 4
    assert b.data_segment_length == int.from_bytes(raw[5:8], "big")
    assert repr(b).startswith("<Bhs ")


@pytest.mark.parametrize("n,pad", [(0, 0), (1, 3), (2, 2), (3, 1), (4, 0), (5, 3)])
def test_pad_len(n: int, pad: int) -> None:
    assert pdu.pad_len(n) == pad


@pytest.mark.parametrize("data,wire", [
    # RFC 7143 B.4 CRC32C examples, sent least significant byte first.
    (bytes(32), "aa36918a"),
    (b"\xff" * 32, "43aba862"),
    (bytes(range(32)), "4e79dd46"),
    (bytes(range(31, -1, -1)), "5cdb3f11"),
])
def test_crc32c_vectors(data: bytes, wire: str) -> None:
    assert dg.digest((data,)).hex() == wire
    assert dg.digest((data[:5], data[5:])).hex() == wire
    assert dg.digest_value(bytes.fromhex(wire)) == dg.crc32c(data)
