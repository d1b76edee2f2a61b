"""Full feature phase of the target's Connection: command numbering, keep-alives, task
management, text requests and the PDUs it rejects (RFC 7143 4.2.2, 11.5, 11.10, 11.17-11.19)."""

from __future__ import annotations

import pytest

from pytarget.initiator import pdus
from pytarget.initiator.protocol import (
    CommandAborted,
    CommandComplete,
    NopReply,
    Rejected,
    TargetPing,
    TextComplete,
    TmfComplete,
    sn_le,
)
from pytarget.iscsi import pdu
from pytarget.iscsi.node import TargetNode
from pytarget.iscsi.params import TargetLimits
from pytarget.iscsi.pdu import RESERVED_TAG, Op, RejectReason, TmfFunction, TmfResponse

from .harness import HOLD, TARGET, TUR, Pair, frame, read10, split_pdus

HOLD_CDB = bytes([HOLD]) + bytes(5)
SN_OPCODES = {Op.NOP_IN, Op.SCSI_RSP, Op.TASK_MGMT_RSP, Op.TEXT_RSP, Op.DATA_IN,
              Op.LOGOUT_RSP, Op.R2T, Op.ASYNC_MSG, Op.REJECT}


def max_cmd_sns(p: Pair) -> list[int]:
    return [b.w32 for b, _ in p.received if b.opcode in SN_OPCODES]


# ---------------------------------------------------------------------------------- CmdSN
def test_window_closes_while_commands_are_held_and_reopens() -> None:
    p = Pair(window=4)
    p.login()
    held = [p.ini.send_command(0, HOLD_CDB) for _ in range(6)]
    p.pump()
    assert len(p.device.held) == 4 and p.ini.queued == 2  # MaxCmdSN admits four
    for itt in held[:4]:
        p.device.finish(itt)
    p.pump()
    assert len(p.device.held) == 2 and p.ini.queued == 0
    for itt in held[4:]:
        p.device.finish(itt)
    p.pump()
    assert all(p.result(itt).status == 0 for itt in held)
    sns = max_cmd_sns(p)
    # never moves backwards (4.2.2.1)
    assert all(sn_le(a, b) for a, b in zip(sns, sns[1:], strict=False))


def test_many_commands_outstanding() -> None:
    p = Pair(window=16)
    p.login()
    itts = [p.ini.send_command(0, read10(i, 1), read_length=512) for i in range(200)]
    p.pump()
    assert all(p.result(itt).status == 0 for itt in itts)
    assert p.conn.session is not None and p.conn.session.active == 0
    sns = max_cmd_sns(p)
    assert all(sn_le(a, b) for a, b in zip(sns, sns[1:], strict=False))


def _raw_command(p: Pair, cmd_sn: int, cdb: bytes = TUR, immediate: bool = False) -> int:
    itt = p.ini.alloc_itt()
    p.ini.send_pdu(pdus.scsi_command(lun=0, itt=itt, edtl=0, cmd_sn=cmd_sn,
                                     exp_stat_sn=p.ini.exp_stat_sn, cdb=cdb, read=False,
                                     write=False, final=True, attr=1, dsl=0,
                                     immediate=immediate))
    return itt


@pytest.mark.parametrize("offset", [-1, -1000, 128, 5000])
def test_out_of_window_commands_are_dropped_silently(offset: int) -> None:
    p = Pair(window=128)
    p.login()
    before = len(p.received)
    _raw_command(p, (p.ini.cmd_sn + offset) & 0xFFFFFFFF)
    p.pump()
    assert len(p.received) == before and p.device.executed == [] and not p.closed
    assert p.command(0, TUR).status == 0


