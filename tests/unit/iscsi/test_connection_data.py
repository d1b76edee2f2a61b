"""Data movement through the target's Connection: immediate data, unsolicited and solicited
Data-Out, Data-In, residuals, and the faults that end a command (RFC 7143 4.2.5, 11.3-11.8)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from pytarget.initiator import pdus
from pytarget.initiator.protocol import CommandComplete, R2TReceived, Rejected, parse_sense
from pytarget.iscsi import digest as dg
from pytarget.iscsi import pdu
from pytarget.iscsi.params import TargetLimits
from pytarget.iscsi.pdu import RESERVED_TAG, Op, RejectReason

from .harness import BLOCK, FAIL, LONG_CDB, TUR, Pair, produce, read10, split_pdus, write10

ABORTED_COMMAND = 0x0B


def data_outs(p: Pair) -> list[pdu.Bhs]:
    return [b for b, _ in split_pdus(bytes(p.sent)) if b.opcode == Op.DATA_OUT]


def commands(p: Pair) -> list[pdu.Bhs]:
    return [b for b, _ in split_pdus(bytes(p.sent)) if b.opcode == Op.SCSI_CMD]


def write_and_check(p: Pair, lba: int, blocks: int, **options: Any) -> CommandComplete:
    data = os.urandom(blocks * BLOCK)
    result = p.command(0, write10(lba, blocks), data, **options)
    assert result.status == 0, result
    assert p.device.disk[lba * BLOCK:(lba + blocks) * BLOCK] == data
    back = p.command(0, read10(lba, blocks), read_length=blocks * BLOCK)
    assert back.status == 0 and back.data == data
    return result


# ---------------------------------------------------------------------------------- writes
def test_immediate_data_only() -> None:
    p = Pair(keys={"ImmediateData": True, "InitialR2T": True})
    p.login()
    result = write_and_check(p, 0, 8)
    assert result.r2ts == 0 and data_outs(p) == []
    (cmd,) = [b for b in commands(p) if b.cdb[0] == 0x2A]
    assert cmd.final and cmd.data_segment_length == 8 * BLOCK


def test_unsolicited_data_out_then_r2t() -> None:
    """InitialR2T=No: up to FirstBurstLength goes unsolicited (F=0 on the command)."""
    p = Pair(limits=TargetLimits(max_recv_data_segment_length=4096),
             keys={"ImmediateData": False, "InitialR2T": False, "FirstBurstLength": 8192})
    p.login()
    result = write_and_check(p, 10, 64)
    (cmd,) = [b for b in commands(p) if b.cdb[0] == 0x2A]
    assert not cmd.final and cmd.data_segment_length == 0
    unsolicited = [b for b in data_outs(p) if b.ttt == RESERVED_TAG]
    assert [(b.buffer_offset, b.data_sn, b.final) for b in unsolicited] == [
        (0, 0, False), (4096, 1, True)]
    assert result.r2ts == 1
    (r2t,) = [b for b, _ in p.target_pdus(Op.R2T)]
    assert (r2t.buffer_offset, r2t.w44) == (8192, 64 * BLOCK - 8192)


def test_immediate_data_and_unsolicited_data_out() -> None:
    p = Pair(limits=TargetLimits(max_recv_data_segment_length=4096),
             keys={"ImmediateData": True, "InitialR2T": False, "FirstBurstLength": 16384})
    p.login()
    result = write_and_check(p, 0, 64)
    (cmd,) = [b for b in commands(p) if b.cdb[0] == 0x2A]
    assert cmd.data_segment_length == 4096 and not cmd.final
    unsolicited = [b for b in data_outs(p) if b.ttt == RESERVED_TAG]
    assert [b.buffer_offset for b in unsolicited] == [4096, 8192, 12288]
    assert unsolicited[-1].final and result.r2ts == 1


def test_unsolicited_burst_declined_by_the_f_bit() -> None:
    """F=1 on the command: no unsolicited Data-Out follows, the rest is solicited."""
    p = Pair(keys={"ImmediateData": True, "InitialR2T": False, "FirstBurstLength": 65536})
    p.login()
    result = write_and_check(p, 0, 64, immediate_length=1024, unsolicited=False)
    assert result.r2ts == 1
    (r2t,) = [b for b, _ in p.target_pdus(Op.R2T)]
    assert (r2t.buffer_offset, r2t.w44) == (1024, 64 * BLOCK - 1024)


def test_unsolicited_burst_ended_early_by_the_f_bit() -> None:
    p = Pair(keys={"ImmediateData": False, "InitialR2T": False, "FirstBurstLength": 65536})
    p.login()
    ini = p.ini
    data = os.urandom(32 * BLOCK)
    itt = ini.alloc_itt()
    ini.track_command(itt, 0, write10(0, 32), data)
    ini.send_pdu(pdus.scsi_command(lun=0, itt=itt, edtl=len(data), cmd_sn=ini.cmd_sn,
                                   exp_stat_sn=ini.exp_stat_sn, cdb=write10(0, 32), read=False,
                                   write=True, final=False, attr=1, dsl=0))
    ini.cmd_sn += 1
    ini.send_data_out(itt, RESERVED_TAG, 0, 4096, data_sn=0, final=True)
    p.pump()
    result = p.result(itt)
    assert result.status == 0 and result.r2ts == 1
    (r2t,) = [b for b, _ in p.target_pdus(Op.R2T)]
    assert (r2t.buffer_offset, r2t.w44) == (4096, len(data) - 4096)
    assert p.device.disk[:len(data)] == data


@pytest.mark.parametrize("segment", [512, 4096, 8192])
def test_r2t_sequences_follow_max_burst_length(segment: int) -> None:
    p = Pair(limits=TargetLimits(max_burst_length=8192, max_recv_data_segment_length=segment),
             keys={"ImmediateData": False, "InitialR2T": True})
    p.login()
    result = write_and_check(p, 0, 64)
    r2ts = [b for b, _ in p.target_pdus(Op.R2T)]
    assert [(b.data_sn, b.buffer_offset, b.w44) for b in r2ts] == [
        (n, n * 8192, 8192) for n in range(4)]
    assert result.r2ts == 4
    outs = data_outs(p)
    assert all(b.data_segment_length <= segment for b in outs)
    for r2t in r2ts:
        burst = [b for b in outs if b.ttt == r2t.ttt]
        assert [b.data_sn for b in burst] == list(range(len(burst)))
        assert [b.final for b in burst] == [False] * (len(burst) - 1) + [True]
        assert sum(b.data_segment_length for b in burst) == 8192


def test_max_outstanding_r2t() -> None:
    p = Pair(limits=TargetLimits(max_burst_length=4096),
             keys={"ImmediateData": False, "InitialR2T": True, "MaxOutstandingR2T": 3})
    p.login()
    data = os.urandom(64 * BLOCK)
    itt = p.ini.send_command(0, write10(0, 64), data, manual_r2t=True)
    p.pump()
    pending = p.take(R2TReceived)
    assert [r.offset for r in pending] == [0, 4096, 8192]
    answered = 0
    while pending:
        r2t = pending.pop(0)
        p.ini.answer_r2t(r2t)
        answered += 1
        p.pump()
        pending += p.take(R2TReceived)
        assert len(pending) <= 3
    assert answered == 8
    assert p.result(itt).status == 0 and p.device.disk[:len(data)] == data


def test_data_out_straight_into_the_task_buffer() -> None:
    """Payloads of 16 KiB and more are received directly into the task's buffer."""
    p = Pair(keys={"ImmediateData": False, "InitialR2T": True})
    p.login()
    write_and_check(p, 0, 1024)  # one 256 KiB R2T burst, one 256 KiB Data-Out PDU


