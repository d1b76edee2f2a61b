"""The initiator side of one iSCSI connection as a sans-I/O state machine (RFC 7143).

Bytes from the target go in through `receive_data`, bytes for the target come out of
`data_to_send`, and what happened comes out of `next_event` as frozen dataclasses. Requests
(`send_command`, `send_text`, `send_tmf`, `send_nop`, `send_logout`) return the Initiator Task
Tag their outcome will carry. The connection negotiates login keys (answering whatever the
target says), numbers commands within the target's CmdSN window, sends immediate, unsolicited and
R2T-solicited Data-Out within the negotiated bursts, and reassembles Data-In. A target that
breaks the protocol raises `ProtocolError`: after it the byte stream cannot be trusted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..core.task import TaskAttr
from ..iscsi import digest as dg
from ..iscsi import pdu, text
from ..iscsi.errors import ConnectionFatal, IscsiError
from ..iscsi.framing import PduReader
from ..iscsi.params import KEYS, Rule
from ..iscsi.pdu import (
    BHS_LEN,
    RESERVED_TAG,
    Bhs,
    Op,
    RejectReason,
    TmfFunction,
    TmfResponse,
    sn_le,
    sn_lt,
)
from . import pdus

SECURITY, OPERATIONAL, FULL_FEATURE = pdu.LoginStage
DEFAULT_ISID = bytes([0x80, 0x00, 0x00, 0x00, 0x00, 0x01])  # random-qualifier format (11.12.5)
LOGIN_PDU_LIMIT = 8192  # MaxRecvDataSegmentLength before it is negotiated (RFC 7143 13.12)
MAX_LOGIN_ROUNDS = 32
MAX_TEXT = 1 << 20
RECEIVE_STAGING = 1 << 18  # grows for a PDU that does not fit

NAME_KEYS = ("InitiatorName", "InitiatorAlias", "SessionType", "TargetName")
NO_ANSWER = frozenset({"NotUnderstood", "Irrelevant", "Reject"})
# What this initiator offers unless told otherwise (close to common initiators' defaults).
DEFAULT_OFFER: dict[str, str] = {
    "HeaderDigest": "None",
    "DataDigest": "None",
    "MaxConnections": "1",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": "262144",
    "MaxBurstLength": "16776192",
    "FirstBurstLength": "262144",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "0",
    "MaxOutstandingR2T": "1",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0",
}


class ProtocolError(IscsiError):
    """The target broke RFC 7143 in a way that leaves the connection unusable."""


class State(Enum):
    IDLE = "idle"
    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"
    FAILED = "failed"


# ---------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class LoginComplete:
    tsih: int
    params: Negotiated
    target_keys: tuple[tuple[str, str], ...]
    unanswered: tuple[str, ...]  # keys we offered that the target never answered


@dataclass(frozen=True)
class LoginFailed:
    status_class: int
    status_detail: int

    @property
    def status(self) -> int:
        return self.status_class << 8 | self.status_detail


@dataclass(frozen=True)
class TextComplete:
    itt: int
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CommandComplete:
    """SCSI status and data of one command (RFC 7143 11.4, 11.7)."""

    itt: int
    status: int
    response: int
    sense: bytes
    data: bytes
    residual_flags: int
    residual: int
    bidi_residual: int
    exp_data_sn: int
    data_in_pdus: int
    r2ts: int

    @property
    def overflow(self) -> bool:
        return bool(self.residual_flags & pdu.F_OVERFLOW)

    @property
    def underflow(self) -> bool:
        return bool(self.residual_flags & pdu.F_UNDERFLOW)


@dataclass(frozen=True)
class CommandAborted:
    """A command ended by a task management function this connection issued."""

    itt: int
    tmf_itt: int


@dataclass(frozen=True)
class R2TReceived:
    """An R2T for a command created with manual_r2t=True (answer with send_data_out)."""

    itt: int
    ttt: int
    r2t_sn: int
    offset: int
    length: int


@dataclass(frozen=True)
class NopReply:
    itt: int
    data: bytes


@dataclass(frozen=True)
class TargetPing:
    ttt: int
    answered: bool


@dataclass(frozen=True)
class TmfComplete:
    itt: int
    response: int


@dataclass(frozen=True)
class LogoutComplete:
    itt: int
    response: int
    time2wait: int
    time2retain: int


@dataclass(frozen=True)
class AsyncMessage:
    event: int
    lun_field: int
    parameter1: int
    parameter2: int
    parameter3: int
    data: bytes


@dataclass(frozen=True)
class Rejected:
    """A Reject PDU; `ended_itt` is the request it ended, if one of ours (RFC 7143 11.17)."""

    reason: int
    header: bytes
    ended_itt: int | None

    @property
    def rejected_opcode(self) -> int:
        return self.header[0] & 0x3F if self.header else -1

    @property
    def rejected_itt(self) -> int:
        return int.from_bytes(self.header[16:20], "big") if len(self.header) >= 20 else -1


Event = (LoginComplete | LoginFailed | TextComplete | CommandComplete | CommandAborted
         | R2TReceived | NopReply | TargetPing | TmfComplete | LogoutComplete | AsyncMessage
         | Rejected)


# ---------------------------------------------------------------------------------- values
@dataclass
class Negotiated:
    """Operational values in force once the login completed (RFC 7143 13)."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192  # what we declared we can receive
    target_max_recv_data_segment_length: int = 8192  # what the target can receive
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    max_connections: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    default_time2wait: int = 2
    default_time2retain: int = 20
    target_portal_group_tag: int | None = None
    target_alias: str = ""
    values: dict[str, str] = field(default_factory=dict)

    def apply(self, name: str, value: str) -> None:
        self.values[name] = value
        match name:
            case "HeaderDigest":
                self.header_digest = value == "CRC32C"
            case "DataDigest":
                self.data_digest = value == "CRC32C"
            case "MaxBurstLength":
                self.max_burst_length = int(value, 0)
            case "FirstBurstLength":
                self.first_burst_length = int(value, 0)
            case "InitialR2T":
                self.initial_r2t = value == "Yes"
            case "ImmediateData":
                self.immediate_data = value == "Yes"
            case "MaxOutstandingR2T":
                self.max_outstanding_r2t = int(value, 0)
            case "MaxConnections":
                self.max_connections = int(value, 0)
            case "DataPDUInOrder":
                self.data_pdu_in_order = value == "Yes"
            case "DataSequenceInOrder":
                self.data_sequence_in_order = value == "Yes"
            case "ErrorRecoveryLevel":
                self.error_recovery_level = int(value, 0)
            case "DefaultTime2Wait":
                self.default_time2wait = int(value, 0)
            case "DefaultTime2Retain":
                self.default_time2retain = int(value, 0)


