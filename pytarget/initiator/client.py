"""An asyncio iSCSI initiator over TCP, wrapping the sans-I/O `InitiatorConnection`.

One reader task feeds the socket's bytes to the protocol and resolves a future per Initiator
Task Tag, so any number of coroutines may have commands in flight on one connection at once;
the protocol itself keeps non-immediate requests within the target's CmdSN window.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from dataclasses import dataclass
from typing import Any

from ..core.table import Opcode
from ..core.task import TaskAttr
from ..iscsi.pdu import RESERVED_TAG, LogoutReason
from .protocol import (
    AsyncMessage,
    Authenticator,
    CommandAborted,
    CommandComplete,
    InitiatorConnection,
    LoginComplete,
    LoginFailed,
    LogoutComplete,
    NopReply,
    ProtocolError,
    R2TReceived,
    Rejected,
    TargetPing,
    TextComplete,
    TmfComplete,
    parse_sense,
)

DEFAULT_INITIATOR = "iqn.2026-11.io.pytarget:initiator"
GOOD = 0x00
CHECK_CONDITION = 0x02


class InitiatorError(Exception):
    """Base of the errors this client raises."""


class LoginFailedError(InitiatorError):
    def __init__(self, status_class: int, status_detail: int) -> None:
        super().__init__(f"login failed: status 0x{status_class:02x}{status_detail:02x}")
        self.status_class = status_class
        self.status_detail = status_detail

    @property
    def status(self) -> int:
        return self.status_class << 8 | self.status_detail


class RequestRejected(InitiatorError):
    def __init__(self, event: Rejected) -> None:
        super().__init__(f"rejected with reason 0x{event.reason:02x}")
        self.reason = event.reason
        self.event = event


class TaskAborted(InitiatorError):
    """The command was ended by a task management function."""


class ConnectionLost(InitiatorError):
    """The connection closed (or broke the protocol) before the answer came."""


class CommandFailed(InitiatorError):
    def __init__(self, result: CommandResult) -> None:
        super().__init__(f"status 0x{result.status:02x} sense {result.sense_triplet}")
        self.result = result


@dataclass(frozen=True)
class CommandResult:
    """Status, sense and data of one SCSI command."""

    itt: int
    status: int
    sense: bytes
    data: bytes
    residual_flags: int
    residual: int
    response: int = 0
    r2ts: int = 0
    data_in_pdus: int = 0

    @classmethod
    def of(cls, ev: CommandComplete) -> CommandResult:
        return cls(ev.itt, ev.status, ev.sense, ev.data, ev.residual_flags, ev.residual,
                   ev.response, ev.r2ts, ev.data_in_pdus)

    @property
    def good(self) -> bool:
        return self.status == GOOD and self.response == 0

    @property
    def sense_triplet(self) -> tuple[int, int, int] | None:
        return parse_sense(self.sense)

    @property
    def sense_key(self) -> int | None:
        t = parse_sense(self.sense)
        return t[0] if t else None

    @property
    def asc(self) -> int | None:
        t = parse_sense(self.sense)
        return t[1] if t else None

    @property
    def ascq(self) -> int | None:
        t = parse_sense(self.sense)
        return t[2] if t else None

    @property
    def overflow(self) -> bool:
        return bool(self.residual_flags & 0x04)

    @property
    def underflow(self) -> bool:
        return bool(self.residual_flags & 0x02)

    def check(self) -> CommandResult:
        """This result, or CommandFailed unless the status is GOOD."""
        if not self.good:
            raise CommandFailed(self)
        return self


def random_isid() -> bytes:
    """An ISID of the random type (RFC 7143 11.12.5: T=10b, A=0, B/C random, D random)."""
    return bytes([0x80]) + os.urandom(5)


def rw_cdb(write: bool, lba: int, blocks: int) -> bytes:
    """READ/WRITE (10) when the fields fit, else (16) (SBC-3 5.11, 5.15, 5.39, 5.42)."""
    if lba <= 0xFFFFFFFF and blocks <= 0xFFFF:
        op10 = Opcode.WRITE_10 if write else Opcode.READ_10
        return struct.pack(">BBIBHB", op10, 0, lba, 0, blocks, 0)
    op16 = Opcode.WRITE_16 if write else Opcode.READ_16
    return struct.pack(">BBQIBB", op16, 0, lba, blocks, 0, 0)


class Initiator:
    """One iSCSI connection (and so one session: MaxConnections=1) over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float = 30.0) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self.conn: InitiatorConnection | None = None
        self.login_event: LoginComplete | None = None
        self._login_future: asyncio.Future[LoginComplete] | None = None
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._read_task: asyncio.Task[None] | None = None
        self._error: Exception | None = None
        self.rejects: list[Rejected] = []
        self.async_messages: list[AsyncMessage] = []
        self.r2ts: dict[int, list[R2TReceived]] = {}
        self.pings = 0

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 30.0) -> Initiator:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 22), timeout)
        return cls(reader, writer, timeout)

    async def __aenter__(self) -> Initiator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing
    @property
    def closed(self) -> bool:
        return self._error is not None

    def pause_reading(self) -> None:
        """Stop taking the target's output off the socket (tests of its back-pressure)."""
        self._writer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        self._writer.transport.resume_reading()  # type: ignore[attr-defined]

    def _flush(self) -> None:
        assert self.conn is not None
        out = self.conn.data_to_send()
        if out and not self._writer.is_closing():
            self._writer.write(out)

    async def _drain(self) -> None:
        self._flush()
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def _read_loop(self) -> None:
        assert self.conn is not None
        reason: Exception = ConnectionLost("connection closed by the target")
        try:
            while True:
                data = await self._reader.read(1 << 20)
                if not data:
                    break
                self.conn.receive_data(data)
                self._dispatch()
                self._flush()
        except ProtocolError as exc:
            reason = ConnectionLost(f"target broke the protocol: {exc}")
        except (ConnectionError, OSError) as exc:
            reason = ConnectionLost(str(exc))
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: Exception) -> None:
        if self._error is None:
            self._error = reason
        for fut in [*self._waiters.values(), self._login_future]:
            if fut is not None and not fut.done():
                fut.set_exception(reason)
        self._waiters.clear()

    def _resolve(self, itt: int, value: Any = None, error: Exception | None = None) -> None:
        fut = self._waiters.pop(itt, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def _dispatch(self) -> None:
        assert self.conn is not None
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, CommandComplete):
                self._resolve(ev.itt, CommandResult.of(ev))
            elif isinstance(ev, CommandAborted):
                self._resolve(ev.itt, error=TaskAborted(f"ITT 0x{ev.itt:08x} aborted"))
            elif isinstance(ev, (TextComplete,)):
                self._resolve(ev.itt, list(ev.pairs))
            elif isinstance(ev, NopReply):
                self._resolve(ev.itt, ev.data)
            elif isinstance(ev, TmfComplete):
                self._resolve(ev.itt, ev.response)
            elif isinstance(ev, LogoutComplete):
                self._resolve(ev.itt, ev)
            elif isinstance(ev, Rejected):
                self.rejects.append(ev)
                if ev.ended_itt is not None:
                    self._resolve(ev.ended_itt, error=RequestRejected(ev))
            elif isinstance(ev, R2TReceived):
                self.r2ts.setdefault(ev.itt, []).append(ev)
            elif isinstance(ev, TargetPing):
                self.pings += 1
            elif isinstance(ev, AsyncMessage):
                self.async_messages.append(ev)
            elif isinstance(ev, (LoginComplete, LoginFailed)):
                fut = self._login_future
                if fut is not None and not fut.done():
                    if isinstance(ev, LoginComplete):
                        fut.set_result(ev)
                    else:
                        fut.set_exception(LoginFailedError(ev.status_class, ev.status_detail))

    def _expect(self, itt: int) -> asyncio.Future[Any]:
        if self._error is not None:
            raise self._error
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[itt] = fut
        return fut

    async def _wait(self, fut: asyncio.Future[Any], timeout: float | None = None) -> Any:
        await self._drain()
        return await asyncio.wait_for(fut, timeout if timeout is not None else self.timeout)

    def _connection(self) -> InitiatorConnection:
        if self.conn is None:
            raise InitiatorError("not logged in")
        if self._error is not None:
            raise self._error
        return self.conn

    # ------------------------------------------------------------------ login
    async def login(self, target_name: str | None = None, *,
                    initiator_name: str = DEFAULT_INITIATOR, isid: bytes | None = None,
                    tsih: int = 0, cid: int = 0, header_digest: bool = False,
                    data_digest: bool = False, security_stage: bool = False,
                    authenticator: Authenticator | None = None, login_pdu_limit: int = 8192,
                    answer_pings: bool = True, **keys: str | int | bool | None
                    ) -> LoginComplete:
        """Log in to `target_name`, or open a discovery session when it is None."""
        if self.conn is not None:
            raise InitiatorError("already logged in")
        self.conn = InitiatorConnection(
            initiator_name, target_name=target_name, isid=isid or random_isid(), tsih=tsih,
            cid=cid, header_digest=header_digest, data_digest=data_digest, keys=keys,
            authenticator=authenticator, security_stage=security_stage,
            login_pdu_limit=login_pdu_limit, answer_pings=answer_pings)
        self._login_future = asyncio.get_running_loop().create_future()
        self._read_task = asyncio.create_task(self._read_loop())
        self.conn.start_login()
        self.login_event = await self._wait(self._login_future)
        return self.login_event

    # ------------------------------------------------------------------ requests
    async def text(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        conn = self._connection()
        itt = conn.send_text(pairs)
        result: list[tuple[str, str]] = await self._wait(self._expect(itt))
        return result

    async def discover(self, value: str = "All") -> dict[str, list[str]]:
        """SendTargets (RFC 7143 appendix C): target name → its TargetAddress values."""
        if self.conn is None:
            await self.login(None)
        targets: dict[str, list[str]] = {}
        current: list[str] | None = None
        for key, val in await self.text([("SendTargets", value)]):
            if key == "TargetName":
                current = targets.setdefault(val, [])
            elif key == "TargetAddress" and current is not None:
                current.append(val)
        return targets

    def submit(self, lun: int, cdb: bytes, data_out: bytes | bytearray | memoryview = b"",
               read_length: int = 0, **options: Any) -> tuple[int, asyncio.Future[Any]]:
        """Issue a command without waiting: its ITT and a future of its CommandResult."""
        conn = self._connection()
        itt = conn.send_command(lun, cdb, data_out, read_length, **options)
        fut = self._expect(itt)
        self._flush()
        return itt, fut

    async def command(self, lun: int, cdb: bytes, data_out: bytes | bytearray | memoryview = b"",
                      read_length: int = 0, *, timeout: float | None = None,
                      attr: TaskAttr = TaskAttr.SIMPLE, **options: Any) -> CommandResult:
        _, fut = self.submit(lun, cdb, data_out, read_length, attr=attr, **options)
        result: CommandResult = await self._wait(fut, timeout)
        return result

    async def read(self, lun: int, lba: int, blocks: int, block_size: int = 512
                   ) -> CommandResult:
        return await self.command(lun, rw_cdb(False, lba, blocks),
                                  read_length=blocks * block_size)

    async def write(self, lun: int, lba: int, data: bytes | bytearray | memoryview,
                    block_size: int = 512) -> CommandResult:
        if len(data) % block_size:
            raise ValueError("data is not a whole number of blocks")
        return await self.command(lun, rw_cdb(True, lba, len(data) // block_size), data)

    async def test_unit_ready(self, lun: int = 0) -> CommandResult:
        return await self.command(lun, bytes(6))

    async def clear_unit_attentions(self, lun: int = 0, attempts: int = 8) -> CommandResult:
        """TEST UNIT READY until no unit attention is reported (SAM-5 5.14)."""
        result = await self.test_unit_ready(lun)
        for _ in range(attempts):
            if result.sense_key != 0x6:
                break
            result = await self.test_unit_ready(lun)
        return result

    async def tmf(self, function: int, lun: int = 0, referenced_itt: int = RESERVED_TAG,
                  **options: Any) -> int:
        """A task management function; returns the TMF response code (RFC 7143 11.6.1)."""
        conn = self._connection()
        itt = conn.send_tmf(function, lun, referenced_itt, **options)
        response: int = await self._wait(self._expect(itt))
        return response

    async def nop(self, data: bytes = b"") -> bytes:
        """Ping the target; returns the echoed data."""
        conn = self._connection()
        itt = conn.send_nop(data)
        echoed: bytes = await self._wait(self._expect(itt))
        return echoed

    async def logout(self, reason: int = LogoutReason.CLOSE_SESSION) -> LogoutComplete:
        conn = self._connection()
        itt = conn.send_logout(reason)
        result: LogoutComplete = await self._wait(self._expect(itt))
        return result

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Until the target closes the connection."""
        if self._read_task is not None:
            await asyncio.wait_for(asyncio.shield(self._read_task),
                                   timeout if timeout is not None else self.timeout)

    async def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
        self._fail_all(ConnectionLost("closed"))