# ---------------------------------------------------------------------------------- faults
def _manual_write(p: Pair, blocks: int = 16) -> tuple[int, bytes, list[R2TReceived]]:
    data = os.urandom(blocks * BLOCK)
    itt = p.ini.send_command(0, write10(0, blocks), data, manual_r2t=True)
    p.pump()
    return itt, data, p.take(R2TReceived)


def _check_data_failure(p: Pair, itt: int, asc: tuple[int, int]) -> None:
    result = p.result(itt)
    assert result.status == 2
    assert parse_sense(result.sense) == (ABORTED_COMMAND, *asc)
    assert not p.closed
    assert p.command(0, TUR).status == 0


@pytest.mark.parametrize("fault", ["data_sn", "offset", "beyond"])
def test_sequence_errors_end_the_command(fault: str) -> None:
    p = Pair(keys={"ImmediateData": False, "InitialR2T": True})
    p.login()
    itt, data, (r2t,) = _manual_write(p)
    data_sn, offset = (1, 0) if fault == "data_sn" else (0, 512 if fault == "offset" else 0)
    length = r2t.length + (512 if fault == "beyond" else 0)
    p.ini.send_data_out(itt, r2t.ttt, offset, length, data_sn=data_sn, final=True,
                        data=bytes(length))
    p.pump()
    _check_data_failure(p, itt, (0x4B, 0x00))  # DATA PHASE ERROR