class Authenticator:
    """The security stage (RFC 7143 12); this one offers AuthMethod=None.

    A CHAP authenticator overrides `methods`, `step` and `ready`: `step` receives the target's
    security keys and returns the keys of the next Login Request; `ready` says whether that
    request may ask to leave the stage.
    """

    methods = "None"

    def first_keys(self) -> list[tuple[str, str]]:
        return [("AuthMethod", self.methods)]

    def step(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for name, value in keys:
            if name == "AuthMethod" and value not in self.methods.split(","):
                raise ProtocolError(f"target chose AuthMethod={value}")
        return []

    def complete(self, keys: list[tuple[str, str]]) -> None:
        """The target left the security stage; `keys` are the security keys of that last
        response. Raise ProtocolError unless the target has authenticated itself as asked."""
        self.step(keys)

    @property
    def ready(self) -> bool:
        return True


def parse_sense(sense: bytes) -> tuple[int, int, int] | None:
    """(sense key, ASC, ASCQ) of fixed or descriptor format sense data (SPC-4 4.5)."""
    if len(sense) < 4:
        return None
    code = sense[0] & 0x7F
    if code in (0x70, 0x71):
        asc = sense[12] if len(sense) > 12 else 0
        ascq = sense[13] if len(sense) > 13 else 0
        return sense[2] & 0x0F, asc, ascq
    if code in (0x72, 0x73):
        return sense[1] & 0x0F, sense[2], sense[3]
    return None


def _key_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


# ---------------------------------------------------------------------------------- tasks
class _Command:
    __slots__ = ("itt", "lun_field", "cdb", "cmd_sn", "data_out", "read_length", "buffer",
                 "next_data_sn", "extent", "manual_r2t", "immediate_length", "unsolicited",
                 "immediate", "attr", "data_in_pdus", "r2ts")

    def __init__(self, itt: int, lun_field: int, cdb: bytes, data_out: memoryview,
                 read_length: int, manual_r2t: bool, immediate_length: int | None,
                 unsolicited: bool, immediate: bool, attr: TaskAttr) -> None:
        self.itt = itt
        self.lun_field = lun_field
        self.cdb = cdb
        self.cmd_sn = 0
        self.data_out = data_out
        self.read_length = read_length
        self.buffer = bytearray(read_length) if read_length else None
        self.next_data_sn = 0
        self.extent = 0
        self.manual_r2t = manual_r2t
        self.immediate_length = immediate_length
        self.unsolicited = unsolicited
        self.immediate = immediate
        self.attr = attr
        self.data_in_pdus = 0
        self.r2ts = 0


@dataclass
class _TextExchange:
    itt: int
    chunks: deque[bytes]
    received: bytearray = field(default_factory=bytearray)
    ttt: int = RESERVED_TAG
    immediate: bool = False


@dataclass
class _Tmf:
    function: int
    lun_field: int
    referenced_itt: int


class InitiatorConnection(PduReader):
    """One initiator connection: login, then full feature phase, then logout."""

    def __init__(self, initiator_name: str, *, target_name: str | None = None,
                 isid: bytes = DEFAULT_ISID, tsih: int = 0, cid: int = 0,
                 header_digest: bool = False, data_digest: bool = False,
                 keys: Mapping[str, str | int | bool | None] | None = None,
                 authenticator: Authenticator | None = None, security_stage: bool = False,
                 cmd_sn: int = 1, login_pdu_limit: int = LOGIN_PDU_LIMIT,
                 answer_pings: bool = True, initiator_alias: str | None = None,
                 trace: Callable[[Bhs, bytes], None] | None = None) -> None:
        if len(isid) != 6:
            raise ValueError("ISID is 6 bytes")
        self.initiator_name = initiator_name
        self.target_name = target_name
        self.isid = bytes(isid)
        self.tsih = tsih
        self.cid = cid
        self.state = State.IDLE
        self.params = Negotiated()
        self.answer_pings = answer_pings
        self.trace = trace  # sees every PDU received, before it is handled
        self.authenticator = authenticator
        self.login_pdu_limit = login_pdu_limit
        self._security = security_stage or authenticator is not None
        self._names: list[tuple[str, str]] = [("InitiatorName", initiator_name)]
        if initiator_alias:
            self._names.append(("InitiatorAlias", initiator_alias))
        if target_name is None:
            self._names.append(("SessionType", "Discovery"))
        else:
            self._names += [("SessionType", "Normal"), ("TargetName", target_name)]
        offer = dict(DEFAULT_OFFER)
        offer["HeaderDigest"] = "CRC32C" if header_digest else "None"
        offer["DataDigest"] = "CRC32C" if data_digest else "None"
        for name, value in (keys or {}).items():
            if name in NAME_KEYS:
                self._names = [(k, v) for k, v in self._names if k != name]
                if value is not None:
                    self._names.append((name, _key_text(value)))
            elif value is None:
                offer.pop(name, None)
            else:
                offer[name] = _key_text(value)
        self._offer = offer
        # Sequence numbers (RFC 7143 4.2.2).
        self.cmd_sn = cmd_sn & 0xFFFFFFFF
        self.exp_cmd_sn = self.cmd_sn
        self.max_cmd_sn = self.cmd_sn
        self.exp_stat_sn = 0
        self._stat_sn_known = False
        # Login.
        self._login_itt = 0
        self._stage: int = OPERATIONAL
        self._offered: dict[str, str] = {}
        self._login_chunks: deque[bytes] = deque()
        self._login_transit: tuple[bool, int] = (False, OPERATIONAL)
        self._login_in = bytearray()
        self._login_rounds = 0
        self._target_keys: list[tuple[str, str]] = []
        # Full feature phase.
        self._next_itt = 1
        self._commands: dict[int, _Command] = {}
        self._texts: dict[int, _TextExchange] = {}
        self._tmfs: dict[int, _Tmf] = {}
        self._nops: set[int] = set()
        self._logouts: set[int] = set()
        self._waiting: deque[Callable[[], None]] = deque()
        # Framing (the receive side is the shared PduReader).
        PduReader.__init__(self, RECEIVE_STAGING, pdu.MAX_DATA_SEGMENT)
        self._out: list[bytes | bytearray | memoryview] = []
        self._events: deque[Event] = deque()

    # ------------------------------------------------------------------ public I/O
    def data_to_send(self) -> bytes:
        out, self._out = self._out, []
        return b"".join(out)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    @property
    def outstanding(self) -> int:
        """Requests still waiting for their answer."""
        return len(self._commands) + len(self._texts) + len(self._tmfs) + len(self._nops) \
            + len(self._logouts)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the socket; complete PDUs are handled at once."""
        if self.state is State.FAILED:
            return
        view = memoryview(data).cast("B")
        try:
            while view and self.rx_open:
                buf = self.get_buffer()
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                view = view[n:]
                self._received(n)
        except ConnectionFatal as exc:
            self.state = State.FAILED
            self.rx_open = False
            raise ProtocolError(str(exc)) from None
        except ProtocolError:
            self.state = State.FAILED
            self.rx_open = False
            raise

    def _pdu(self, bhs: Bhs, data: memoryview) -> None:
        self._handle(bhs, bytes(data))
        if self.state is State.FAILED:
            self.rx_open = False

    def _data_digest_error(self, bhs: Bhs) -> None:
        raise ProtocolError("data digest error")

    # ------------------------------------------------------------------ output
    def _queue(self, hdr: bytes | bytearray, data: bytes | bytearray | memoryview = b"",
               ahs: bytes = b"") -> None:
        out = self._out
        out.append(hdr)
        if ahs:
            out.append(ahs)
        if self.header_digest:
            out.append(dg.digest((hdr, ahs)))
        n = len(data)
        if n:
            out.append(data)
            pad = bytes(pdu.pad_len(n))
            if pad:
                out.append(pad)
            if self.data_digest:
                out.append(dg.digest((data, pad)))

    def send_pdu(self, header: bytes | bytearray, data: bytes | bytearray = b"",
                 ahs: bytes = b"") -> None:
        """Queue an arbitrary PDU with the connection's digests (for negative tests)."""
        self._queue(header, data, ahs)

    def alloc_itt(self) -> int:
        while True:
            itt = self._next_itt
            self._next_itt = (itt + 1) & 0xFFFFFFFF
            if itt != RESERVED_TAG and itt not in self._commands and itt not in self._texts \
                    and itt not in self._tmfs and itt not in self._nops \
                    and itt not in self._logouts:
                return itt

    def _take_cmd_sn(self, immediate: bool) -> int:
        sn = self.cmd_sn
        if not immediate:
            self.cmd_sn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _window_open(self) -> bool:
        return sn_le(self.cmd_sn, self.max_cmd_sn)

    def _submit(self, immediate: bool, send: Callable[[], None]) -> None:
        """Send now, or hold a non-immediate request until MaxCmdSN admits it (4.2.2.1)."""
        if self.state is not State.FULL_FEATURE:
            raise RuntimeError(f"connection is {self.state.value}")
        if immediate:
            send()
        elif not self._waiting and self._window_open():
            send()
        else:
            self._waiting.append(send)

    def _release_waiting(self) -> None:
        while self._waiting and self._window_open() and self.state is State.FULL_FEATURE:
            self._waiting.popleft()()

    @property
    def queued(self) -> int:
        """Non-immediate requests held back by a closed CmdSN window."""
        return len(self._waiting)

    # ------------------------------------------------------------------ login
    def start_login(self) -> None:
        """Queue the first Login Request (RFC 7143 6.3)."""
        if self.state is not State.IDLE:
            raise RuntimeError("login already started")
        self.state = State.LOGIN
        self._login_itt = self.alloc_itt()
        if self._security:
            self._stage = SECURITY
            auth = self.authenticator or Authenticator()
            self.authenticator = auth
            self._send_login(self._names + auth.first_keys(), auth.ready, OPERATIONAL)
        else:
            self._stage = OPERATIONAL
            self._send_login(self._names + self._operational_offer(), True, FULL_FEATURE)

    def _operational_offer(self) -> list[tuple[str, str]]:
        return list(self._offer.items())

    def _send_login(self, offers: list[tuple[str, str]], transit: bool, nsg: int,
                    answers: list[tuple[str, str]] | None = None) -> None:
        """Login Requests carrying our answers and offers, continued with the C bit past
        `login_pdu_limit` bytes; offers are remembered until the target answers them."""
        for name, value in offers:
            if name != "AuthMethod" and not name.startswith("CHAP_"):
                self._offered.setdefault(name, value)
        payload = text.encode((answers or []) + offers)
        limit = max(self.login_pdu_limit, 1)
        chunks = [payload[i:i + limit] for i in range(0, len(payload), limit)] or [b""]
        self._login_chunks = deque(chunks)
        self._login_transit = (transit, nsg)
        self._send_login_chunk()

    def _send_login_chunk(self) -> None:
        chunk = self._login_chunks.popleft()
        last = not self._login_chunks
        transit, nsg = self._login_transit
        hdr = pdus.login_request(
            transit=transit and last, cont=not last, csg=self._stage,
            nsg=nsg if transit and last else 0, dsl=len(chunk), isid=self.isid, tsih=self.tsih,
            itt=self._login_itt, cid=self.cid, cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn)
        self._queue(hdr, chunk)

    def _login_response(self, bhs: Bhs, data: bytes) -> None:
        if bhs.opcode != Op.LOGIN_RSP:
            raise ProtocolError(f"opcode 0x{bhs.opcode:02x} during login")
        status_class, status_detail = bhs.raw[36], bhs.raw[37]
        if status_class:
            self.state = State.FAILED
            self._events.append(LoginFailed(status_class, status_detail))
            return
        self._login_rounds += 1
        if self._login_rounds > MAX_LOGIN_ROUNDS:
            raise ProtocolError("login does not converge")
        transit = bool(bhs.flags & pdu.F_TRANSIT)
        cont = bool(bhs.flags & pdu.F_CONTINUE)
        csg = (bhs.flags >> 2) & 3
        nsg = bhs.flags & 3
        if csg != self._stage:
            raise ProtocolError(f"login response for stage {csg} in stage {self._stage}")
        if self._login_chunks:
            if data or transit:
                raise ProtocolError("target answered a continued login request")
            self._send_login_chunk()
            return
        self._login_in += data
        if len(self._login_in) > MAX_TEXT:
            raise ProtocolError("login text too long")
        if cont:
            if transit:
                raise ProtocolError("login response with both C and T")
            self._login_chunks = deque([b""])
            self._login_transit = (False, 0)
            self._send_login_chunk()
            return
        pairs = text.parse(self._login_in)
        self._login_in.clear()
        self._target_keys += pairs
        self.tsih = bhs.tsih or self.tsih
        answers, security = self._take_login_keys(pairs)
        if transit:
            asked, want = self._login_transit
            if not asked or nsg != want:
                raise ProtocolError(f"target moved to stage {nsg} unasked")
            if csg == SECURITY and self.authenticator is not None:
                self.authenticator.complete(security)
            self._stage = nsg
            if nsg == FULL_FEATURE:
                self._enter_full_feature(bhs)
                return
            self._send_login(self._operational_offer(), True, FULL_FEATURE, answers)
            return
        if csg == SECURITY:
            assert self.authenticator is not None
            self._send_login(self.authenticator.step(security), self.authenticator.ready,
                             OPERATIONAL, answers)
        else:
            self._send_login([], True, FULL_FEATURE, answers)

    def _take_login_keys(self, pairs: list[tuple[str, str]]
                         ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Record the target's answers and declarations; answer what the target offered."""
        answers: list[tuple[str, str]] = []
        security: list[tuple[str, str]] = []
        p = self.params
        for name, value in pairs:
            if name == "AuthMethod" or name.startswith("CHAP_"):
                security.append((name, value))
            elif name == "TargetPortalGroupTag":
                p.target_portal_group_tag = int(value, 0)
            elif name == "TargetAlias":
                p.target_alias = value
            elif name in ("TargetAddress",):
                continue
            elif name == "MaxRecvDataSegmentLength":
                p.target_max_recv_data_segment_length = int(value, 0)
                p.values["TargetMaxRecvDataSegmentLength"] = value
            elif name in self._offered:
                self._check_answer(name, self._offered.pop(name), value)
            elif value in NO_ANSWER:
                continue
            else:
                reply = self._answer_offer(name, value)
                answers.append((name, reply))
        return answers, security

    def _check_answer(self, name: str, offer: str, value: str) -> None:
        """Validate the target's answer to our offer and record the result (RFC 7143 6.2)."""
        key = KEYS.get(name)
        if value in NO_ANSWER or key is None:
            if key is not None:
                self.params.apply(name, key.default)
            return
        ok = True
        if key.rule is Rule.LIST:
            ok = value in offer.split(",")
        elif key.rule in (Rule.AND, Rule.OR):
            ours = offer == "Yes"
            theirs = value == "Yes"
            ok = value in ("Yes", "No") and (
                (key.rule is Rule.AND and (ours or not theirs))
                or (key.rule is Rule.OR and (not ours or theirs)))
        elif key.rule in (Rule.MIN, Rule.MAX):
            try:
                number, mine = int(value, 0), int(offer, 0)
            except ValueError:
                ok = False
            else:
                ok = key.lo <= number <= key.hi and (
                    number <= mine if key.rule is Rule.MIN else number >= mine)
        if not ok:
            raise ProtocolError(f"target answered {name}={value} to {name}={offer}")
        if key.rule is Rule.DECLARE:
            return
        self.params.apply(name, value)

    def _answer_offer(self, name: str, value: str) -> str:
        """Our response to a key the target offered first (RFC 7143 6.2.2)."""
        key = KEYS.get(name)
        if key is None:
            return "NotUnderstood"
        mine = self._offer.get(name, key.default)
        if key.rule is Rule.LIST:
            ours = mine.split(",")
            for choice in value.split(","):
                if choice in ours:
                    self.params.apply(name, choice)
                    return choice
            return "Reject"
        if key.rule in (Rule.AND, Rule.OR):
            if value not in ("Yes", "No"):
                return "Reject"
            a, b = value == "Yes", mine == "Yes"
            result = "Yes" if ((a and b) if key.rule is Rule.AND else (a or b)) else "No"
            self.params.apply(name, result)
            return result
        try:
            number = int(value, 0)
        except ValueError:
            return "Reject"
        if not key.lo <= number <= key.hi:
            return "Reject"
        ours_n = int(mine, 0)
        result = str(min(number, ours_n) if key.rule is Rule.MIN else max(number, ours_n))
        self.params.apply(name, result)
        return result

    def _enter_full_feature(self, bhs: Bhs) -> None:
        p = self.params
        p.max_recv_data_segment_length = int(self._offer.get("MaxRecvDataSegmentLength",
                                                             "8192"), 0)
        if p.first_burst_length > p.max_burst_length:
            p.first_burst_length = p.max_burst_length
        self.state = State.FULL_FEATURE
        self.tsih = bhs.tsih
        # Digests start with the first PDU after the final Login Response (RFC 7143 13.1).
        self.header_digest, self.data_digest = p.header_digest, p.data_digest
        unanswered = tuple(k for k in self._offered
                           if k not in NAME_KEYS and k != "MaxRecvDataSegmentLength")
        self._events.append(LoginComplete(self.tsih, p, tuple(self._target_keys), unanswered))

    # ------------------------------------------------------------------ requests
    def send_command(self, lun: int, cdb: bytes, data_out: bytes | bytearray | memoryview = b"",
                     read_length: int = 0, *, attr: TaskAttr = TaskAttr.SIMPLE,
                     immediate: bool = False, manual_r2t: bool = False,
                     immediate_length: int | None = None, unsolicited: bool = True) -> int:
        """Issue a SCSI command (RFC 7143 11.3); returns its ITT.

        Write data goes as immediate data and unsolicited Data-Out as far as ImmediateData,
        InitialR2T and FirstBurstLength allow (`immediate_length` caps the former,
        `unsolicited=False` suppresses the latter), the rest on R2T.
        """
        if len(cdb) > 16 + 255 * 4 - 4:
            raise ValueError("CDB too long")
        if len(data_out) and read_length:
            raise ValueError("bidirectional commands are not supported")
        view = memoryview(data_out).cast("B") if len(data_out) else memoryview(b"")
        itt = self.alloc_itt()
        cmd = _Command(itt, pdu.encode_lun(lun), bytes(cdb), view, read_length, manual_r2t,
                       immediate_length, unsolicited, immediate, attr)
        self._commands[itt] = cmd
        try:
            self._submit(immediate, lambda: self._emit_command(cmd))
        except RuntimeError:
            del self._commands[itt]
            raise
        return itt

    def track_command(self, itt: int, lun: int, cdb: bytes,
                      data_out: bytes | bytearray | memoryview = b"", read_length: int = 0,
                      cmd_sn: int = 0) -> None:
        """Follow a command whose PDU the caller sent with send_pdu: answer its R2Ts,
        gather its Data-In and report its completion (for negative tests and fuzzing)."""
        view = memoryview(data_out).cast("B") if len(data_out) else memoryview(b"")
        cmd = _Command(itt, pdu.encode_lun(lun), bytes(cdb), view, read_length, False, None,
                       True, False, TaskAttr.SIMPLE)
        cmd.cmd_sn = cmd_sn
        self._commands[itt] = cmd

    def _emit_command(self, cmd: _Command) -> None:
        p = self.params
        edtl_out = len(cmd.data_out)
        write = edtl_out > 0
        read = cmd.read_length > 0
        edtl = edtl_out if write else cmd.read_length
        imm = 0
        unsolicited_end = 0
        if write:
            if p.immediate_data:
                imm = min(edtl, p.first_burst_length, p.target_max_recv_data_segment_length)
                if cmd.immediate_length is not None:
                    imm = min(imm, cmd.immediate_length)
            unsolicited_end = imm
            if not p.initial_r2t and cmd.unsolicited:
                unsolicited_end = max(imm, min(edtl, p.first_burst_length))
        cmd.cmd_sn = self._take_cmd_sn(cmd.immediate)
        ahs = pdus.extended_cdb_ahs(cmd.cdb) if len(cmd.cdb) > 16 else b""
        hdr = pdus.scsi_command(
            lun=cmd.lun_field, itt=cmd.itt, edtl=edtl, cmd_sn=cmd.cmd_sn,
            exp_stat_sn=self.exp_stat_sn, cdb=cmd.cdb, read=read, write=write,
            final=unsolicited_end <= imm, attr=pdu.WIRE_TASK_ATTRS[cmd.attr], dsl=imm,
            ahs_len=len(ahs), immediate=cmd.immediate)
        self._queue(hdr, cmd.data_out[:imm], ahs)
        if unsolicited_end > imm:
            self._send_burst(cmd, RESERVED_TAG, imm, unsolicited_end - imm, cmd.lun_field)

    def _send_burst(self, cmd: _Command, ttt: int, offset: int, length: int,
                    lun_field: int) -> None:
        """One Data-Out sequence: PDUs of at most the target's MaxRecvDataSegmentLength,
        DataSN from 0, F on the last (RFC 7143 11.7)."""
        seg = self.params.target_max_recv_data_segment_length
        end = offset + length
        data_sn = 0
        while offset < end:
            n = min(seg, end - offset)
            hdr = pdus.data_out(final=offset + n == end, dsl=n, lun=lun_field, itt=cmd.itt,
                                ttt=ttt, exp_stat_sn=self.exp_stat_sn, data_sn=data_sn,
                                buffer_offset=offset)
            self._queue(hdr, cmd.data_out[offset:offset + n])
            data_sn += 1
            offset += n

    def send_data_out(self, itt: int, ttt: int, offset: int, length: int, *,
                      data_sn: int = 0, final: bool = True, lun: int | None = None,
                      data: bytes | None = None) -> None:
        """One hand-made Data-Out PDU (for manual_r2t commands and negative tests)."""
        cmd = self._commands.get(itt)
        payload = data if data is not None else (
            bytes(cmd.data_out[offset:offset + length]) if cmd is not None else bytes(length))
        lun_field = pdu.encode_lun(lun) if lun is not None else (
            cmd.lun_field if cmd is not None else 0)
        hdr = pdus.data_out(final=final, dsl=len(payload), lun=lun_field, itt=itt, ttt=ttt,
                            exp_stat_sn=self.exp_stat_sn, data_sn=data_sn, buffer_offset=offset)
        self._queue(hdr, payload)

    def answer_r2t(self, r2t: R2TReceived) -> None:
        """Send the Data-Out an R2T asked for, as the automatic path would."""
        cmd = self._commands[r2t.itt]
        self._send_burst(cmd, r2t.ttt, r2t.offset, r2t.length, cmd.lun_field)

    def send_text(self, pairs: list[tuple[str, str]], *, immediate: bool = False) -> int:
        """A Text Request exchange (RFC 7143 11.10), continued with the C bit as needed."""
        payload = text.encode(pairs)
        seg = self.params.target_max_recv_data_segment_length
        chunks = deque(payload[i:i + seg] for i in range(0, len(payload), seg)) or deque([b""])
        itt = self.alloc_itt()
        exchange = _TextExchange(itt, chunks, immediate=immediate)
        self._texts[itt] = exchange
        self._submit(immediate, lambda: self._send_text_pdu(exchange))
        return itt

    def send_targets(self, value: str = "All") -> int:
        return self.send_text([("SendTargets", value)])

    def _send_text_pdu(self, exchange: _TextExchange) -> None:
        chunk = exchange.chunks.popleft() if exchange.chunks else b""
        more = bool(exchange.chunks)
        hdr = pdus.text_request(final=not more, cont=more, dsl=len(chunk), itt=exchange.itt,
                                ttt=exchange.ttt,
                                cmd_sn=self._take_cmd_sn(exchange.immediate),
                                exp_stat_sn=self.exp_stat_sn, immediate=exchange.immediate)
        self._queue(hdr, chunk)

    def send_nop(self, data: bytes = b"", *, reply: bool = True, immediate: bool = True) -> int:
        """A NOP-Out ping (RFC 7143 11.18); with reply=False the target sends nothing back."""
        immediate = immediate or not reply  # ITT 0xffffffff requires the I bit (11.18)
        itt = self.alloc_itt() if reply else RESERVED_TAG
        if reply:
            self._nops.add(itt)

        def send() -> None:
            hdr = pdus.nop_out(itt=itt, ttt=RESERVED_TAG, cmd_sn=self._take_cmd_sn(immediate),
                               exp_stat_sn=self.exp_stat_sn, dsl=len(data),
                               immediate=immediate)
            self._queue(hdr, data)

        self._submit(immediate, send)
        return itt

    def send_tmf(self, function: int, lun: int = 0, referenced_itt: int = RESERVED_TAG, *,
                 ref_cmd_sn: int | None = None, immediate: bool = True) -> int:
        """A Task Management Function Request (RFC 7143 11.5)."""
        itt = self.alloc_itt()
        lun_field = pdu.encode_lun(lun)
        self._tmfs[itt] = _Tmf(function, lun_field, referenced_itt)
        referenced = self._commands.get(referenced_itt)
        if ref_cmd_sn is None:
            ref_cmd_sn = referenced.cmd_sn if referenced is not None else self.cmd_sn

        def send() -> None:
            hdr = pdus.task_mgmt_request(
                function=function, lun=lun_field, itt=itt, referenced_task_tag=referenced_itt,
                cmd_sn=self._take_cmd_sn(immediate), exp_stat_sn=self.exp_stat_sn,
                ref_cmd_sn=ref_cmd_sn, immediate=immediate)
            self._queue(hdr)

        self._submit(immediate, send)
        return itt

    def send_logout(self, reason: int = pdu.LogoutReason.CLOSE_SESSION, *,
                    immediate: bool = True) -> int:
        """A Logout Request (RFC 7143 11.14)."""
        itt = self.alloc_itt()
        self._logouts.add(itt)

        def send() -> None:
            hdr = pdus.logout_request(reason=reason, itt=itt, cid=self.cid,
                                      cmd_sn=self._take_cmd_sn(immediate),
                                      exp_stat_sn=self.exp_stat_sn, immediate=immediate)
            self._queue(hdr)

        self._submit(immediate, send)
        return itt

    # ------------------------------------------------------------------ receive
    def _handle(self, bhs: Bhs, data: bytes) -> None:
        if self.trace is not None:
            self.trace(bhs, data)
        if self.state is State.LOGIN:
            self._stat_sn(bhs, advance=True)
            self._cmd_window(bhs)
            self._login_response(bhs, data)
            return
        if self.state is State.IDLE:
            raise ProtocolError("PDU before the login started")
        handler = _HANDLERS.get(bhs.opcode)
        if handler is None:
            raise ProtocolError(f"unexpected opcode 0x{bhs.opcode:02x}")
        handler(self, bhs, data)
        self._release_waiting()

    def _stat_sn(self, bhs: Bhs, advance: bool) -> None:
        """Check StatSN ordering and track ExpStatSN (RFC 7143 4.2.2.2)."""
        stat_sn = bhs.w24
        if not self._stat_sn_known:
            self._stat_sn_known = True
        elif stat_sn != self.exp_stat_sn:
            raise ProtocolError(f"StatSN {stat_sn}, expected {self.exp_stat_sn}")
        if advance:
            self.exp_stat_sn = (stat_sn + 1) & 0xFFFFFFFF
        else:
            self.exp_stat_sn = stat_sn

    def _cmd_window(self, bhs: Bhs) -> None:
        """ExpCmdSN/MaxCmdSN from the target; stale or inconsistent pairs are ignored."""
        exp, mx = bhs.w28, bhs.w32
        if sn_lt(mx, (exp - 1) & 0xFFFFFFFF):
            return
        if sn_lt(self.exp_cmd_sn, exp):
            self.exp_cmd_sn = exp
        if sn_lt(self.max_cmd_sn, mx):
            self.max_cmd_sn = mx

    def _command_for(self, bhs: Bhs) -> _Command:
        cmd = self._commands.get(bhs.itt)
        if cmd is None:
            raise ProtocolError(f"{Op(bhs.opcode).name} for unknown ITT 0x{bhs.itt:08x}")
        return cmd

    def _on_data_in(self, bhs: Bhs, data: bytes) -> None:
        status_present = bool(bhs.flags & pdu.F_DATAIN_STATUS)
        if status_present:
            self._stat_sn(bhs, advance=True)
        self._cmd_window(bhs)
        cmd = self._command_for(bhs)
        if cmd.buffer is None:
            raise ProtocolError("Data-In for a command that reads nothing")
        if bhs.data_sn != cmd.next_data_sn:
            raise ProtocolError(f"Data-In DataSN {bhs.data_sn}, expected {cmd.next_data_sn}")
        offset = bhs.buffer_offset
        end = offset + len(data)
        if end > len(cmd.buffer):
            raise ProtocolError("Data-In beyond the expected data transfer length")
        cmd.buffer[offset:end] = data
        cmd.extent = max(cmd.extent, end)
        cmd.next_data_sn += 1
        cmd.data_in_pdus += 1
        if status_present:
            if not bhs.final:
                raise ProtocolError("Data-In with status but without F")
            self._complete(cmd, bhs.b3, 0, b"", bhs.flags & 0x06, bhs.w44, 0, cmd.next_data_sn)

    def _on_scsi_response(self, bhs: Bhs, data: bytes) -> None:
        self._stat_sn(bhs, advance=True)
        self._cmd_window(bhs)
        cmd = self._command_for(bhs)
        sense = b""
        if len(data) >= 2:
            length = int.from_bytes(data[:2], "big")
            sense = data[2:2 + length]
        self._complete(cmd, bhs.b3, bhs.b2, sense, bhs.flags & 0x1E, bhs.w44, bhs.w40, bhs.w36)

    def _complete(self, cmd: _Command, status: int, response: int, sense: bytes,
                  residual_flags: int, residual: int, bidi_residual: int,
                  exp_data_sn: int) -> None:
        del self._commands[cmd.itt]
        payload = bytes(cmd.buffer[:cmd.extent]) if cmd.buffer is not None else b""
        self._events.append(CommandComplete(cmd.itt, status, response, sense, payload,
                                            residual_flags, residual, bidi_residual,
                                            exp_data_sn, cmd.data_in_pdus, cmd.r2ts))

    def _on_r2t(self, bhs: Bhs, data: bytes) -> None:
        self._stat_sn(bhs, advance=False)
        self._cmd_window(bhs)
        cmd = self._command_for(bhs)
        offset, length = bhs.buffer_offset, bhs.w44
        if bhs.ttt == RESERVED_TAG or not len(cmd.data_out) or length == 0 \
                or offset + length > len(cmd.data_out):
            raise ProtocolError(f"bad R2T offset={offset} length={length}")
        if length > self.params.max_burst_length:
            raise ProtocolError("R2T longer than MaxBurstLength")
        if bhs.data_sn != cmd.r2ts:
            raise ProtocolError(f"R2TSN {bhs.data_sn}, expected {cmd.r2ts}")
        cmd.r2ts += 1
        if cmd.manual_r2t:
            self._events.append(R2TReceived(cmd.itt, bhs.ttt, bhs.data_sn, offset, length))
        else:
            self._send_burst(cmd, bhs.ttt, offset, length, bhs.lun)

    def _on_nop_in(self, bhs: Bhs, data: bytes) -> None:
        if bhs.itt != RESERVED_TAG:
            self._stat_sn(bhs, advance=True)
            self._cmd_window(bhs)
            if bhs.itt not in self._nops:
                raise ProtocolError(f"NOP-In for unknown ITT 0x{bhs.itt:08x}")
            self._nops.discard(bhs.itt)
            self._events.append(NopReply(bhs.itt, data))
            return
        self._stat_sn(bhs, advance=False)
        self._cmd_window(bhs)
        if bhs.ttt == RESERVED_TAG:
            return
        if self.answer_pings:
            hdr = pdus.nop_out(itt=RESERVED_TAG, ttt=bhs.ttt, cmd_sn=self.cmd_sn,
                               exp_stat_sn=self.exp_stat_sn, lun=bhs.lun, immediate=True)
            self._queue(hdr)
        self._events.append(TargetPing(bhs.ttt, self.answer_pings))

    def _on_text_response(self, bhs: Bhs, data: bytes) -> None:
        self._stat_sn(bhs, advance=True)
        self._cmd_window(bhs)
        exchange = self._texts.get(bhs.itt)
        if exchange is None:
            raise ProtocolError(f"Text Response for unknown ITT 0x{bhs.itt:08x}")
        exchange.ttt = bhs.ttt
        if exchange.chunks:
            if data:
                raise ProtocolError("target answered a continued text request")
            self._submit(exchange.immediate, lambda: self._send_text_pdu(exchange))
            return
        exchange.received += data
        if len(exchange.received) > MAX_TEXT:
            raise ProtocolError("text response too long")
        final = bool(bhs.flags & pdu.F_FINAL)
        cont = bool(bhs.flags & pdu.F_CONTINUE)
        if final and cont:
            raise ProtocolError("Text Response with both F and C")
        if not final:
            if bhs.ttt == RESERVED_TAG:
                raise ProtocolError("continued Text Response without a Target Transfer Tag")
            self._submit(exchange.immediate, lambda: self._send_text_pdu(exchange))
            return
        del self._texts[bhs.itt]
        try:
            pairs = text.parse(exchange.received)
        except IscsiError as exc:
            raise ProtocolError(f"malformed text response: {exc}") from None
        self._events.append(TextComplete(bhs.itt, tuple(pairs)))

    def _on_tmf_response(self, bhs: Bhs, data: bytes) -> None:
        self._stat_sn(bhs, advance=True)
        self._cmd_window(bhs)
        tmf = self._tmfs.pop(bhs.itt, None)
        if tmf is None:
            raise ProtocolError(f"TMF Response for unknown ITT 0x{bhs.itt:08x}")
        response = bhs.b2
        if response == TmfResponse.FUNCTION_COMPLETE:
            for itt in self._aborted_by(tmf):
                del self._commands[itt]
                self._events.append(CommandAborted(itt, bhs.itt))
        self._events.append(TmfComplete(bhs.itt, response))

    def _aborted_by(self, tmf: _Tmf) -> list[int]:
        """Our tasks a completed TMF ended (RFC 7143 11.5.1, SAM-5 7)."""
        fn = tmf.function
        if fn == TmfFunction.ABORT_TASK:
            return [tmf.referenced_itt] if tmf.referenced_itt in self._commands else []
        if fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                  TmfFunction.LOGICAL_UNIT_RESET):
            return [i for i, c in self._commands.items() if c.lun_field == tmf.lun_field]
        if fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            return list(self._commands)
        return []

    def _on_logout_response(self, bhs: Bhs, data: bytes) -> None:
        self._stat_sn(bhs, advance=True)
        self._cmd_window(bhs)
        if bhs.itt not in self._logouts:
            raise ProtocolError(f"Logout Response for unknown ITT 0x{bhs.itt:08x}")
        self._logouts.discard(bhs.itt)
        response = bhs.b2
        if response == pdu.LogoutResponse.SUCCESS:
            self.state = State.LOGGED_OUT
        self._events.append(LogoutComplete(bhs.itt, response, bhs.w40 >> 16,
                                           bhs.w40 & 0xFFFF))

    def _on_async(self, bhs: Bhs, data: bytes) -> None:
        self._stat_sn(bhs, advance=True)
        self._cmd_window(bhs)
        raw = bhs.raw
        self._events.append(AsyncMessage(raw[36], bhs.lun, int.from_bytes(raw[38:40], "big"),
                                         int.from_bytes(raw[40:42], "big"),
                                         int.from_bytes(raw[42:44], "big"), data))

    def _on_reject(self, bhs: Bhs, data: bytes) -> None:
        self._stat_sn(bhs, advance=True)
        self._cmd_window(bhs)
        header = bytes(data[:BHS_LEN])
        ended: int | None = None
        if len(header) == BHS_LEN:
            op = header[0] & 0x3F
            itt = int.from_bytes(header[16:20], "big")
            tables: dict[int, dict[int, Any] | set[int]] = {
                Op.SCSI_CMD: self._commands, Op.TEXT_REQ: self._texts,
                Op.TASK_MGMT_REQ: self._tmfs, Op.NOP_OUT: self._nops,
                Op.LOGOUT_REQ: self._logouts}
            table = tables.get(op)
            # TASK_IN_PROGRESS refuses a duplicate ITT: the task holding it runs on.
            if table is not None and itt in table and bhs.b2 != RejectReason.TASK_IN_PROGRESS:
                if isinstance(table, set):
                    table.discard(itt)
                else:
                    del table[itt]
                ended = itt
        self._events.append(Rejected(bhs.b2, header, ended))


# Built after the class: mypyc compiles the class, and a class attribute of a compiled class
# cannot name the class's own methods.
_HANDLERS: dict[int, Callable[[InitiatorConnection, Bhs, bytes], None]] = {
    Op.DATA_IN: InitiatorConnection._on_data_in,
    Op.SCSI_RSP: InitiatorConnection._on_scsi_response,
    Op.R2T: InitiatorConnection._on_r2t,
    Op.NOP_IN: InitiatorConnection._on_nop_in,
    Op.TEXT_RSP: InitiatorConnection._on_text_response,
    Op.TASK_MGMT_RSP: InitiatorConnection._on_tmf_response,
    Op.LOGOUT_RSP: InitiatorConnection._on_logout_response,
    Op.ASYNC_MSG: InitiatorConnection._on_async,
    Op.REJECT: InitiatorConnection._on_reject,
}
