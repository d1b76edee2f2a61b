"""The target side of the iSCSI login phase as a sans-I/O state machine (RFC 7143 6.3, 11.12).

`LoginMachine.receive` takes one Login Request (header and data segment) and returns the Login
Response to send. It walks the stages SecurityNegotiation (0) → LoginOperationalNegotiation (1)
→ FullFeaturePhase (3), gathers text continued with the C bit, answers the keys through
`params.Negotiator` and `auth.Authenticator`, and reports the outcome in `result` once the
final response is built. Any failure is a LoginError, turned into a status response in
`receive` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import pdu, text
from .auth import Authenticator
from .errors import LoginError, LoginStatus
from .params import (
    DECLARATIVE_FROM_INITIATOR,
    SECURITY_KEYS,
    TARGET_ONLY_KEYS,
    ConnectionParams,
    Negotiator,
    SessionParams,
    TargetLimits,
)

SECURITY, OPERATIONAL, FULL_FEATURE = pdu.LoginStage
VERSION = 0x00
MAX_LOGIN_PDUS = 64
# Login Responses carry at most the default MaxRecvDataSegmentLength (RFC 7143 13.12);
# this target never continues a response, so a request whose answers would not fit fails.
MAX_RESPONSE_TEXT = 8192


class LoginPolicy(Protocol):
    """What the login needs to know about the target: names, access and sessions."""

    def portal_group_tag(self) -> int: ...

    def authenticator(self, session_type: str, target_name: str) -> Authenticator: ...

    def check_target(self, target_name: str, initiator_name: str) -> str:
        """Raise LoginError unless the initiator may log into the target; returns its alias."""
        ...

    def check_session(self, initiator_name: str, target_name: str, isid: bytes, tsih: int,
                      cid: int) -> None:
        """Raise LoginError when a non-zero TSIH names no session or one that is full."""
        ...


@dataclass
class LoginResult:
    session: SessionParams
    connection: ConnectionParams
    isid: bytes
    tsih: int
    cid: int
    cmd_sn: int
    exp_stat_sn: int
    target_alias: str


@dataclass
class LoginResponse:
    header: bytearray
    data: bytes
    status: LoginStatus


class LoginMachine:
    def __init__(self, policy: LoginPolicy, limits: TargetLimits, stat_sn: int = 1,
                 window: int = 128) -> None:
        self.policy = policy
        self.limits = limits
        self.stat_sn = stat_sn
        self.window = window
        self.stage: int | None = None
        self.negotiator = Negotiator(limits)
        self.auth: Authenticator | None = None
        self.isid = b""
        self.tsih = 0
        self.cid = 0
        self.itt = 0
        self.cmd_sn = 0
        self.exp_stat_sn = 0
        self.target_alias = ""
        self.pending_text = bytearray()
        self.pdus = 0
        self.first = True
        self.tpgt_sent = False
        self.result: LoginResult | None = None
        self.failed = False
        self.failure = ""  # why, for the log (never a secret)

    def receive(self, bhs: pdu.Bhs, data: bytes | memoryview) -> LoginResponse:
        """Answer one Login Request. After a non-SUCCESS response the connection must close."""
        try:
            return self._receive(bhs, data)
        except LoginError as exc:
            return self.fail(exc)

    def fail(self, exc: LoginError) -> LoginResponse:
        """The status response that ends this login."""
        self.failed = True
        self.failure = exc.reason
        return self._response(0, 0, 0, b"", exc.status)

    def _receive(self, bhs: pdu.Bhs, data: bytes | memoryview) -> LoginResponse:
        if bhs.opcode != pdu.Op.LOGIN_REQ:
            raise LoginError(LoginStatus.INVALID_DURING_LOGIN, "non-login PDU during login")
        self.pdus += 1
        if self.pdus > MAX_LOGIN_PDUS:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "too many login PDUs")
        transit = bool(bhs.flags & pdu.F_TRANSIT)
        cont = bool(bhs.flags & pdu.F_CONTINUE)
        csg = (bhs.flags >> 2) & 3
        nsg = bhs.flags & 3
        if self.first:
            self._first_pdu(bhs, csg)
        elif bhs.isid != self.isid or bhs.tsih != self.tsih:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "ISID or TSIH changed during login")
        self.itt = bhs.itt
        self.cmd_sn = bhs.cmd_sn
        self.exp_stat_sn = bhs.exp_stat_sn
        if csg != self.stage:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"CSG {csg} in stage {self.stage}")
        if cont and transit:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "C and T bits both set")
        if transit and (nsg <= csg or nsg == 2):
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"bad NSG {nsg} from CSG {csg}")
        self.pending_text += data
        if len(self.pending_text) > text.MAX_TEXT_BYTES:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "login text too long")
        if cont:
            return self._response(0, csg, 0, b"", LoginStatus.SUCCESS)
        pairs = text.parse(self.pending_text)
        self.pending_text.clear()
        if self.first:
            self._first_keys(pairs)
            self.first = False
        answers = self._answer(csg, pairs)
        done = self._stage_done(csg)
        if transit and done:
            if nsg == FULL_FEATURE:
                answers += self.negotiator.finish()
                self.negotiator.settle()
            payload = self._text(answers)
            if nsg == FULL_FEATURE and self.tsih == 0:
                self.tsih = -1  # the caller assigns it once the session is bound
            self.stage = nsg
            return self._response(pdu.F_TRANSIT, csg, nsg, payload, LoginStatus.SUCCESS)
        return self._response(0, csg, 0, self._text(answers), LoginStatus.SUCCESS)

    @staticmethod
    def _text(answers: list[tuple[str, str]]) -> bytes:
        payload = text.encode(answers)
        if len(payload) > MAX_RESPONSE_TEXT:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "too many keys to answer")
        return payload

    def _first_pdu(self, bhs: pdu.Bhs, csg: int) -> None:
        if bhs.version_min > VERSION:
            raise LoginError(LoginStatus.UNSUPPORTED_VERSION, "no common iSCSI version")
        if csg not in (SECURITY, OPERATIONAL):
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"login starts in stage {csg}")
        self.stage = csg
        self.isid = bhs.isid
        self.tsih = bhs.tsih
        self.cid = bhs.cid

    def _first_keys(self, pairs: list[tuple[str, str]]) -> None:
        keys = dict(pairs)
        s = self.negotiator.session
        s.initiator_name = keys.get("InitiatorName", "")
        s.initiator_alias = keys.get("InitiatorAlias", "")
        s.session_type = keys.get("SessionType", "Normal")
        if not s.initiator_name:
            raise LoginError(LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
        if s.session_type not in ("Normal", "Discovery"):
            raise LoginError(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, "unknown SessionType")
        if s.session_type == "Normal":
            s.target_name = keys.get("TargetName", "")
            if not s.target_name:
                raise LoginError(LoginStatus.MISSING_PARAMETER, "TargetName missing")
            self.target_alias = self.policy.check_target(s.target_name, s.initiator_name)
        self.negotiator.leading = self.tsih == 0
        if self.tsih:
            self.policy.check_session(s.initiator_name, s.target_name, self.isid, self.tsih,
                                      self.cid)
        self.auth = self.policy.authenticator(s.session_type, s.target_name)
        if self.stage == OPERATIONAL and self.auth.required:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "authentication required")

    def _answer(self, csg: int, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        assert self.auth is not None
        security: list[tuple[str, str]] = []
        for name, value in pairs:
            if name in DECLARATIVE_FROM_INITIATOR:
                continue
            if name in SECURITY_KEYS:
                if csg != SECURITY:
                    raise LoginError(LoginStatus.INITIATOR_ERROR, f"{name} outside security")
                security.append((name, value))
            elif name in TARGET_ONLY_KEYS:
                answers.append((name, "Reject"))
            elif name == "SendTargets":
                answers.append((name, "Reject"))
            else:
                reply = self.negotiator.answer(name, value)
                if reply is not None:
                    answers.append((name, reply))
        if csg == SECURITY:
            answers = self.auth.step(security) + answers
        if not self.tpgt_sent and self.negotiator.session.session_type == "Normal":
            self.tpgt_sent = True
            answered = {name for name, _ in answers}
            if "TargetPortalGroupTag" not in answered:
                answers.append(("TargetPortalGroupTag", str(self.policy.portal_group_tag())))
            if self.target_alias and "TargetAlias" not in answered:
                answers.append(("TargetAlias", self.target_alias))
        return answers

    def _stage_done(self, csg: int) -> bool:
        assert self.auth is not None
        if csg == SECURITY:
            return self.auth.done
        return True

    def _response(self, flags: int, csg: int, nsg: int, data: bytes,
                  status: LoginStatus) -> LoginResponse:
        stat_sn = self.stat_sn
        self.stat_sn += 1
        tsih = self.tsih if self.tsih > 0 else 0
        final = status == LoginStatus.SUCCESS and flags & pdu.F_TRANSIT and nsg == FULL_FEATURE
        max_cmd_sn = (self.cmd_sn + (self.window - 1 if final else 0)) & 0xFFFFFFFF
        header = pdu.login_response(
            flags | (csg << 2) | nsg, VERSION, VERSION, len(data), self.isid or bytes(6), tsih,
            self.itt, stat_sn, self.cmd_sn, max_cmd_sn, status >> 8, status & 0xFF)
        if final:
            self.result = LoginResult(self.negotiator.session, self.negotiator.connection,
                                      self.isid, self.tsih, self.cid, self.cmd_sn,
                                      self.exp_stat_sn, self.target_alias)
        return LoginResponse(header, data, status)

    def set_tsih(self, response: LoginResponse, tsih: int) -> None:
        """Write the TSIH the session registry assigned into the final response."""
        assert self.result is not None
        self.result.tsih = tsih
        response.header[14] = tsih >> 8
        response.header[15] = tsih & 0xFF
