"""One iSCSI connection as a sans-I/O state machine (RFC 7143).

Bytes go in through `get_buffer`/`buffer_updated` (the shape of asyncio's BufferedProtocol),
PDUs to send come out of `data_to_send` as a list of buffers for one vectored write, and work
for the device server comes out of `events`. Time enters only as the `now` argument, and
`next_deadline` says when `on_timer` wants to run, so keep-alives and timeouts are
deterministic under test.

Large Data-Out payloads are received straight into the task's buffer; smaller PDUs are parsed
out of a staging buffer. Every protocol fault is turned into a Reject PDU, a login status or a
dropped connection in `_fault`, and nowhere else.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from ..core.buffers import DataBuffer, data_buffer, view
from ..core.limits import MAX_TRANSFER_BYTES
from . import datain, pdu, text
from . import digest as dg
from .bounds import MemoryBudget
from .dataout import SHORT, DataOutSequence
from .errors import ConnectionFatal, IscsiError, LoginError, LoginStatus, PduReject
from .framing import MAX_AHS, PduReader
from .login import LoginMachine, LoginPolicy, LoginResponse, LoginResult
from .params import ConnectionParams, TargetLimits
from .pdu import Bhs, Op, RejectReason
from .session import IscsiTask, Session

log = logging.getLogger("pytarget.iscsi")

MAX_DATA_OUT = 32 * 1024 * 1024  # the largest EDTL a write may announce (SBC limit + slack)
MAX_DATA_IN = MAX_TRANSFER_BYTES  # the largest Data-In buffer a command makes
MAX_PENDING_TEXT = 65536
IMMEDIATE_SLACK = 16  # immediate commands accepted beyond the CmdSN window
TASK_SET_FULL = 0x28  # SAM-5 status: no Data-Out memory for this command now
PIN_SLACK = 65536  # Data-In shorter than its buffer by more than this is copied out


class ConnectionPolicy(LoginPolicy, Protocol):
    """What a connection asks the target registry (pure look-ups, no I/O)."""

    def send_targets(self, initiator_name: str, value: str, local_address: tuple[str, int],
                     session: Session) -> list[tuple[str, str]]: ...


# Events for the driver.
class ExecuteCommand:
    __slots__ = ("task",)

    def __init__(self, task: IscsiTask) -> None:
        self.task = task


class DataOutReady:
    __slots__ = ("task",)

    def __init__(self, task: IscsiTask) -> None:
        self.task = task


@dataclass(slots=True)
class TaskManagement:
    itt: int
    function: int
    lun_field: int
    referenced_task_tag: int
    ref_cmd_sn: int
    cmd_sn: int


@dataclass(slots=True)
class LoginReady:
    result: LoginResult
    response: LoginResponse


@dataclass(slots=True)
class LogoutRequested:
    itt: int
    reason: int
    cid: int


@dataclass(slots=True)
class Closed:
    reason: str


class State(Enum):
    """Connection states (RFC 7143 8.1.3, from the target's side)."""

    LOGIN = "login"
    LOGIN_BINDING = "login-binding"  # the final login request is being bound to a session
    LOGIN_FAILED = "login-failed"  # the failure response waits out the delay against guessing
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"  # later PDUs are ignored until the connection closes
    CLOSED = "closed"


class Step(Enum):
    """What moves a connection from one state to another."""

    LOGIN_ACCEPTED = "the final login request succeeded"
    LOGIN_REFUSED = "a login failed with a delayed response"
    BOUND = "the login was bound to its session"
    LOGOUT = "a logout that closes the connection was requested"
    CLOSE = "the connection closed"


# Every allowed (state, step) and the state it leads to; anything else is a fault of the
# caller, raised by `Connection._step`.
TRANSITIONS: dict[tuple[State, Step], State] = {
    (State.LOGIN, Step.LOGIN_ACCEPTED): State.LOGIN_BINDING,
    (State.LOGIN, Step.LOGIN_REFUSED): State.LOGIN_FAILED,
    (State.LOGIN_BINDING, Step.BOUND): State.FULL_FEATURE,
    (State.FULL_FEATURE, Step.LOGOUT): State.LOGGED_OUT,
    **{(state, Step.CLOSE): State.CLOSED for state in State if state is not State.CLOSED},
}
# Bound once: the receive path compares states with `is` against these.
_LOGIN, _BINDING, _FULL_FEATURE, _CLOSED = (State.LOGIN, State.LOGIN_BINDING,
                                            State.FULL_FEATURE, State.CLOSED)
_LOGIN_PHASE = frozenset({State.LOGIN, State.LOGIN_BINDING})  # login PDUs are handled
_LOGIN_TIMED = frozenset({State.LOGIN, State.LOGIN_BINDING, State.LOGIN_FAILED})


class StateError(Exception):
    """A step the connection's state does not allow: the caller's error, not the peer's."""


class Connection(PduReader):
    """The target's end of one connection: framing (inherited), login, CmdSN order, commands
    and their Data-Out, responses and Data-In, text, NOP and logout requests, timers."""

    def __init__(self, policy: ConnectionPolicy, limits: TargetLimits,
                 local_address: tuple[str, int], peer_address: tuple[str, int], now: float,
                 *, login_timeout: float = 30.0, nop_interval: float = 30.0,
                 nop_timeout: float = 30.0, window: int = 128, pdu_timeout: float = 30.0,
                 auth_failure_delay: float = 1.0, budget: MemoryBudget | None = None) -> None:
        self.policy = policy
        self.limits = limits
        self.local_address = local_address
        self.peer_address = peer_address
        self.window = window
        self.state = State.LOGIN
        self.login = LoginMachine(policy, limits, window=window)
        self.session: Session | None = None
        self.params = ConnectionParams()
        self.cid = 0
        self.stat_sn = 0
        self.events: deque[object] = deque()
        self._out: list[bytes | bytearray | memoryview] = []
        # Bytes of output queued since the connection began; the transport compares it with
        # what it has sent to know when a given PDU has left.
        self.queued_bytes = 0
        staging = 2 * (pdu.BHS_LEN + MAX_AHS + 8 + limits.max_recv_data_segment_length + 8)
        PduReader.__init__(self, max(staging, 1 << 18),
                           max(8192, limits.max_recv_data_segment_length))
        self._dropped_itts: set[int] = set()
        # Timers.
        self._now = now
        self.login_deadline: float | None = now + login_timeout
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self._last_rx = now
        self._nop_ttt = 0x1000
        self._nop_outstanding: tuple[int, float] | None = None
        self.auth_failure_delay = auth_failure_delay
        self._held_response: LoginResponse | None = None
        # A PDU must arrive whole within pdu_timeout once it has begun: a watchdog compares
        # what is pending at each check with the previous one (`headers` counts PDUs parsed).
        self.pdu_timeout = pdu_timeout
        self._watch_at: float | None = None
        self._watch_mark: tuple[int, str] | None = None
        self.rx_paused = False  # set by the driver while it does not read
        self.budget = budget
        # Text exchanges.
        self._text_in = bytearray()
        self._text_out: dict[int, tuple[bytes, int]] = {}
        self._next_ttt = 1

    # ------------------------------------------------------------------ receive path
    def buffer_updated(self, nbytes: int, now: float) -> None:
        """`nbytes` arrived in the buffer `get_buffer` gave (framing: iscsi/framing.py)."""
        self._now = now
        self._last_rx = now
        try:
            self._received(nbytes)
        except ConnectionFatal as exc:
            self._fault(exc, None)

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes by copying them through get_buffer (tests and simple callers)."""
        view = memoryview(data)
        while view and self.state is not _CLOSED:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n, now)

    def _segment_too_long(self, bhs: Bhs) -> None:
        """Reject a PDU whose header is sound; its data segment is skipped.

        A rejected request still uses up its CmdSN, as when it is rejected after dispatch;
        a rejected Data-Out ends its command like any other Data-Out fault.
        """
        session = self.session
        if self.state is _FULL_FEATURE and session is not None:
            if bhs.opcode == Op.DATA_OUT:
                task = session.tasks.get(bhs.itt)
                if task is not None and task.data_out is not None and not task.data_out.error:
                    self._fail_task_data(task, "sequence", bhs)
            elif bhs.opcode in _NUMBERED and not self._accept_cmd_sn(bhs):
                return
        self._fault(PduReject(RejectReason.PROTOCOL_ERROR,
                              "data segment longer than MaxRecvDataSegmentLength"), bhs)

    def _data_digest_error(self, bhs: Bhs) -> None:
        self._fault(PduReject(RejectReason.DATA_DIGEST_ERROR, "data digest error"), bhs)

    def _placement(self, bhs: Bhs) -> memoryview | None:
        """A large Data-Out payload is received straight into its task's buffer."""
        session = self.session
        if self.state is not _FULL_FEATURE or session is None or bhs.opcode != Op.DATA_OUT:
            return None
        task = session.tasks.get(bhs.itt)
        seq = task.data_out if task is not None else None
        if seq is None or seq.error or seq.failure:
            return None
        try:
            seq.check(bhs)
        except PduReject:
            return None
        offset = bhs.buffer_offset
        return view(seq.buffer)[offset:offset + bhs.data_segment_length]

    def _placed(self, bhs: Bhs) -> None:
        session = self.session
        task = session.tasks.get(bhs.itt) if session is not None else None
        if task is None:
            return
        try:
            self._data_out_landed(bhs, task, bhs.data_segment_length)
        except IscsiError as exc:
            self._fault(exc, bhs)

    # ------------------------------------------------------------------ dispatch
    def _pdu(self, bhs: Bhs, data: memoryview) -> None:
        try:
            state = self.state
            if state is _FULL_FEATURE:  # `is` first: hashing an Enum runs Python code
                self._full_feature_pdu(bhs, data)
            elif state in _LOGIN_PHASE:
                self._login_pdu(bhs, data)
            # PDUs after logout are ignored until the connection closes.
        except IscsiError as exc:
            self._fault(exc, bhs)

    def _fault(self, exc: IscsiError, bhs: Bhs | None) -> None:
        """The one place protocol faults become a Reject, a login status or a closed connection."""
        if isinstance(exc, PduReject) and self.state is not _FULL_FEATURE:
            if self.state is _LOGIN:
                self._login_failed(self.login.fail(LoginError(LoginStatus.INITIATOR_ERROR,
                                                              str(exc))))
            else:
                self._close(str(exc))
        elif isinstance(exc, PduReject):
            log.info("reject %s: %s", exc.reason.name, exc)
            if bhs is not None and bhs.opcode == Op.DATA_OUT \
                    and exc.reason == RejectReason.DATA_DIGEST_ERROR:
                self._fail_task_on_digest(bhs)
            self._send_reject(exc.reason, bhs)
        elif isinstance(exc, LoginError):
            self._close(f"login failed: {exc.reason}")
        else:
            log.warning("connection %s dropped: %s", self.peer_address, exc)
            self._close(str(exc))

    # ------------------------------------------------------------------ login
    def _login_pdu(self, bhs: Bhs, data: memoryview) -> None:
        if self.state is _BINDING:
            raise ConnectionFatal("PDU while the login is being bound")
        if bhs.opcode != Op.LOGIN_REQ:
            raise ConnectionFatal(f"opcode 0x{bhs.opcode:02x} before login completed")
        response = self.login.receive(bhs, data)
        if self.login.result is not None and response.status == 0:
            self.cid = self.login.result.cid
            self._step(Step.LOGIN_ACCEPTED)
            self.login_deadline = None
            self.events.append(LoginReady(self.login.result, response))
            return
        if self.login.failed:
            self._login_failed(response)
            return
        self._queue(response.header, response.data)

    def _login_failed(self, response: LoginResponse) -> None:
        """Send a failed login's status and close; authentication and authorization
        failures wait `auth_failure_delay` first, against guessing."""
        log.info("login from %s failed (status %04x): %s", self.peer_address, response.status,
                 self.login.failure)
        if response.status in _DELAYED_FAILURES and self.auth_failure_delay > 0:
            self._step(Step.LOGIN_REFUSED)
            self._held_response = response
            self.login_deadline = self._now + self.auth_failure_delay
            return
        self._queue(response.header, response.data)
        self._close("login failed")

    def complete_login(self, session: Session, response: LoginResponse) -> None:
        """The driver bound the login to `session`: send the final response, enter FFP."""
        assert self.login.result is not None
        result = self.login.result
        self.login.set_tsih(response, session.tsih)
        self.session = session
        self.params = result.connection
        self.stat_sn = self.login.stat_sn
        # Digests take effect after the final login response (RFC 7143 13.1).
        params, self.params = self.params, ConnectionParams()
        self._queue(response.header, response.data)
        self.params = params
        self.header_digest = params.header_digest
        self.data_digest = params.data_digest
        self.max_segment = params.target_max_recv_data_segment_length
        self._step(Step.BOUND)
        self._last_rx = self._now
        if self.pdu_timeout:
            self._watch_at = self._now + self.pdu_timeout

    def fail_login(self, response: LoginResponse, status: int) -> None:
        """The driver could not bind the session: answer with `status` and close."""
        response.header[36] = status >> 8
        response.header[37] = status & 0xFF
        response.header[1] &= ~pdu.F_TRANSIT & 0xFF
        response.header[14:16] = b"\0\0"
        response.header[5:8] = b"\0\0\0"  # the text of the success it replaces is not sent
        self._queue(response.header, b"")
        self._close("login failed")

    # ------------------------------------------------------------------ full feature phase
    def _full_feature_pdu(self, bhs: Bhs, data: memoryview) -> None:
        op = bhs.opcode
        session = self.session
        assert session is not None
        if op == Op.DATA_OUT:
            self._data_out(bhs, data)
            return
        if op not in pdu.INITIATOR_OPCODES or op == Op.LOGIN_REQ:
            if op == Op.LOGIN_REQ:
                raise PduReject(RejectReason.PROTOCOL_ERROR, "login request in full feature phase")
            raise PduReject(RejectReason.COMMAND_NOT_SUPPORTED, f"opcode 0x{op:02x}")
        if op == Op.SNACK_REQ:
            raise PduReject(RejectReason.SNACK_REJECT, "SNACK at ErrorRecoveryLevel 0")
        if session.discovery and op in (Op.SCSI_CMD, Op.TASK_MGMT_REQ):
            raise PduReject(RejectReason.PROTOCOL_ERROR, "SCSI in a discovery session")
        if not self._accept_cmd_sn(bhs):
            return
        if op == Op.SCSI_CMD:
            self._scsi_command(bhs, data)
        elif op == Op.NOP_OUT:
            self._nop_out(bhs, data)
        elif op == Op.TEXT_REQ:
            self._text_request(bhs, data)
        elif op == Op.TASK_MGMT_REQ:
            self.events.append(TaskManagement(bhs.itt, bhs.flags & 0x7F, bhs.lun,
                                              bhs.referenced_task_tag, bhs.ref_cmd_sn,
                                              bhs.cmd_sn))
        elif op == Op.LOGOUT_REQ:
            reason = bhs.flags & 0x7F
            self.events.append(LogoutRequested(bhs.itt, reason, bhs.cid))
            if reason in (0, 1):
                # closing: later PDUs are ignored; "remove for recovery" is refused and the
                # connection carries on (ErrorRecoveryLevel 0, RFC 7143 11.15.1)
                self._step(Step.LOGOUT)

    def _accept_cmd_sn(self, bhs: Bhs) -> bool:
        """Window check (RFC 7143 4.2.2.1): out-of-window commands are silently dropped."""
        session = self.session
        assert session is not None
        if bhs.opcode == Op.NOP_OUT and bhs.ttt != pdu.RESERVED_TAG:
            return True  # a ping answer carries no CmdSN of its own
        cmd_sn = bhs.cmd_sn
        if bhs.immediate:
            return True
        if cmd_sn == session.exp_cmd_sn:
            session.exp_cmd_sn = (cmd_sn + 1) & 0xFFFFFFFF
            return True
        if session.in_window(cmd_sn):
            # ErrorRecoveryLevel 0 over one TCP connection cannot skip a CmdSN.
            raise ConnectionFatal(f"CmdSN gap: got {cmd_sn}, expected {session.exp_cmd_sn}")
        log.info("dropping PDU with CmdSN %d outside [%d, %d]", cmd_sn, session.exp_cmd_sn,
                 session.max_cmd_sn)
        if bhs.opcode == Op.SCSI_CMD and bhs.flags & pdu.F_CMD_WRITE:
            # its unsolicited Data-Out will still arrive and must be consumed quietly
            self._drop_itt(bhs.itt)
        return False

    def _scsi_command(self, bhs: Bhs, data: memoryview) -> None:
        session = self.session
        assert session is not None
        flags = bhs.flags
        read = bool(flags & pdu.F_CMD_READ)
        write = bool(flags & pdu.F_CMD_WRITE)
        edtl = bhs.expected_data_transfer_length
        if bhs.itt == pdu.RESERVED_TAG:
            raise PduReject(RejectReason.INVALID_PDU_FIELD, "reserved ITT")
        if bhs.itt in session.tasks:
            raise PduReject(RejectReason.TASK_IN_PROGRESS, "ITT already in use")
        if bhs.immediate and session.active >= self.window + IMMEDIATE_SLACK:
            raise PduReject(RejectReason.IMMEDIATE_COMMAND_REJECT, "too many immediate commands")
        dsl = bhs.data_segment_length
        if dsl and not write:
            raise PduReject(RejectReason.PROTOCOL_ERROR, "immediate data without W bit")
        if dsl and not session.params.immediate_data:
            raise PduReject(RejectReason.PROTOCOL_ERROR, "immediate data not negotiated")
        if dsl > edtl or dsl > session.params.first_burst_length or dsl > MAX_DATA_OUT:
            raise PduReject(RejectReason.PROTOCOL_ERROR, "immediate data beyond the burst")
        if not flags & pdu.F_FINAL and (not write or session.params.initial_r2t):
            raise PduReject(RejectReason.PROTOCOL_ERROR, "unsolicited Data-Out not allowed")
        cdb = bhs.cdb
        if bhs.total_ahs_length:
            cdb = self._extended_cdb(bhs)
        task = IscsiTask(bhs.itt, bhs.cmd_sn, bhs.immediate, bhs.lun, read, write, edtl, cdb,
                         pdu.TASK_ATTRS[flags & 0x07])
        session.tasks[task.itt] = task
        session.active += 1
        if write and edtl:
            size = min(edtl, MAX_DATA_OUT)
            if self.budget is not None:
                if not self.budget.reserve(session, size):
                    self._refuse(task, bhs)
                    return
                task.reserved = size
            # F=1: no unsolicited Data-Out follows the command (RFC 7143 11.3.1).
            if session.params.initial_r2t or flags & pdu.F_FINAL:
                task.data_out = DataOutSequence(data_buffer(size), edtl, data, min(dsl, edtl),
                                                True)
            else:
                end = min(edtl, session.params.first_burst_length)
                task.data_out = DataOutSequence(data_buffer(size), edtl, data, end, dsl >= end)
        elif read and edtl and self.budget is not None:
            # the Data-In buffer the device server will fill counts against the budget too
            size = min(edtl, MAX_DATA_IN)
            if not self.budget.reserve(session, size):
                self._refuse(task, bhs)
                return
            task.reserved = size
        self.events.append(ExecuteCommand(task))

    def _refuse(self, task: IscsiTask, bhs: Bhs) -> None:
        """TASK SET FULL: the buffer memory budget cannot hold this command's data now
        (SAM-5 5.3); the initiator retries it later. Unsolicited Data-Out is consumed quietly."""
        log.debug("ITT 0x%08x: buffer memory budget exhausted; TASK SET FULL", task.itt)
        if not bhs.flags & pdu.F_FINAL:
            self._drop_itt(task.itt)
        self.send_scsi_result(task, TASK_SET_FULL, None, None, 0, 0)

    def _drop_itt(self, itt: int) -> None:
        """Remember an ITT whose Data-Out must be consumed quietly (bounded)."""
        if len(self._dropped_itts) >= 2 * self.window:
            raise ConnectionFatal("too many commands whose Data-Out is being discarded")
        self._dropped_itts.add(itt)

    def _extended_cdb(self, bhs: Bhs) -> bytes:
        """CDB longer than 16 bytes from an Extended CDB AHS (RFC 7143 11.3.3/11.2.1.3)."""
        ahs = self.ahs
        cdb = bhs.cdb
        pos = 0
        while pos + 4 <= len(ahs):
            length = int.from_bytes(ahs[pos:pos + 2], "big")
            kind = ahs[pos + 2]
            body = ahs[pos + 4:pos + 3 + length]
            if kind == 1:
                cdb = cdb + body
            pos += 4 + ((length - 1 + 3) & ~3) if length else 4
        return cdb

    # ------------------------------------------------------------------ Data-Out
    def _data_out(self, bhs: Bhs, data: memoryview) -> None:
        session = self.session
        assert session is not None
        task = session.tasks.get(bhs.itt)
        seq = task.data_out if task is not None else None
        if seq is None or seq.error:
            if bhs.itt in self._dropped_itts:
                if bhs.final:
                    self._dropped_itts.discard(bhs.itt)
                return
            # Data for a task that already ended or failed: consumed quietly.
            log.debug("discarding Data-Out for ITT 0x%08x", bhs.itt)
            return
        assert task is not None
        if seq.failure:
            if seq.drain(bhs):
                self._data_out_failed(task)
            return
        try:
            seq.check(bhs)
        except PduReject as exc:
            # ErrorRecoveryLevel 0 cannot recover a data sequence: the command ends with
            # CHECK CONDITION and the rest of its Data-Out is discarded.
            log.info("ITT 0x%08x: %s; ending the command", bhs.itt, exc)
            self._fail_task_data(task, "sequence", bhs)
            return
        dsl = bhs.data_segment_length
        view(seq.buffer)[bhs.buffer_offset:bhs.buffer_offset + dsl] = data
        self._data_out_landed(bhs, task, dsl)

    def _data_out_landed(self, bhs: Bhs, task: IscsiTask, dsl: int) -> None:
        seq = task.data_out
        assert seq is not None
        outcome = seq.landed(bhs, dsl)
        if outcome == SHORT:
            log.info("ITT 0x%08x: R2T burst ended short; ending the command", bhs.itt)
            self._fail_task_data(task, "sequence")
            return
        if outcome:
            self._issue_r2ts(task)
        if seq.wanted and seq.waiter is not None and seq.complete():
            self.events.append(DataOutReady(task))

    def request_data_out(self, task: IscsiTask, length: int, waiter: object) -> bool:
        """The device server wants `length` bytes of Data-Out: solicit what is missing.

        Returns True when the data is already complete (or has failed: see
        `DataOutSequence.error`); otherwise a DataOutReady event follows.
        """
        seq = task.data_out
        if seq is None or seq.request(length, waiter):
            return True
        self._issue_r2ts(task)
        return False

    def _issue_r2ts(self, task: IscsiTask) -> None:
        session = self.session
        assert session is not None and task.data_out is not None
        params = session.params
        for state in task.data_out.solicit(params.max_outstanding_r2t, params.max_burst_length,
                                           self._alloc_ttt):
            hdr = pdu.r2t(task.itt, state.ttt, task.lun_field, self.stat_sn, session.exp_cmd_sn,
                          session.refresh_max_cmd_sn(), state.r2t_sn, state.offset,
                          state.length)
            self._queue(hdr)

    def _fail_task_on_digest(self, bhs: Bhs) -> None:
        """ErrorRecoveryLevel 0: the command whose data was corrupted is ended (RFC 7143 7.8)."""
        session = self.session
        task = session.tasks.get(bhs.itt) if session else None
        if task is not None and task.data_out is not None and not task.data_out.error:
            self._fail_task_data(task, "digest", bhs)

    def _fail_task_data(self, task: IscsiTask, reason: str, bhs: Bhs | None = None) -> None:
        """End a command whose Data-Out cannot be accepted, once every Data-Out still
        outstanding for it has arrived (RFC 7143 7.8): `bhs` is the offending PDU, counted
        towards that as discarded."""
        assert task.data_out is not None
        if task.data_out.fail(reason, bhs):
            self._data_out_failed(task)

    def _data_out_failed(self, task: IscsiTask) -> None:
        assert task.data_out is not None
        if task.data_out.waiter is not None:
            self.events.append(DataOutReady(task))

    # ------------------------------------------------------------------ responses
    def drop_task(self, task: IscsiTask) -> None:
        """Forget an aborted task: no response is sent for it (RFC 7143 4.2.3.2)."""
        session = self.session
        assert session is not None
        if session.tasks.get(task.itt) is task:
            del session.tasks[task.itt]
        if not task.done:
            task.done = True
            session.active -= 1
        if task.reserved:
            assert self.budget is not None
            self.budget.release(session, task.reserved)
            task.reserved = 0

    def send_scsi_result(self, task: IscsiTask, status: int, sense: bytes | None,
                         data: bytes | DataBuffer | memoryview | None, data_len: int,
                         data_out_len: int) -> None:
        """Data-In (phase-collapsed where possible) and/or SCSI Response for a finished task.

        Residuals compare the Expected Data Transfer Length with what the command wanted to
        move: Data-In produced, or Data-Out asked for (RFC 7143 11.4.5).
        """
        self.drop_task(task)
        if self.state is _CLOSED:
            return
        session = self.session
        assert session is not None
        exp_cmd_sn = session.exp_cmd_sn
        max_cmd_sn = session.refresh_max_cmd_sn()
        residual_flags = 0
        residual = 0
        if task.read and not task.write:
            produced = data_len
            if produced > task.edtl:
                residual_flags, residual = pdu.F_OVERFLOW, produced - task.edtl
                data_len = task.edtl
                if data is not None and produced - data_len > PIN_SLACK:
                    # queue a copy, not a slice that would pin the whole buffer
                    data = bytes(view(data).cast("B")[:data_len])
            elif produced < task.edtl:
                residual_flags, residual = pdu.F_UNDERFLOW, task.edtl - produced
        elif task.write:
            wanted = data_out_len
            if wanted > task.edtl:
                residual_flags, residual = pdu.F_OVERFLOW, wanted - task.edtl
            elif wanted < task.edtl:
                residual_flags, residual = pdu.F_UNDERFLOW, task.edtl - wanted
            data_len = 0
        elif data_len:
            residual_flags, residual = pdu.F_OVERFLOW, data_len
            data_len = 0
        collapse = sense is None and status == 0
        if data_len and data is not None:
            digests = None
            if task.data_in_digests is not None and task.data_in_digests[0] == data_len:
                digests = task.data_in_digests[1]
            if datain.send(self._queue, task, data, data_len,
                           self.params.initiator_max_recv_data_segment_length,
                           session.params.max_burst_length, status, residual_flags, residual,
                           collapse, digests, self.stat_sn, exp_cmd_sn, max_cmd_sn):
                self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
                return
        payload = b""
        if sense:
            payload = len(sense).to_bytes(2, "big") + sense
        hdr = pdu.scsi_response(task.itt, status, self._next_stat_sn(), exp_cmd_sn, max_cmd_sn,
                                residual_flags, residual, len(payload), task.data_sn)
        self._queue(hdr, payload)

    def data_in_digests(self, data: memoryview, length: int) -> list[bytes]:
        """The data digests of the Data-In PDUs for `data`, computed ahead of sending.

        Pure: safe to call on an I/O thread (crc32c releases the GIL for large buffers).
        """
        session = self.session
        assert session is not None
        return datain.digests(data, datain.segments(
            length, self.params.initiator_max_recv_data_segment_length,
            session.params.max_burst_length))

    def send_tmf_response(self, itt: int, response: int) -> None:
        session = self.session
        assert session is not None
        hdr = pdu.task_mgmt_response(itt, response, self._next_stat_sn(), session.exp_cmd_sn,
                                     session.refresh_max_cmd_sn())
        self._queue(hdr)

    def send_logout_response(self, itt: int, response: int, close: bool = True) -> None:
        session = self.session
        assert session is not None
        hdr = pdu.logout_response(itt, response, self._next_stat_sn(), session.exp_cmd_sn,
                                  session.refresh_max_cmd_sn(),
                                  session.params.default_time2wait,
                                  session.params.default_time2retain)
        self._queue(hdr)
        if close:
            self._close("logout")

    def _send_reject(self, reason: RejectReason, bhs: Bhs | None) -> None:
        session = self.session
        exp_cmd_sn = session.exp_cmd_sn if session else 0
        max_cmd_sn = session.refresh_max_cmd_sn() if session else 0
        hdr = pdu.reject(reason, self._next_stat_sn(), exp_cmd_sn, max_cmd_sn)
        raw = bhs.raw if bhs is not None else bytes(pdu.BHS_LEN)
        self._queue(hdr, raw)

    def _nop_out(self, bhs: Bhs, data: memoryview) -> None:
        session = self.session
        assert session is not None
        if bhs.ttt != pdu.RESERVED_TAG:
            if self._nop_outstanding and self._nop_outstanding[0] == bhs.ttt:
                self._nop_outstanding = None
            return
        if bhs.itt == pdu.RESERVED_TAG:
            return  # a ping that wants no answer
        payload = bytes(data)
        hdr = pdu.nop_in(bhs.itt, pdu.RESERVED_TAG, bhs.lun, self._next_stat_sn(),
                         session.exp_cmd_sn, session.refresh_max_cmd_sn(), len(payload))
        self._queue(hdr, payload)

    def _text_request(self, bhs: Bhs, data: memoryview) -> None:
        session = self.session
        assert session is not None
        if bhs.ttt != pdu.RESERVED_TAG and bhs.ttt in self._text_out and not len(data):
            remaining, ttt = self._text_out.pop(bhs.ttt)
            self._send_text(bhs, remaining)
            return
        # One text exchange at a time (RFC 7143 11.10): a new one ends any unfinished reply.
        self._text_out.clear()
        self._text_in += data
        if len(self._text_in) > MAX_PENDING_TEXT:
            self._text_in.clear()
            raise PduReject(RejectReason.PROTOCOL_ERROR, "text request too long")
        if bhs.flags & pdu.F_CONTINUE:
            ttt = self._alloc_ttt()
            hdr = pdu.text_response(0, 0, bhs.lun, bhs.itt, ttt, self._next_stat_sn(),
                                    session.exp_cmd_sn, session.refresh_max_cmd_sn())
            self._queue(hdr)
            return
        try:
            pairs = text.parse(self._text_in)
        except LoginError:
            self._text_in.clear()
            raise PduReject(RejectReason.PROTOCOL_ERROR, "malformed text") from None
        self._text_in.clear()
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answers += self.policy.send_targets(session.params.initiator_name, value,
                                                    self.local_address, session)
            else:
                answers.append((key, "NotUnderstood"))
        self._send_text(bhs, text.encode(answers))

    def _send_text(self, bhs: Bhs, payload: bytes) -> None:
        session = self.session
        assert session is not None
        limit = self.params.initiator_max_recv_data_segment_length
        if len(payload) > limit:
            ttt = self._alloc_ttt()
            self._text_out[ttt] = (payload[limit:], ttt)
            chunk, flags = payload[:limit], pdu.F_CONTINUE
        else:
            ttt, chunk, flags = pdu.RESERVED_TAG, payload, pdu.F_FINAL
        hdr = pdu.text_response(flags, len(chunk), bhs.lun, bhs.itt, ttt, self._next_stat_sn(),
                                session.exp_cmd_sn, session.refresh_max_cmd_sn())
        self._queue(hdr, chunk)

    def _alloc_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (self._next_ttt + 1) & 0x7FFFFFFF or 1
        return ttt

    # ------------------------------------------------------------------ output
    def _next_stat_sn(self) -> int:
        sn = self.stat_sn
        self.stat_sn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _queue(self, hdr: bytes | bytearray, data: bytes | bytearray | memoryview = b"",
               data_digest: bytes | None = None) -> None:
        # header_digest and data_digest (framing) follow self.params from the final login
        # response on (complete_login), the moment digests take effect
        out = self._out
        out.append(hdr)
        size = len(hdr)
        if self.header_digest:
            out.append(dg.digest((hdr,)))
            size += 4
        n = len(data)
        if n:
            out.append(data)
            pad = -n & 3
            size += n + pad
            if pad:
                out.append(_PADDING[pad])
            if self.data_digest:
                if data_digest is None:
                    parts: tuple[bytes | bytearray | memoryview, ...] = (
                        (data, _PADDING[pad]) if pad else (data,))
                    data_digest = dg.digest(parts)
                out.append(data_digest)
                size += 4
        self.queued_bytes += size

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        out, self._out = self._out, []
        return out

    @property
    def wants_close(self) -> bool:
        return self.state is _CLOSED

    def _step(self, step: Step) -> None:
        """Take `step` from the current state, as `TRANSITIONS` allows."""
        state = TRANSITIONS.get((self.state, step))
        if state is None:
            raise StateError(f"{step.name} in state {self.state.name}")
        self.state = state
        if state is _CLOSED:
            self.rx_open = False

    def _close(self, reason: str) -> None:
        if self.state is not _CLOSED:
            self._step(Step.CLOSE)
            self.events.append(Closed(reason))
            self._release_budget()

    def _release_budget(self) -> None:
        """Give back the Data-Out memory of every task still held (their buffers die with
        the connection; a task dropped later finds nothing left to release)."""
        session = self.session
        if self.budget is None or session is None:
            return
        for task in session.tasks.values():
            if task.reserved:
                self.budget.release(session, task.reserved)
                task.reserved = 0

    def close(self, reason: str = "closed") -> None:
        self._close(reason)

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        if self.state is not _FULL_FEATURE:
            return self.login_deadline if self.state in _LOGIN_TIMED else None
        watch = self._watch_at
        if not self.nop_interval:
            return watch
        if self._nop_outstanding is not None:
            nop = self._nop_outstanding[1] + self.nop_timeout
        else:
            nop = self._last_rx + self.nop_interval
        return nop if watch is None or nop < watch else watch

    def on_timer(self, now: float) -> None:
        self._now = now
        if self.state is State.LOGIN_FAILED:
            if self.login_deadline is not None and now >= self.login_deadline:
                response, self._held_response = self._held_response, None
                assert response is not None
                self._queue(response.header, response.data)
                self._close("login failed")
            return
        if self.state in _LOGIN_PHASE:
            if self.login_deadline is not None and now >= self.login_deadline:
                self._close("login timed out")
            return
        if self.state is not _FULL_FEATURE:
            return
        if self._watch_at is not None and now >= self._watch_at:
            self._watch_pdu(now)
            if self.state is _CLOSED:
                return
        if not self.nop_interval:
            return
        if self._nop_outstanding is not None:
            if now >= self._nop_outstanding[1] + self.nop_timeout:
                self._close("initiator stopped answering NOP-In")
            return
        if now >= self._last_rx + self.nop_interval:
            session = self.session
            assert session is not None
            ttt = self._nop_ttt
            self._nop_ttt = (self._nop_ttt + 1) & 0x7FFFFFFF or 1
            self._nop_outstanding = (ttt, now)
            hdr = pdu.nop_in(pdu.RESERVED_TAG, ttt, 0, self.stat_sn, session.exp_cmd_sn,
                             session.refresh_max_cmd_sn())
            self._queue(hdr)

    def _watch_pdu(self, now: float) -> None:
        """Drop a peer that left one PDU incomplete for a whole pdu_timeout period (not
        while the driver has stopped reading: then the delay is ours)."""
        part = None if self.rx_paused else self.partial_pdu()
        mark = None if part is None else (self.headers, part)
        if mark is not None and mark == self._watch_mark:
            log.warning("connection %s dropped: a PDU took more than %.0f s to arrive",
                        self.peer_address, self.pdu_timeout)
            self._close("PDU receive timeout")
            return
        self._watch_mark = mark
        self._watch_at = now + self.pdu_timeout


_PADDING = {1: b"\0", 2: b"\0\0", 3: b"\0\0\0"}
_DELAYED_FAILURES = frozenset({LoginStatus.AUTHENTICATION_FAILURE,
                               LoginStatus.AUTHORIZATION_FAILURE})
# Requests that carry a CmdSN of their own (RFC 7143 4.2.2.1).
_NUMBERED = frozenset({Op.SCSI_CMD, Op.NOP_OUT, Op.TASK_MGMT_REQ, Op.TEXT_REQ, Op.LOGOUT_REQ})