def test_out_of_window_write_data_is_consumed_quietly() -> None:
    p = Pair(keys={"InitialR2T": False, "ImmediateData": False, "FirstBurstLength": 4096})
    p.login()
    ini = p.ini
    itt = ini.alloc_itt()
    ini.send_pdu(pdus.scsi_command(lun=0, itt=itt, edtl=4096, cmd_sn=ini.cmd_sn - 1,
                                   exp_stat_sn=ini.exp_stat_sn, cdb=bytes([0x2A]) + bytes(9),
                                   read=False, write=True, final=False, attr=1, dsl=0))
    ini.send_data_out(itt, RESERVED_TAG, 0, 4096, data=bytes(4096), final=True)
    p.pump()
    assert p.device.executed == [] and not p.closed and not p.take(Rejected)
    assert p.command(0, TUR).status == 0


def test_cmd_sn_gap_drops_the_connection() -> None:
    """One connection at ErrorRecoveryLevel 0 cannot lose a command: a gap is fatal."""
    p = Pair()
    p.login()
    _raw_command(p, p.ini.cmd_sn + 1)
    p.pump()
    assert p.closed


def test_immediate_commands_take_no_cmd_sn() -> None:
    p = Pair()
    p.login()
    session = p.conn.session
    assert session is not None
    exp = session.exp_cmd_sn
    itt = _raw_command(p, p.ini.cmd_sn, immediate=True)
    p.ini.track_command(itt, 0, TUR)
    p.pump()
    assert p.result(itt).status == 0 and session.exp_cmd_sn == exp
    assert p.command(0, TUR).status == 0 and session.exp_cmd_sn == exp + 1


# ---------------------------------------------------------------------------------- NOP
def test_initiator_ping_is_echoed() -> None:
    p = Pair()
    p.login()
    itt = p.ini.send_nop(b"hello, target")
    p.pump()
    (reply,) = p.take(NopReply)
    assert (reply.itt, reply.data) == (itt, b"hello, target")


def test_ping_without_reply() -> None:
    p = Pair()
    p.login()
    before = len(p.received)
    p.ini.send_nop(reply=False)
    p.pump()
    assert len(p.received) == before


def test_target_pings_an_idle_initiator() -> None:
    p = Pair(nop_interval=5.0, nop_timeout=3.0)
    p.login()
    assert p.conn.next_deadline() == 5.0
    p.tick(4.0)
    assert not p.take(TargetPing)
    p.tick(5.0)
    (ping,) = p.take(TargetPing)
    assert ping.answered and ping.ttt != RESERVED_TAG
    ((nop_in, _),) = p.target_pdus(Op.NOP_IN)
    assert (nop_in.itt, nop_in.ttt) == (RESERVED_TAG, ping.ttt)
    assert p.conn.next_deadline() == 10.0  # the answer counts as traffic
    p.tick(9.0)
    assert not p.closed
    p.tick(10.0)
    assert len(p.take(TargetPing)) == 1 and not p.closed


def test_unanswered_ping_drops_the_connection() -> None:
    p = Pair(nop_interval=5.0, nop_timeout=3.0, answer_pings=False)
    p.login()
    p.tick(5.0)
    (ping,) = p.take(TargetPing)
    assert not ping.answered
    assert p.conn.next_deadline() == 8.0
    p.tick(7.9)
    assert not p.closed
    p.tick(8.0)
    assert p.closed and p.device.closed == ["initiator stopped answering NOP-In"]


def test_ping_stat_sn_is_not_advanced() -> None:
    p = Pair(nop_interval=5.0)
    p.login()
    stat_sn = p.conn.stat_sn
    p.tick(5.0)
    ((nop_in, _),) = p.target_pdus(Op.NOP_IN)
    assert nop_in.w24 == stat_sn == p.conn.stat_sn  # RFC 7143 11.19: StatSN not advanced


