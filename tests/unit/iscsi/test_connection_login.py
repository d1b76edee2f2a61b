"""Logins through the target's Connection, driven by the sans-I/O initiator (no sockets)."""

from __future__ import annotations

import pytest

from pytarget.initiator import pdus
from pytarget.initiator.protocol import LoginFailed, LogoutComplete, Rejected, State
from pytarget.iscsi import connection as C
from pytarget.iscsi import pdu, text
from pytarget.iscsi.errors import LoginStatus
from pytarget.iscsi.params import TargetLimits
from pytarget.iscsi.pdu import Op

from .harness import INITIATOR, OTHER_TARGET, TARGET, TUR, Pair, frame, make_registry, split_pdus


def test_login_and_logout() -> None:
    p = Pair()
    ev = p.login()
    assert p.conn.state == C.State.FULL_FEATURE and p.ini.state is State.FULL_FEATURE
    assert ev.tsih == 1 and ev.unanswered == ()
    assert ev.params.target_portal_group_tag == 1 and ev.params.target_alias == "unit"
    session = p.conn.session
    assert session is not None and session.params.initiator_name == INITIATOR
    p.ini.send_logout()
    p.pump()
    (done,) = p.take(LogoutComplete)
    assert done.response == 0 and (done.time2wait, done.time2retain) == (2, 0)
    assert p.closed and p.device.closed == ["logout"]


def test_negotiated_values_match_on_both_sides() -> None:
    p = Pair(limits=TargetLimits(max_burst_length=65536, first_burst_length=16384,
                                 max_outstanding_r2t=4),
             keys={"MaxRecvDataSegmentLength": 4096, "MaxOutstandingR2T": 8,
                   "InitialR2T": True, "ImmediateData": False})
    ev = p.login()
    s = p.conn.session
    assert s is not None
    ours = ev.params
    assert (ours.max_burst_length, ours.first_burst_length) == (65536, 16384)
    assert (s.params.max_burst_length, s.params.first_burst_length) == (65536, 16384)
    assert ours.max_outstanding_r2t == s.params.max_outstanding_r2t == 4
    assert ours.initial_r2t and s.params.initial_r2t
    assert not ours.immediate_data and not s.params.immediate_data
    assert p.conn.params.initiator_max_recv_data_segment_length == 4096
    assert ours.target_max_recv_data_segment_length == 262144


@pytest.mark.parametrize("header_digest,data_digest", [(True, False), (False, True),
                                                       (True, True)])
def test_digests(header_digest: bool, data_digest: bool) -> None:
    p = Pair(header_digest=header_digest, data_digest=data_digest)
    ev = p.login()
    assert (ev.params.header_digest, ev.params.data_digest) == (header_digest, data_digest)
    assert (p.conn.params.header_digest, p.conn.params.data_digest) == (header_digest,
                                                                        data_digest)
    assert p.command(0, TUR).status == 0
    assert p.ini.send_nop(b"ping") and p.ini.outstanding == 1
    p.pump()
    assert p.ini.outstanding == 0


def test_security_stage() -> None:
    p = Pair(security_stage=True)
    p.login()
    first = p.target_pdus(Op.LOGIN_RSP)[0]
    assert (first[0].flags >> 2) & 3 == 0  # answered in SecurityNegotiation
    assert ("AuthMethod", "None") in text.parse(first[1])


def test_multi_pdu_login() -> None:
    """The initiator's text spans many Login Requests joined with the C bit."""
    p = Pair(login_pdu_limit=40, initiator_alias="a" * 100)
    ev = p.login()
    requests = [b for b, _ in pdus_sent(p) if b.opcode == Op.LOGIN_REQ]
    assert len(requests) > 5
    assert all(b.flags & pdu.F_CONTINUE for b in requests[:-1])
    assert not requests[-1].flags & pdu.F_CONTINUE and requests[-1].flags & pdu.F_TRANSIT
    assert ev.unanswered == ()
    assert p.conn.session is not None
    assert p.conn.session.params.initiator_alias == "a" * 100


def pdus_sent(p: Pair) -> list[tuple[pdu.Bhs, bytes]]:
    return split_pdus(bytes(p.sent))


def test_first_response_carries_the_portal_group_tag() -> None:
    p = Pair(security_stage=True)
    p.login()
    first = text.parse(p.target_pdus(Op.LOGIN_RSP)[0][1])
    assert ("TargetPortalGroupTag", "1") in first