def test_unknown_target_transfer_tag_ends_the_command() -> None:
    p = Pair(keys={"ImmediateData": False, "InitialR2T": True})
    p.login()
    itt, data, (r2t,) = _manual_write(p)
    p.ini.send_data_out(itt, r2t.ttt + 1000, 0, r2t.length, final=True)
    p.ini.send_data_out(itt, r2t.ttt, 0, r2t.length, final=True)
    p.pump()
    _check_data_failure(p, itt, (0x4B, 0x00))


def test_short_burst_ends_the_command() -> None:
    p = Pair(keys={"ImmediateData": False, "InitialR2T": True})
    p.login()
    itt, data, (r2t,) = _manual_write(p)
    p.ini.send_data_out(itt, r2t.ttt, 0, r2t.length // 2, final=True)
    p.pump()
    _check_data_failure(p, itt, (0x4B, 0x00))


def test_oversize_data_out_is_rejected_and_ends_the_command() -> None:
    p = Pair(limits=TargetLimits(max_recv_data_segment_length=1024),
             keys={"ImmediateData": False, "InitialR2T": True})
    p.login()
    itt, data, (r2t,) = _manual_write(p, blocks=4)
    p.ini.send_data_out(itt, r2t.ttt, 0, 2048, final=True)  # over the target's 1024
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.PROTOCOL_ERROR and reject.ended_itt is None
    _check_data_failure(p, itt, (0x4B, 0x00))


def _bad_data_digest_frame(p: Pair, itt: int, r2t: R2TReceived, offset: int, length: int,
                           data_sn: int, final: bool) -> bytes:
    payload = os.urandom(length)
    hdr = pdus.data_out(final=final, dsl=length, lun=0, itt=itt, ttt=r2t.ttt,
                        exp_stat_sn=p.ini.exp_stat_sn, data_sn=data_sn, buffer_offset=offset)
    digest = bytearray(dg.digest((payload,)))
    digest[0] ^= 0xFF
    return bytes(hdr) + payload + bytes(digest)


@pytest.mark.parametrize("length", [4096, 32768])  # staged and direct receive paths
def test_data_digest_error_on_data_out(length: int) -> None:
    """Reject (reason 0x02), then CHECK CONDITION once the outstanding data is in (7.8)."""
    p = Pair(limits=TargetLimits(max_burst_length=length),
             keys={"ImmediateData": False, "InitialR2T": True, "MaxOutstandingR2T": 2},
             data_digest=True)
    p.login()
    itt, data, r2ts = _manual_write(p, blocks=2 * length // BLOCK)
    assert len(r2ts) == 2
    p.to_target(_bad_data_digest_frame(p, itt, r2ts[0], 0, length, 0, True))
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.DATA_DIGEST_ERROR
    assert reject.rejected_opcode == Op.DATA_OUT and reject.rejected_itt == itt
    assert reject.ended_itt is None
    assert not [e for e in p.events if isinstance(e, CommandComplete)]  # second burst pending
    p.ini.answer_r2t(r2ts[1])
    p.pump()
    _check_data_failure(p, itt, (0x47, 0x05))  # PROTOCOL SERVICE CRC ERROR
    assert p.device.disk[:len(data)] != data


def test_data_digest_error_split_across_reads() -> None:
    p = Pair(limits=TargetLimits(max_burst_length=32768),
             keys={"ImmediateData": False, "InitialR2T": True}, data_digest=True)
    p.login()
    itt, _, (r2t,) = _manual_write(p, blocks=64)
    frame = _bad_data_digest_frame(p, itt, r2t, 0, 32768, 0, True)
    for cut in range(0, len(frame), 1000):
        p.to_target(frame[cut:cut + 1000])
    p.pump()
    assert [e.reason for e in p.take(Rejected)] == [RejectReason.DATA_DIGEST_ERROR]
    _check_data_failure(p, itt, (0x47, 0x05))


def test_data_digest_error_on_a_command_discards_it() -> None:
    """A command PDU with a bad data digest is rejected and discarded; resent with the same
    ITT and CmdSN it runs (RFC 7143 7.8, 7.2.1)."""
    p = Pair(data_digest=True, keys={"ImmediateData": True})
    p.login()
    data = os.urandom(4 * BLOCK)
    ini = p.ini
    itt, cmd_sn = ini.alloc_itt(), ini.cmd_sn
    hdr = pdus.scsi_command(lun=0, itt=itt, edtl=len(data), cmd_sn=cmd_sn,
                            exp_stat_sn=ini.exp_stat_sn, cdb=write10(0, 4), read=False,
                            write=True, final=True, attr=1, dsl=len(data))
    good = bytes(hdr) + data + dg.digest((data,))
    bad = good[:-1] + bytes([good[-1] ^ 1])
    p.to_target(bad)
    p.pump()
    assert [e.reason for e in p.take(Rejected)] == [RejectReason.DATA_DIGEST_ERROR]
    assert p.device.executed == [] and not p.closed
    ini.track_command(itt, 0, write10(0, 4), data)
    ini.cmd_sn += 1
    p.to_target(good)
    p.pump()
    assert p.result(itt).status == 0 and p.device.disk[:len(data)] == data


@pytest.mark.parametrize("cdb,data,reason", [
    (write10(0, 1), b"x" * 512, None),
    (read10(0, 1), b"x" * 512, RejectReason.PROTOCOL_ERROR),  # immediate data without W
])
def test_immediate_data_rules(cdb: bytes, data: bytes, reason: int | None) -> None:
    p = Pair(keys={"ImmediateData": True})
    p.login()
    ini = p.ini
    itt = ini.alloc_itt()
    read = cdb[0] == 0x28
    ini.send_pdu(pdus.scsi_command(lun=0, itt=itt, edtl=512, cmd_sn=ini.cmd_sn,
                                   exp_stat_sn=ini.exp_stat_sn, cdb=cdb, read=read,
                                   write=not read, final=True, attr=1, dsl=len(data)), data)
    ini.track_command(itt, 0, cdb, data)
    ini.cmd_sn += 1
    p.pump()
    rejects = p.take(Rejected)
    if reason is None:
        assert not rejects and p.result(itt).status == 0
    else:
        assert [r.reason for r in rejects] == [reason] and rejects[0].ended_itt == itt
    assert p.command(0, TUR).status == 0  # the CmdSN was consumed either way


def test_immediate_data_when_not_negotiated() -> None:
    p = Pair(keys={"ImmediateData": False})
    p.login()
    p.ini.params.immediate_data = True  # make the initiator misbehave
    itt = p.ini.send_command(0, write10(0, 1), bytes(512))
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.PROTOCOL_ERROR and reject.ended_itt == itt
    assert p.device.executed == []


def test_immediate_data_beyond_first_burst() -> None:
    p = Pair(keys={"ImmediateData": True, "FirstBurstLength": 4096})
    p.login()
    p.ini.params.first_burst_length = 8192  # the initiator oversteps FirstBurstLength
    itt = p.ini.send_command(0, write10(0, 16), bytes(8192))
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.PROTOCOL_ERROR and reject.ended_itt == itt


def test_data_out_for_an_unknown_task_is_ignored() -> None:
    p = Pair()
    p.login()
    p.ini.send_data_out(0x777, 5, 0, 512)
    p.pump()
    assert not p.take(Rejected) and not p.closed
    assert p.command(0, TUR).status == 0


# ---------------------------------------------------------------------------------- reads
def test_data_in_sequences_and_phase_collapse() -> None:
    p = Pair(limits=TargetLimits(max_burst_length=8192),
             keys={"MaxRecvDataSegmentLength": 4096})
    p.login()
    p.device.disk[:64 * BLOCK] = os.urandom(64 * BLOCK)
    result = p.command(0, read10(0, 64), read_length=64 * BLOCK)
    assert result.status == 0 and result.data == p.device.disk[:64 * BLOCK]
    data_in = [b for b, _ in p.target_pdus(Op.DATA_IN)]
    assert [b.data_sn for b in data_in] == list(range(8))
    assert [b.buffer_offset for b in data_in] == [n * 4096 for n in range(8)]
    assert [b.final for b in data_in] == [False, True] * 4  # a sequence per MaxBurstLength
    assert [bool(b.flags & pdu.F_DATAIN_STATUS) for b in data_in] == [False] * 7 + [True]
    assert p.target_pdus(Op.SCSI_RSP) == []  # status went with the last Data-In
    assert result.exp_data_sn == 8 and result.data_in_pdus == 8


def test_check_condition_comes_with_sense() -> None:
    p = Pair()
    p.login()
    result = p.command(0, bytes([FAIL]) + bytes(5))
    assert result.status == 2 and parse_sense(result.sense) == (0x5, 0x24, 0x00)
    ((rsp, data),) = p.target_pdus(Op.SCSI_RSP)
    assert int.from_bytes(data[:2], "big") == len(result.sense) == 18


@pytest.mark.parametrize("produced,expected,flags,residual", [
    (600, 1000, pdu.F_UNDERFLOW, 400),
    (1500, 1000, pdu.F_OVERFLOW, 500),
    (1000, 1000, 0, 0),
    (0, 1000, pdu.F_UNDERFLOW, 1000),
])
def test_read_residuals(produced: int, expected: int, flags: int, residual: int) -> None:
    p = Pair()
    p.login()
    result = p.command(0, produce(produced), read_length=expected)
    assert (result.residual_flags, result.residual) == (flags, residual)
    assert result.data == bytes(i & 0xFF for i in range(min(produced, expected)))


def test_write_residuals() -> None:
    p = Pair(keys={"ImmediateData": True})
    p.login()
    result = p.command(0, write10(0, 2), os.urandom(4 * BLOCK))
    assert result.underflow and result.residual == 2 * BLOCK


def test_data_from_a_command_without_data_direction() -> None:
    p = Pair()
    p.login()
    result = p.command(0, produce(100))
    assert result.overflow and result.residual == 100 and result.data == b""


@pytest.mark.parametrize("data_len", [0, 512])
def test_extended_cdb(data_len: int) -> None:
    """CDBs over 16 bytes arrive in an Extended CDB AHS (RFC 7143 11.2.1.3)."""
    p = Pair(keys={"ImmediateData": True})
    p.login()
    cdb = bytes([LONG_CDB]) + bytes(range(1, 32))
    result = p.command(0, cdb, os.urandom(data_len))
    assert result.status == 0
    assert p.device.executed[-1][1] == cdb