# ---------------------------------------------------------------------------------- TMF
def test_abort_task() -> None:
    p = Pair()
    p.login()
    victim = p.ini.send_command(0, HOLD_CDB)
    p.pump()
    tmf = p.ini.send_tmf(TmfFunction.ABORT_TASK, 0, victim)
    p.pump()
    assert p.take(CommandAborted) == [CommandAborted(victim, tmf)]
    assert p.take(TmfComplete) == [TmfComplete(tmf, TmfResponse.FUNCTION_COMPLETE)]
    ev = p.device.tmfs[0]
    assert (ev.referenced_task_tag, ev.function) == (victim, TmfFunction.ABORT_TASK)
    assert p.target_pdus(Op.SCSI_RSP) == []  # no response for an aborted task
    assert p.conn.session is not None and p.conn.session.active == 0
    assert p.command(0, TUR).status == 0


def test_abort_task_that_does_not_exist() -> None:
    p = Pair()
    p.login()
    tmf = p.ini.send_tmf(TmfFunction.ABORT_TASK, 0, 0x4242)
    p.pump()
    assert p.take(TmfComplete) == [TmfComplete(tmf, TmfResponse.TASK_DOES_NOT_EXIST)]


def test_lun_reset_ends_the_tasks_of_that_lun() -> None:
    p = Pair()
    p.login()
    on0 = [p.ini.send_command(0, HOLD_CDB) for _ in range(3)]
    on1 = p.ini.send_command(1, HOLD_CDB)
    p.pump()
    tmf = p.ini.send_tmf(TmfFunction.LOGICAL_UNIT_RESET, 0)
    p.pump()
    assert sorted(e.itt for e in p.take(CommandAborted)) == sorted(on0)
    assert p.take(TmfComplete) == [TmfComplete(tmf, TmfResponse.FUNCTION_COMPLETE)]
    p.device.finish(on1)
    p.pump()
    assert p.result(on1).status == 0


def test_abort_of_a_write_waiting_for_data() -> None:
    p = Pair(keys={"ImmediateData": False, "InitialR2T": True})
    p.login()
    victim = p.ini.send_command(0, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]), bytes(4096),
                                manual_r2t=True)
    p.pump()
    tmf = p.ini.send_tmf(TmfFunction.ABORT_TASK, 0, victim)
    p.pump()
    assert [e.itt for e in p.take(CommandAborted)] == [victim]
    assert p.take(TmfComplete)[0].itt == tmf
    p.ini.send_data_out(victim, 1, 0, 4096, data=bytes(4096))  # late data is dropped
    p.pump()
    assert not p.closed and not p.take(Rejected)


# ---------------------------------------------------------------------------------- text
def _with_targets(count: int) -> Pair:
    p = Pair(target_name=None, keys={"MaxRecvDataSegmentLength": 512})
    for n in range(count):
        p.registry.add_target(TargetNode(f"iqn.2026-11.io.pytarget:many-{n:03d}"))
    return p


def test_send_targets_with_continuation() -> None:
    p = _with_targets(40)
    p.login()
    itt = p.ini.send_targets("All")
    p.pump()
    (done,) = p.take(TextComplete)
    names = [v for k, v in done.pairs if k == "TargetName"]
    assert len(names) == 42 and TARGET in names
    addresses = [v for k, v in done.pairs if k == "TargetAddress"]
    assert addresses == ["127.0.0.1:3260,1"] * 42
    responses = [b for b, _ in p.target_pdus(Op.TEXT_RSP)]
    assert len(responses) > 5 and all(b.itt == itt for b in responses)
    assert all(b.flags == pdu.F_CONTINUE and b.ttt != RESERVED_TAG for b in responses[:-1])
    assert responses[-1].flags == pdu.F_FINAL and responses[-1].ttt == RESERVED_TAG
    assert all(b.data_segment_length <= 512 for b in responses)


def test_continued_text_request() -> None:
    p = Pair(limits=TargetLimits(max_recv_data_segment_length=512))
    p.login()
    itt = p.ini.send_text([("X-Padding", "p" * 2000), ("SendTargets", "")])
    p.pump()
    (done,) = p.take(TextComplete)
    assert done.itt == itt
    assert ("X-Padding", "NotUnderstood") in done.pairs
    assert ("TargetName", TARGET) in done.pairs
    requests = [b for b in split(p) if b.opcode == Op.TEXT_REQ]
    assert [b.data_segment_length for b in requests] == [512, 512, 512, 488]
    assert all(b.flags == pdu.F_CONTINUE for b in requests[:-1])
    assert requests[-1].flags == pdu.F_FINAL


