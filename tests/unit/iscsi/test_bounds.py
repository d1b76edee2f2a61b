"""Bounds on what an initiator controls, on the in-memory Pair: the Data-Out memory budget,
immediate commands, text replies held for continuation, discarded Data-Out, the PDU receive
watchdog, login-phase framing faults, session limits, access lists and LUN masking."""

from __future__ import annotations

from pytarget.core.task import Nexus
from pytarget.initiator import pdus
from pytarget.initiator.protocol import LoginFailed, R2TReceived, Rejected, TextComplete
from pytarget.iscsi import connection as C
from pytarget.iscsi import pdu
from pytarget.iscsi.bounds import MemoryBudget
from pytarget.iscsi.errors import LoginStatus
from pytarget.iscsi.login import MAX_RESPONSE_TEXT
from pytarget.iscsi.node import AclEntry, TargetNode
from pytarget.iscsi.pdu import Op, RejectReason
from pytarget.iscsi.target import TargetRegistry

from .harness import (
    HOLD,
    INITIATOR,
    OTHER_TARGET,
    TARGET,
    TUR,
    Pair,
    frame,
    make_registry,
    produce,
    read10,
    write10,
)

MiB = 1 << 20
HOLD_CDB = bytes([HOLD]) + bytes(5)


# ---------------------------------------------------------------------------------- memory
def test_write_beyond_the_session_share_gets_task_set_full_then_succeeds() -> None:
    budget = MemoryBudget(total=64 * MiB, per_holder=2 * MiB)
    p = Pair(budget=budget, keys={"InitialR2T": False, "FirstBurstLength": 65536})
    p.login()
    session = p.conn.session
    assert session is not None
    # 3 MiB announced: more than this session may hold; its unsolicited data is discarded
    data = bytes(range(256)) * (3 * MiB // 256)
    refused = p.command(0, write10(0, len(data) // 512), data)
    assert refused.status == C.TASK_SET_FULL
    assert budget.used == 0 and session.data_out_reserved == 0 and not p.closed
    assert p.device.executed == []
    ok = p.command(0, write10(0, 2), data[:1024])
    assert ok.status == 0 and bytes(p.device.disk[:1024]) == data[:1024]
    assert budget.used == 0 and budget.refused == 1


def test_budget_is_shared_and_released_when_commands_end() -> None:
    budget = MemoryBudget(total=4 * MiB, per_holder=4 * MiB)
    p = Pair(budget=budget)
    p.login()
    itt = p.ini.send_command(0, write10(0, 6144), bytes(3 * MiB), manual_r2t=True,
                             immediate_length=0, unsolicited=False)
    p.pump()
    assert budget.used == 3 * MiB
    assert p.command(0, write10(0, 4096), bytes(2 * MiB)).status == C.TASK_SET_FULL
    for r2t in p.take(R2TReceived):
        p.ini.answer_r2t(r2t)
    p.pump()
    assert p.result(itt).status == 0 and budget.used == 0


def test_budget_released_when_the_connection_drops() -> None:
    budget = MemoryBudget(total=64 * MiB, per_holder=64 * MiB)
    p = Pair(budget=budget)
    p.login()
    p.ini.send_command(0, write10(0, 2048), bytes(MiB), manual_r2t=True, immediate_length=0,
                       unsolicited=False)
    p.pump()
    assert budget.used == MiB
    p.conn.close("test")
    assert budget.used == 0
    assert p.conn.session is not None and p.conn.session.data_out_reserved == 0


def test_short_data_in_does_not_pin_a_large_buffer() -> None:
    p = Pair()
    p.login()
    itt = p.ini.send_command(0, HOLD_CDB, read_length=512)
    p.pump()
    task = p.device.held.pop(itt)
    task.read = True
    task.edtl = 512
    big = bytearray(8 * MiB)
    p.conn.send_scsi_result(task, 0, None, big, len(big), 0)
    parts = p.conn._out
    assert not any(isinstance(b, memoryview) and b.obj is big for b in parts)
    p.pump()
    assert p.result(itt).overflow


# ---------------------------------------------------------------------------------- counts
def test_immediate_commands_beyond_the_window_are_rejected() -> None:
    p = Pair(window=4)
    p.login()
    for _ in range(4 + C.IMMEDIATE_SLACK):
        p.ini.send_command(0, HOLD_CDB, immediate=True)
    p.pump()
    assert len(p.device.held) == 4 + C.IMMEDIATE_SLACK and not p.take(Rejected)
    p.ini.send_command(0, HOLD_CDB, immediate=True)
    p.pump()
    [reject] = p.take(Rejected)
    assert reject.reason == RejectReason.IMMEDIATE_COMMAND_REJECT and not p.closed


def test_one_unfinished_text_reply_at_a_time() -> None:
    p = Pair(target_name=None, keys={"MaxRecvDataSegmentLength": 512})
    for n in range(40):
        p.registry.add_target(TargetNode(f"iqn.2026-11.io.pytarget:many-{n:03d}"))
    p.login()
    cmd_sn = p.ini.cmd_sn
    for i in range(20):
        # SendTargets whose reply needs continuing, never continued by this initiator
        p.to_target(frame(pdus.text_request(final=True, cont=False, dsl=16, itt=1000 + i,
                                            ttt=pdu.RESERVED_TAG, cmd_sn=cmd_sn + i,
                                            exp_stat_sn=p.ini.exp_stat_sn),
                          b"SendTargets=All\0"))
        p.conn.data_to_send()
    assert len(p.conn._text_out) == 1 and not p.closed


def test_discarded_data_out_itts_are_bounded() -> None:
    p = Pair(window=4, keys={"InitialR2T": False, "ImmediateData": False})
    p.login()
    for _ in range(2 * 4 + 1):
        itt = p.ini.alloc_itt()
        # out of the window: dropped, and its unsolicited Data-Out (never sent) remembered
        p.ini.send_pdu(pdus.scsi_command(lun=0, itt=itt, edtl=4096, cmd_sn=p.ini.cmd_sn + 1000,
                                         exp_stat_sn=p.ini.exp_stat_sn, cdb=write10(0, 8),
                                         read=False, write=True, final=False, attr=1, dsl=0))
        p.pump()
    assert p.closed


def test_session_limits() -> None:
    registry = make_registry()
    registry.max_sessions = 1
    first = Pair(registry=registry)
    first.login()
    second = Pair(registry=registry, isid=bytes.fromhex("800000000009"))
    second.ini.start_login()
    second.pump()
    assert second.take(LoginFailed)[0].status == LoginStatus.OUT_OF_RESOURCES
    # a reinstatement (same ISID and initiator) replaces the session, so it is allowed
    again = Pair(registry=registry)
    assert again.login().tsih


def test_per_target_session_limit() -> None:
    registry = make_registry()
    registry.target(TARGET).max_sessions = 1
    Pair(registry=registry).login()
    other = Pair(registry=registry, isid=bytes.fromhex("800000000009"))
    other.ini.start_login()
    other.pump()
    assert other.take(LoginFailed)[0].status == LoginStatus.OUT_OF_RESOURCES
    assert Pair(registry=registry, target_name=OTHER_TARGET,
                isid=bytes.fromhex("80000000000a")).login().tsih


# ---------------------------------------------------------------------------------- timers
def test_a_pdu_trickling_in_is_cut_off() -> None:
    p = Pair(pdu_timeout=10.0)
    p.login()
    hdr = pdus.nop_out(itt=p.ini.alloc_itt(), ttt=pdu.RESERVED_TAG, cmd_sn=p.ini.cmd_sn,
                       exp_stat_sn=p.ini.exp_stat_sn, dsl=1000)
    wire = frame(hdr, bytes(1000))
    p.to_target(wire[:20])
    assert p.conn.next_deadline() == 10.0
    p.tick(10.0)
    p.to_target(wire[20:48])  # the header is complete; its data trickles
    p.tick(20.0)
    assert not p.closed
    for i in range(8):
        p.to_target(wire[48 + i:49 + i])
    p.tick(30.0)
    assert p.closed and p.device.closed == ["PDU receive timeout"]


def test_a_partial_header_left_is_cut_off() -> None:
    p = Pair(pdu_timeout=10.0)
    p.login()
    p.to_target(bytes(10))
    p.tick(10.0)
    assert not p.closed
    p.tick(20.0)
    assert p.closed


def test_the_watchdog_spares_busy_healthy_sessions() -> None:
    p = Pair(pdu_timeout=10.0)
    p.login()
    for t in range(1, 100):
        p.now = float(t)
        assert p.command(0, read10(0, 1), read_length=512).status == 0
        p.tick(float(t))
    assert not p.closed


def test_the_watchdog_waits_while_the_driver_does_not_read() -> None:
    p = Pair(pdu_timeout=10.0)
    p.login()
    p.to_target(bytes(10))
    p.conn.rx_paused = True
    p.tick(10.0)
    p.tick(20.0)
    p.tick(30.0)
    assert not p.closed


def test_login_timeout_still_applies() -> None:
    p = Pair(login_timeout=5.0, pdu_timeout=1.0)
    p.to_target(bytes(10))
    p.tick(5.0)
    assert p.closed


# ---------------------------------------------------------------------------------- login
def test_oversized_login_pdu_fails_the_login_rather_than_rejecting() -> None:
    p = Pair()
    p.ini.start_login()
    p.ini.data_to_send()
    hdr = pdus.login_request(transit=True, cont=False, csg=1, nsg=3, dsl=300000,
                             isid=p.ini.isid, tsih=0, itt=1, cid=0, cmd_sn=1, exp_stat_sn=0)
    p.to_target(bytes(hdr))
    p.pump()
    assert not [b for b, _ in p.received if b.opcode == Op.REJECT]
    [failed] = p.take(LoginFailed)
    assert failed.status == LoginStatus.INITIATOR_ERROR and p.closed


def test_login_answers_that_would_not_fit_fail_the_login() -> None:
    keys = {f"X-com.example.k{i:04d}{'p' * 40}": "1" for i in range(250)}
    p = Pair(keys=keys)
    p.ini.start_login()
    p.pump()
    [failed] = p.take(LoginFailed)
    assert failed.status == LoginStatus.INITIATOR_ERROR
    assert len(",".join(keys)) > MAX_RESPONSE_TEXT


# ---------------------------------------------------------------------------------- access
def acl_registry() -> tuple[TargetRegistry, TargetNode]:
    registry = make_registry()
    node = registry.target(TARGET)
    assert node is not None
    node.acl = [AclEntry(INITIATOR.upper(), frozenset({1}))]
    registry.target(OTHER_TARGET).acl = [AclEntry("iqn.2026-11.io.example:someone", None)]
    return registry, node


def test_acl_denies_login_with_0202_after_the_delay() -> None:
    registry, _ = acl_registry()
    p = Pair(registry=registry, target_name=OTHER_TARGET, auth_failure_delay=1.0)
    p.ini.start_login()
    p.pump()
    assert not p.take(LoginFailed)
    p.tick(1.0)
    assert p.take(LoginFailed)[0].status == LoginStatus.AUTHORIZATION_FAILURE


def test_send_targets_lists_only_targets_the_initiator_may_log_into() -> None:
    registry, _ = acl_registry()
    p = Pair(registry=registry, target_name=None)
    p.login()
    p.ini.send_targets("All")
    p.pump()
    [done] = p.take(TextComplete)
    assert [v for k, v in done.pairs if k == "TargetName"] == [TARGET]
    p.ini.send_targets(OTHER_TARGET)
    p.pump()
    assert p.take(TextComplete)[0].pairs == ()


def test_masked_luns_do_not_exist() -> None:
    _, node = acl_registry()
    node.luns = {0: object(), 1: object()}  # type: ignore[dict-item]
    nexus = Nexus(INITIATOR, bytes(6), TARGET, 1, 1)
    assert node.visible_luns(nexus) == [1]
    assert node.lookup(1, nexus) is node.luns[1]
    assert not node.lookup(0, nexus).exists
    stranger = Nexus("iqn.2026-11.io.example:stranger", bytes(6), TARGET, 1, 1)
    assert node.visible_luns(stranger) == [] and not node.allows(stranger.initiator_name)


def test_commands_still_flow_after_a_refusal() -> None:
    p = Pair(budget=MemoryBudget(total=64 * MiB, per_holder=32 * MiB))
    p.login()
    assert p.command(0, TUR).status == 0
    assert p.command(0, produce(100), read_length=100).status == 0


def test_reads_count_against_the_budget() -> None:
    budget = MemoryBudget(total=64 * MiB, per_holder=32 * MiB)
    p = Pair(budget=budget)
    p.login()
    held = [p.ini.send_command(0, HOLD_CDB, read_length=8 * MiB) for _ in range(4)]
    p.pump()
    assert budget.used == 32 * MiB and len(p.device.held) == 4
    refused = p.command(0, read10(0, 1), read_length=512)
    assert refused.status == C.TASK_SET_FULL
    for itt in held:
        p.device.finish(itt)
    p.pump()
    assert budget.used == 0
    assert p.command(0, read10(0, 1), read_length=512).status == 0