@pytest.mark.parametrize("keys,status", [
    ({"TargetName": "iqn.2026-11.io.pytarget:missing"}, LoginStatus.NOT_FOUND),
    ({"TargetName": None}, LoginStatus.MISSING_PARAMETER),
    ({"InitiatorName": None}, LoginStatus.MISSING_PARAMETER),
    ({"SessionType": "Boot"}, LoginStatus.SESSION_TYPE_NOT_SUPPORTED),
])
def test_login_failures(keys: dict[str, object], status: LoginStatus) -> None:
    p = Pair(keys=keys)
    p.ini.start_login()
    p.pump()
    (fail,) = p.take(LoginFailed)
    assert fail.status == status
    assert p.closed and p.ini.state is State.FAILED
    assert p.conn.session is None


def test_duplicate_key_fails_the_login() -> None:
    p = Pair()
    p.ini.state = State.LOGIN
    data = text.encode([("InitiatorName", INITIATOR), ("TargetName", TARGET),
                        ("ImmediateData", "Yes"), ("ImmediateData", "Yes")])
    p.to_target(frame(pdus.login_request(transit=True, cont=False, csg=1, nsg=3,
                                         dsl=len(data), isid=bytes(6), tsih=0, itt=1, cid=0,
                                         cmd_sn=1, exp_stat_sn=0), data))
    p.device.run()
    out = b"".join(bytes(b) for b in p.conn.data_to_send())
    assert out[0] == Op.LOGIN_RSP and (out[36], out[37]) == (2, 0)
    assert p.closed


def test_discovery_session_refuses_scsi() -> None:
    p = Pair(target_name=None)
    p.login()
    assert p.conn.session is not None and p.conn.session.discovery
    itt = p.ini.send_command(0, TUR)
    p.pump()
    (rejected,) = p.take(Rejected)
    assert rejected.reason == pdu.RejectReason.PROTOCOL_ERROR and rejected.ended_itt == itt
    assert p.device.executed == [] and not p.closed


def test_non_login_pdu_before_login_drops_the_connection() -> None:
    p = Pair()
    p.to_target(frame(pdus.nop_out(itt=1, ttt=pdu.RESERVED_TAG, cmd_sn=1, exp_stat_sn=0)))
    p.device.run()
    assert p.closed and p.conn.data_to_send() == []


def test_login_timeout() -> None:
    p = Pair(login_timeout=5.0, now=100.0)
    assert p.conn.next_deadline() == 105.0
    p.tick(104.9)
    assert not p.closed
    p.tick(105.0)
    assert p.closed and p.device.closed == ["login timed out"]


def test_login_deadline_cleared_once_logged_in() -> None:
    p = Pair(login_timeout=5.0)
    p.login()
    assert p.conn.next_deadline() is None  # no NOP interval in this pair
    p.tick(1000.0)
    assert not p.closed


def test_session_reinstatement_replaces_the_old_session() -> None:
    """A new leading login with the same ISID replaces the session (RFC 7143 6.3.5)."""
    registry = make_registry()
    isid = bytes.fromhex("80aabbccdd01")
    first = Pair(registry=registry, isid=isid)
    first.login()
    second = Pair(registry=registry, isid=isid)
    second.login()
    assert first.conn.session is not None and second.conn.session is not None
    assert second.device.replaced == [first.conn.session]
    assert registry.sessions == {second.conn.session.tsih: second.conn.session}
    other = Pair(registry=registry, isid=bytes.fromhex("80aabbccdd02"))
    other.login()
    assert other.device.replaced == [] and len(registry.sessions) == 2
    elsewhere = Pair(registry=registry, isid=isid, target_name=OTHER_TARGET)
    elsewhere.login()
    assert elsewhere.device.replaced == []  # another target: another I_T nexus


def test_pdu_during_login_binding_drops_the_connection() -> None:
    p = Pair()
    p.ini.start_login()
    p.to_target(p.ini.data_to_send())
    assert isinstance(p.conn.events[0], C.LoginReady)
    p.to_target(frame(pdus.nop_out(itt=1, ttt=pdu.RESERVED_TAG, cmd_sn=1, exp_stat_sn=0)))
    assert p.closed