def split(p: Pair) -> list[pdu.Bhs]:
    return [b for b, _ in split_pdus(bytes(p.sent))]


@pytest.mark.parametrize("value,expected", [
    ("All", [("SendTargets", "Reject")]),  # only in a discovery session
    ("", [("TargetName", TARGET), ("TargetAddress", "127.0.0.1:3260,1")]),
    ("iqn.2026-11.io.pytarget:nonesuch", []),
])
def test_send_targets_in_a_normal_session(value: str, expected: list[tuple[str, str]]) -> None:
    p = Pair()
    p.login()
    p.ini.send_targets(value)
    p.pump()
    (done,) = p.take(TextComplete)
    assert list(done.pairs) == expected


def test_malformed_text_request_is_rejected() -> None:
    p = Pair()
    p.login()
    itt = p.ini.alloc_itt()
    data = b"NoEqualsSign\0"
    p.ini.send_pdu(pdus.text_request(final=True, cont=False, dsl=len(data), itt=itt,
                                     ttt=RESERVED_TAG, cmd_sn=p.ini.cmd_sn,
                                     exp_stat_sn=p.ini.exp_stat_sn), data)
    p.ini.cmd_sn += 1
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.PROTOCOL_ERROR and reject.rejected_itt == itt
    assert p.command(0, TUR).status == 0


# ---------------------------------------------------------------------------------- rejects
@pytest.mark.parametrize("opcode,reason", [
    (0x1C, RejectReason.COMMAND_NOT_SUPPORTED),
    (Op.NOP_IN, RejectReason.COMMAND_NOT_SUPPORTED),  # a target opcode
    (Op.LOGIN_REQ, RejectReason.PROTOCOL_ERROR),
])
def test_unsupported_opcodes(opcode: int, reason: int) -> None:
    p = Pair()
    p.login()
    hdr = bytearray(pdus.nop_out(itt=0x99, ttt=RESERVED_TAG, cmd_sn=p.ini.cmd_sn,
                                 exp_stat_sn=p.ini.exp_stat_sn))
    hdr[0] = 0x40 | opcode
    p.ini.send_pdu(hdr)
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == reason and reject.header == bytes(hdr)
    assert not p.closed and p.command(0, TUR).status == 0


def test_snack_is_rejected_at_error_recovery_level_0() -> None:
    p = Pair()
    p.login()
    p.ini.send_pdu(pdus.snack_request(snack_type=0, lun=0, itt=1, ttt=RESERVED_TAG,
                                      exp_stat_sn=p.ini.exp_stat_sn, beg_run=0,
                                      run_length=0))
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.SNACK_REJECT and reject.rejected_opcode == Op.SNACK_REQ


@pytest.mark.parametrize("data_digest", [False, True])
def test_oversize_data_segment_is_rejected_and_skipped(data_digest: bool) -> None:
    p = Pair(limits=TargetLimits(max_recv_data_segment_length=1024), data_digest=data_digest)
    p.login()
    itt = p.ini.send_nop(b"x" * 1025)
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.PROTOCOL_ERROR and reject.ended_itt == itt
    assert not p.closed
    assert p.command(0, TUR).status == 0


def test_oversize_command_keeps_the_command_numbering() -> None:
    p = Pair(limits=TargetLimits(max_recv_data_segment_length=1024),
             keys={"ImmediateData": True})
    p.login()
    p.ini.params.target_max_recv_data_segment_length = 4096  # the initiator oversteps
    itt = p.ini.send_command(0, bytes([0x2A]) + bytes(9), bytes(2048))
    p.ini.params.target_max_recv_data_segment_length = 1024
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.ended_itt == itt and p.device.executed == []
    assert p.command(0, TUR).status == 0 and not p.closed


