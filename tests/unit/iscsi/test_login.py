"""The target's login state machine (RFC 7143 6.3, 11.12, 11.13), one Login Request at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pytarget.initiator import pdus
from pytarget.iscsi import pdu, text
from pytarget.iscsi.auth import Authenticator, NoAuthentication
from pytarget.iscsi.errors import LoginError, LoginStatus
from pytarget.iscsi.login import (
    FULL_FEATURE,
    MAX_LOGIN_PDUS,
    OPERATIONAL,
    SECURITY,
    LoginMachine,
    LoginResponse,
)
from pytarget.iscsi.params import KEYS, TargetLimits
from pytarget.iscsi.pdu import Bhs

TARGET = "iqn.2026-11.io.pytarget:login"
INITIATOR = "iqn.2026-11.io.pytarget.login:initiator"
ISID = bytes.fromhex("800000000001")
NAMES = [("InitiatorName", INITIATOR), ("SessionType", "Normal"), ("TargetName", TARGET)]


class RequiredAuth(Authenticator):
    required = True

    def step(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [("AuthMethod", "Reject")]


@dataclass
class Policy:
    targets: dict[str, str] = field(default_factory=lambda: {TARGET: "disk"})
    denied: set[str] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    auth_required: bool = False
    checked: list[tuple[str, str, bytes, int, int]] = field(default_factory=list)

    def portal_group_tag(self) -> int:
        return 7

    def authenticator(self, session_type: str, target_name: str) -> Authenticator:
        return RequiredAuth() if self.auth_required else NoAuthentication()

    def check_target(self, target_name: str, initiator_name: str) -> str:
        if target_name not in self.targets:
            raise LoginError(LoginStatus.NOT_FOUND, "no such target")
        if initiator_name in self.denied:
            raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, "denied")
        return self.targets[target_name]

    def check_session(self, initiator_name: str, target_name: str, isid: bytes, tsih: int,
                      cid: int) -> None:
        self.checked.append((initiator_name, target_name, isid, tsih, cid))
        if tsih not in self.sessions:
            raise LoginError(LoginStatus.SESSION_DOES_NOT_EXIST, "no session")


@dataclass
class Answer:
    response: LoginResponse
    bhs: Bhs
    pairs: list[tuple[str, str]]

    @property
    def status(self) -> int:
        return self.bhs.raw[36] << 8 | self.bhs.raw[37]

    @property
    def transit(self) -> bool:
        return bool(self.bhs.flags & pdu.F_TRANSIT)

    @property
    def stages(self) -> tuple[int, int]:
        return (self.bhs.flags >> 2) & 3, self.bhs.flags & 3

    @property
    def keys(self) -> dict[str, str]:
        return dict(self.pairs)


def send(m: LoginMachine, pairs: list[tuple[str, str]] | bytes, *, csg: int = OPERATIONAL,
         nsg: int = FULL_FEATURE, transit: bool = True, cont: bool = False, isid: bytes = ISID,
         tsih: int = 0, cid: int = 0, cmd_sn: int = 10, itt: int = 1, version_min: int = 0,
         opcode: int = pdu.Op.LOGIN_REQ) -> Answer:
    data = pairs if isinstance(pairs, bytes) else text.encode(pairs)
    hdr = pdus.login_request(transit=transit, cont=cont, csg=csg, nsg=nsg, dsl=len(data),
                             isid=isid, tsih=tsih, itt=itt, cid=cid, cmd_sn=cmd_sn,
                             exp_stat_sn=0, version_min=version_min)
    hdr[0] = opcode | 0x40
    response = m.receive(Bhs(hdr), data)
    bhs = Bhs(response.header)
    assert bhs.opcode == pdu.Op.LOGIN_RSP
    assert bhs.data_segment_length == len(response.data)
    return Answer(response, bhs, text.parse(response.data))


def machine(policy: Policy | None = None, **limits: object) -> LoginMachine:
    return LoginMachine(policy or Policy(), TargetLimits(**limits), stat_sn=100, window=32)  # type: ignore[arg-type]


def failed(a: Answer, status: LoginStatus, m: LoginMachine) -> None:
    assert a.status == status, f"0x{a.status:04x}"
    assert not a.transit and a.pairs == []
    assert m.failed and m.result is None


# ---------------------------------------------------------------------------------- stages
def test_security_then_operational_then_full_feature() -> None:
    m = machine()
    a = send(m, NAMES + [("AuthMethod", "None")], csg=SECURITY, nsg=OPERATIONAL)
    assert a.status == 0 and a.transit and a.stages == (SECURITY, OPERATIONAL)
    assert a.keys["AuthMethod"] == "None"
    assert a.keys["TargetPortalGroupTag"] == "7" and a.keys["TargetAlias"] == "disk"
    assert a.bhs.tsih == 0 and m.result is None
    b = send(m, [("MaxBurstLength", "65536")], csg=OPERATIONAL, nsg=FULL_FEATURE)
    assert b.status == 0 and b.transit and b.stages == (OPERATIONAL, FULL_FEATURE)
    assert b.keys == {"MaxBurstLength": "65536", "MaxRecvDataSegmentLength": "262144"}
    assert "TargetPortalGroupTag" not in b.keys  # only in the first response
    result = m.result
    assert result is not None and result.isid == ISID and result.session.max_burst_length == 65536
    assert result.session.initiator_name == INITIATOR and result.session.target_name == TARGET
    assert result.target_alias == "disk"
    m.set_tsih(b.response, 0x1234)
    assert Bhs(b.response.header).tsih == 0x1234 and result.tsih == 0x1234


def test_start_in_operational_stage() -> None:
    m = machine()
    a = send(m, NAMES)
    assert a.status == 0 and a.transit and a.stages == (OPERATIONAL, FULL_FEATURE)
    assert a.keys["TargetPortalGroupTag"] == "7"
    assert m.result is not None


def test_security_straight_to_full_feature() -> None:
    m = machine()
    a = send(m, NAMES + [("AuthMethod", "None")], csg=SECURITY, nsg=FULL_FEATURE)
    assert a.transit and a.stages == (SECURITY, FULL_FEATURE)
    assert a.keys["MaxRecvDataSegmentLength"] == "262144"
    assert m.result is not None


def test_stay_in_a_stage_without_transit() -> None:
    m = machine()
    a = send(m, NAMES + [("AuthMethod", "None")], csg=SECURITY, nsg=0, transit=False)
    assert a.status == 0 and not a.transit and a.stages == (SECURITY, 0)
    b = send(m, [], csg=SECURITY, nsg=OPERATIONAL)
    assert b.transit and b.stages == (SECURITY, OPERATIONAL)
    c = send(m, [("ImmediateData", "No")], csg=OPERATIONAL, transit=False, nsg=0)
    assert not c.transit and c.keys == {"ImmediateData": "No"} and m.result is None
    d = send(m, [], csg=OPERATIONAL)
    assert d.transit and d.keys == {"MaxRecvDataSegmentLength": "262144"}
    assert m.result is not None and not m.result.session.immediate_data


def test_continued_request_is_acknowledged_empty() -> None:
    """C bit: text continues in the next PDU; the target answers with an empty response."""
    m = machine()
    whole = text.encode(NAMES + [("MaxBurstLength", "65536"), ("FirstBurstLength", "4096")])
    first, second = whole[:37], whole[37:]  # split inside a key
    a = send(m, first, cont=True, transit=False, nsg=0)
    assert a.status == 0 and a.pairs == [] and not a.transit
    assert not a.bhs.flags & pdu.F_CONTINUE
    b = send(m, second)
    assert b.transit and b.keys["MaxBurstLength"] == "65536"
    assert b.keys["TargetPortalGroupTag"] == "7"
    assert m.result is not None and m.result.session.first_burst_length == 4096


def test_every_offered_key_is_answered() -> None:
    m = machine()
    offers = [(name, cases) for name, cases in {
        "HeaderDigest": "CRC32C,None", "DataDigest": "None", "MaxConnections": "1",
        "InitialR2T": "Yes", "ImmediateData": "Yes", "MaxRecvDataSegmentLength": "8192",
        "MaxBurstLength": "65536", "FirstBurstLength": "8192", "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "20", "MaxOutstandingR2T": "1", "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes", "ErrorRecoveryLevel": "0", "IFMarker": "No",
        "OFMarker": "No", "iSCSIProtocolLevel": "1", "IFMarkInt": "2048",
        "X-com.example.Private": "1", "TargetAlias": "mine", "SendTargets": "All"}.items()]
    assert {k for k, _ in offers} >= set(KEYS)
    a = send(m, NAMES + offers)
    answered = [k for k, _ in a.pairs]
    for name, _ in offers:
        assert answered.count(name) == 1, name  # every key answered exactly once
    keys = dict(a.pairs)
    assert keys["X-com.example.Private"] == "NotUnderstood"
    assert keys["IFMarkInt"] == "Reject"
    assert keys["TargetAlias"] == "Reject"  # only a target may declare it
    assert keys["SendTargets"] == "Reject"  # not a login key
    assert keys["MaxRecvDataSegmentLength"] == "262144"  # our own declaration


def test_status_sequence_numbers() -> None:
    m = machine()
    a = send(m, NAMES + [("AuthMethod", "None")], csg=SECURITY, nsg=OPERATIONAL, cmd_sn=50)
    assert (a.bhs.w24, a.bhs.w28, a.bhs.w32) == (100, 50, 50)  # window opens only at the end
    b = send(m, [], cmd_sn=50)
    assert (b.bhs.w24, b.bhs.w28, b.bhs.w32) == (101, 50, 50 + 32 - 1)
    assert m.stat_sn == 102


# ---------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("csg,nsg", [(OPERATIONAL, OPERATIONAL), (OPERATIONAL, SECURITY),
                                     (SECURITY, SECURITY), (SECURITY, 2), (OPERATIONAL, 2)])
def test_transit_must_move_forward(csg: int, nsg: int) -> None:
    m = machine()
    pairs = NAMES + ([("AuthMethod", "None")] if csg == SECURITY else [])
    failed(send(m, pairs, csg=csg, nsg=nsg), LoginStatus.INITIATOR_ERROR, m)


def test_continue_and_transit_together() -> None:
    m = machine()
    failed(send(m, NAMES, cont=True, transit=True), LoginStatus.INITIATOR_ERROR, m)


@pytest.mark.parametrize("csg", [2, FULL_FEATURE])
def test_first_request_in_a_later_stage(csg: int) -> None:
    m = machine()
    failed(send(m, NAMES, csg=csg, nsg=FULL_FEATURE, transit=False), LoginStatus.INITIATOR_ERROR,
           m)


def test_stage_mismatch() -> None:
    m = machine()
    send(m, NAMES + [("AuthMethod", "None")], csg=SECURITY, nsg=0, transit=False)
    failed(send(m, [], csg=OPERATIONAL), LoginStatus.INITIATOR_ERROR, m)


def test_isid_changed() -> None:
    m = machine()
    send(m, NAMES, transit=False, nsg=0)
    failed(send(m, [], isid=bytes(6)), LoginStatus.INITIATOR_ERROR, m)


@pytest.mark.parametrize("pairs,status", [
    ([("SessionType", "Normal"), ("TargetName", TARGET)], LoginStatus.MISSING_PARAMETER),
    ([("InitiatorName", INITIATOR)], LoginStatus.MISSING_PARAMETER),
    ([("InitiatorName", INITIATOR), ("TargetName", "iqn.2026-11.io.pytarget:none")],
     LoginStatus.NOT_FOUND),
    ([("InitiatorName", INITIATOR), ("SessionType", "Boot"), ("TargetName", TARGET)],
     LoginStatus.SESSION_TYPE_NOT_SUPPORTED),
])
def test_names(pairs: list[tuple[str, str]], status: LoginStatus) -> None:
    m = machine()
    failed(send(m, pairs), status, m)


def test_initiator_not_allowed() -> None:
    m = machine(Policy(denied={INITIATOR}))
    failed(send(m, NAMES), LoginStatus.AUTHORIZATION_FAILURE, m)


def test_discovery_session() -> None:
    m = machine()
    a = send(m, [("InitiatorName", INITIATOR), ("SessionType", "Discovery")])
    assert a.status == 0 and a.transit
    assert m.result is not None and m.result.session.session_type == "Discovery"
    assert m.result.session.target_name == ""


def test_unsupported_version() -> None:
    m = machine()
    failed(send(m, NAMES, version_min=1), LoginStatus.UNSUPPORTED_VERSION, m)


def test_not_a_login_request() -> None:
    m = machine()
    failed(send(m, NAMES, opcode=pdu.Op.TEXT_REQ), LoginStatus.INVALID_DURING_LOGIN, m)


def test_duplicate_key() -> None:
    m = machine()
    failed(send(m, NAMES + [("MaxBurstLength", "512"), ("MaxBurstLength", "512")]),
           LoginStatus.INITIATOR_ERROR, m)


def test_duplicate_key_across_requests() -> None:
    m = machine()
    send(m, NAMES + [("MaxBurstLength", "512")], transit=False, nsg=0)
    failed(send(m, [("MaxBurstLength", "512")]), LoginStatus.INITIATOR_ERROR, m)


def test_security_key_outside_security_stage() -> None:
    m = machine()
    failed(send(m, NAMES + [("AuthMethod", "None")]), LoginStatus.INITIATOR_ERROR, m)


def test_chap_keys_without_chap() -> None:
    m = machine()
    failed(send(m, NAMES + [("AuthMethod", "None"), ("CHAP_A", "5")], csg=SECURITY,
                nsg=OPERATIONAL), LoginStatus.INITIATOR_ERROR, m)


def test_auth_method_without_none() -> None:
    m = machine()
    a = send(m, NAMES + [("AuthMethod", "CHAP")], csg=SECURITY, nsg=OPERATIONAL)
    assert a.keys["AuthMethod"] == "Reject"


def test_authentication_required_but_skipped() -> None:
    m = machine(Policy(auth_required=True))
    failed(send(m, NAMES), LoginStatus.AUTHENTICATION_FAILURE, m)


def test_too_many_requests() -> None:
    m = machine()
    a = send(m, NAMES + [("AuthMethod", "None")], csg=SECURITY, nsg=0, transit=False)
    for _ in range(MAX_LOGIN_PDUS - 1):
        a = send(m, [], csg=SECURITY, nsg=0, transit=False)
        assert a.status == 0
    failed(send(m, [], csg=SECURITY, nsg=0, transit=False), LoginStatus.INITIATOR_ERROR, m)


def test_text_too_long() -> None:
    m = machine()
    chunk = b"X-Pad=" + b"p" * 8000 + b"\0"
    for _ in range(8):
        send(m, chunk, cont=True, transit=False, nsg=0)
    failed(send(m, chunk, cont=True, transit=False, nsg=0), LoginStatus.INITIATOR_ERROR, m)


def test_malformed_text() -> None:
    m = machine()
    failed(send(m, b"InitiatorName\0"), LoginStatus.INITIATOR_ERROR, m)


# ---------------------------------------------------------------------------------- sessions
def test_connection_to_an_existing_session() -> None:
    policy = Policy(sessions={5})
    m = machine(policy)
    a = send(m, NAMES + [("HeaderDigest", "None")], tsih=5, cid=2)
    assert a.status == 0 and a.bhs.tsih == 5
    assert policy.checked == [(INITIATOR, TARGET, ISID, 5, 2)]
    assert m.result is not None and m.result.tsih == 5 and m.result.cid == 2


def test_connection_to_a_missing_session() -> None:
    m = machine(Policy())
    failed(send(m, NAMES, tsih=9), LoginStatus.SESSION_DOES_NOT_EXIST, m)


def test_session_keys_only_on_the_leading_connection() -> None:
    m = machine(Policy(sessions={5}))
    failed(send(m, NAMES + [("MaxBurstLength", "512")], tsih=5), LoginStatus.INITIATOR_ERROR,
           m)