def test_reserved_and_busy_task_tags() -> None:
    p = Pair()
    p.login()
    held = p.ini.send_command(0, HOLD_CDB)
    p.pump()
    for itt, reason in [(RESERVED_TAG, RejectReason.INVALID_PDU_FIELD),
                        (held, RejectReason.TASK_IN_PROGRESS)]:
        p.ini.send_pdu(pdus.scsi_command(lun=0, itt=itt, edtl=0, cmd_sn=p.ini.cmd_sn,
                                         exp_stat_sn=p.ini.exp_stat_sn, cdb=TUR, read=False,
                                         write=False, final=True, attr=1, dsl=0))
        p.ini.cmd_sn += 1
        p.pump()
        rejects = [e for e in p.take(Rejected)]
        assert [r.reason for r in rejects] == [reason]
    p.device.finish(held)
    p.pump()
    assert p.result(held).status == 0


# ---------------------------------------------------------------------------------- digests
def test_header_digest_error_drops_the_connection() -> None:
    p = Pair(header_digest=True)
    p.login()
    hdr = pdus.nop_out(itt=5, ttt=RESERVED_TAG, cmd_sn=p.ini.cmd_sn,
                       exp_stat_sn=p.ini.exp_stat_sn)
    wire = bytearray(frame(hdr, header_digest=True))
    wire[-1] ^= 0x01
    p.to_target(bytes(wire))
    p.device.run()
    assert p.closed and p.device.closed == ["header digest error"]
    assert p.conn.data_to_send() == []


def test_header_digest_covers_the_ahs() -> None:
    p = Pair(header_digest=True)
    p.login()
    cdb = bytes([0x7F]) + bytes(31)
    assert p.command(0, cdb).status == 0
    ahs = pdus.extended_cdb_ahs(cdb)
    hdr = pdus.scsi_command(lun=0, itt=0x55, edtl=0, cmd_sn=p.ini.cmd_sn,
                            exp_stat_sn=p.ini.exp_stat_sn, cdb=cdb, read=False, write=False,
                            final=True, attr=1, dsl=0, ahs_len=len(ahs))
    wire = frame(bytes(hdr) + ahs, header_digest=True)
    p.to_target(wire[:48] + bytes([wire[48] ^ 1]) + wire[49:])  # corrupt the AHS
    p.device.run()
    assert p.closed


def test_data_digest_error_on_a_nop_is_rejected() -> None:
    p = Pair(data_digest=True)
    p.login()
    hdr = pdus.nop_out(itt=5, ttt=RESERVED_TAG, cmd_sn=p.ini.cmd_sn,
                       exp_stat_sn=p.ini.exp_stat_sn, dsl=4)
    wire = bytearray(frame(hdr, b"ping", data_digest=True))
    wire[-2] ^= 0x10
    p.to_target(bytes(wire))
    p.pump()
    (reject,) = p.take(Rejected)
    assert reject.reason == RejectReason.DATA_DIGEST_ERROR and not p.closed
    assert not p.take(NopReply)


def test_completions_are_commands_in_any_order() -> None:
    p = Pair()
    p.login()
    held = [p.ini.send_command(0, HOLD_CDB) for _ in range(4)]
    p.pump()
    for itt in reversed(held):
        p.device.finish(itt)
    p.pump()
    assert [e.itt for e in p.events if isinstance(e, CommandComplete)] == held[::-1]


def test_logout_for_recovery_is_refused_and_the_connection_carries_on() -> None:
    """ErrorRecoveryLevel 0 has no connection recovery: the target answers the Logout and
    keeps serving the connection (RFC 7143 11.15.1)."""
    from pytarget.iscsi import connection as C

    pair = Pair()
    pair.login()
    pair.ini.send_logout(pdu.LogoutReason.REMOVE_FOR_RECOVERY)
    pair.pump()
    assert pair.conn.state == C.State.FULL_FEATURE
    assert pair.command(0, read10(0, 1), read_length=512).status == 0
