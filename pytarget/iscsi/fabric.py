"""The glue between one iSCSI connection and the device server, with no socket in sight.

A `Fabric` takes the events a `Connection` produces and does the work they ask for: it builds
the SCSI task of a command (its I_T nexus, task attribute, Data-Out source and Data-In hooks)
and submits it to the logical unit found through the front-end interface (`core.frontend`),
answers Data-Out requests with R2Ts, performs task management (RFC 7143 11.5, SAM-5 7), binds
a completed login to its session and carries out a logout (RFC 7143 11.14). Session-wide work
(reinstatement, target cold reset, the end of a session) goes to the `SessionHost`.

What it needs of the transport beneath it is the `Wire`: write what the connection queued,
re-arm the timers, stop reading. The transport tells it how many bytes have left
(`release_lent`) and when the connection is gone (`connection_lost`). Tests drive it in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Protocol

from ..core import sense as S
from ..core.frontend import FrontEndUnit
from ..core.sense import Asc
from ..core.task import ScsiTask
from . import connection as C
from .connection import Connection
from .dataout import DataOutSequence
from .errors import LoginError
from .pdu import LogoutReason, LogoutResponse, TmfFunction, TmfResponse, decode_lun
from .session import ConnectionLink, IscsiTask, Session
from .target import TargetRegistry

log = logging.getLogger("pytarget.transport")

# Functions that name a logical unit, which must then exist (RFC 7143 11.5.1).
_NEEDS_LU = frozenset({TmfFunction.ABORT_TASK, TmfFunction.ABORT_TASK_SET,
                       TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET})


class SessionHost(Protocol):
    """Session-wide work, done by whoever holds every session (the server)."""

    def session_started(self, session: Session, link: ConnectionLink) -> None: ...

    def end_session(self, session: Session, reason: str) -> Awaitable[None]:
        """Close every connection of `session` and end it (reinstatement, cold reset)."""
        ...

    def drop_target_connections(self, origin: Session | None) -> Awaitable[None]:
        """End every session to the target of `origin` (TARGET COLD RESET)."""
        ...

    def connection_closed(self, link: ConnectionLink, session: Session) -> Awaitable[None]: ...


class Wire(ConnectionLink, Protocol):
    """What the fabric needs of the transport that carries its connection."""

    def send(self) -> None:
        """Write what the connection has queued (now or at the end of the receive batch)."""
        ...

    def rearm(self) -> None:
        """The connection's next deadline may have changed."""
        ...

    def stop_reading(self) -> None: ...


class Fabric:
    """Runs one connection's commands, task management, login binding and logout."""

    def __init__(self, conn: Connection, registry: TargetRegistry, host: SessionHost,
                 wire: Wire, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.registry = registry
        self.host = host
        self.wire = wire
        self.loop = loop
        self.cid = 0
        self.closed = False
        self.inflight: dict[int, tuple[ScsiTask, FrontEndUnit]] = {}  # ITT -> (task, unit)
        # Data-In lent by the device server (views of the page cache, their blocks locked):
        # (conn.queued_bytes after the response, release), in the order they were queued.
        self.lent: deque[tuple[int, Callable[[], None]]] = deque()
        self.idle: asyncio.Future[None] | None = None
        self.background: set[asyncio.Task[Any]] = set()
        self.done: asyncio.Future[None] = loop.create_future()
        self._on_done = self._completed  # bound once: every command is submitted with it

    # ---------------------------------------------------------------- events
    def process(self) -> None:
        """Act on every event the connection has produced."""
        events = self.conn.events
        while events:
            ev = events.popleft()
            kind = type(ev)
            if kind is C.ExecuteCommand:
                self._execute(ev.task)  # type: ignore[attr-defined]
            elif kind is C.DataOutReady:
                self._data_ready(ev.task)  # type: ignore[attr-defined]
            elif isinstance(ev, C.TaskManagement):
                self._spawn(self._task_management(ev))
            elif isinstance(ev, C.LoginReady):
                self._spawn(self._bind(ev))
            elif isinstance(ev, C.LogoutRequested):
                self._spawn(self._logout(ev))
            elif isinstance(ev, C.Closed):
                log.debug("%s: %s", self.conn.peer_address, ev.reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ---------------------------------------------------------------- SCSI commands
    def _execute(self, itask: IscsiTask) -> None:
        session = self.conn.session
        assert session is not None and session.target is not None and session.nexus is not None
        lu = session.lun_cache.get(itask.lun_field)
        if lu is None:
            lun = decode_lun(itask.lun_field)
            lu = session.lun_cache[itask.lun_field] = session.target.lookup(lun, session.nexus)
        scsi = ScsiTask(itask.cdb, lu.lun, itask.itt, session.nexus, itask.attr,
                        itask.edtl if itask.read else 0, itask.edtl if itask.write else 0, self)
        scsi.handle = itask
        itask.scsi = scsi
        seq = itask.data_out
        if seq is not None and seq.unsolicited_done and seq.received >= itask.edtl \
                and not seq.failure and not seq.error:
            scsi.data_out_ready = seq.whole()  # all of it came as immediate data
        if itask.read:
            if self.conn.params.data_digest:
                scsi.prepare_data_in = partial(self._digest_data_in, itask)
            else:
                scsi.lend_data_in = True  # Data-In only passes through sendmsg
        self.inflight[itask.itt] = (scsi, lu)
        lu.submit(scsi, self._on_done)

    def _digest_data_in(self, itask: IscsiTask, data: memoryview) -> None:
        """The Data-In digests of a read's buffer, ready for sending (on the event loop or an
        I/O thread, wherever the read ran)."""
        length = min(len(data), itask.edtl)
        itask.data_in_digests = (length, self.conn.data_in_digests(data, length))

    def _completed(self, scsi: ScsiTask) -> None:
        release = scsi.on_data_sent
        if release is None:
            self._respond(scsi)
            return
        # Data-In lent from the page cache: its blocks stay locked until the transport has
        # sent the last byte of the response (or it is never sent).
        scsi.on_data_sent = None
        queued = self.conn.queued_bytes
        self._respond(scsi)
        # The queued PDUs hold the view now. The task and its IscsiTask refer to each other,
        # so the task may outlive its command until the cyclic garbage collector runs: it must
        # not keep the file's mapping (and the descriptor the mapping holds) alive meanwhile,
        # or a retired LUN's file, such as a deleted snapshot, keeps its blocks.
        scsi.data_in = None
        if self.conn.queued_bytes == queued or self.closed:
            release()
        else:
            self.lent.append((self.conn.queued_bytes, release))

    def release_lent(self, sent: float = float("inf")) -> None:
        """Release the blocks of lent Data-In whose response ends within the first `sent`
        bytes of output (all of it when the connection ends)."""
        lent = self.lent
        while lent and lent[0][0] <= sent:
            lent.popleft()[1]()

    def _respond(self, scsi: ScsiTask) -> None:
        itask: IscsiTask = scsi.handle  # type: ignore[assignment]
        if self.inflight.get(itask.itt, (None,))[0] is not scsi:
            return
        del self.inflight[itask.itt]
        if not self.inflight and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)
        if self.conn.session is None or itask.done:
            return
        if scsi.aborted:
            self.conn.drop_task(itask)
        else:
            self.conn.send_scsi_result(itask, scsi.status, scsi.sense, scsi.data_in,
                                       scsi.data_in_len, scsi.data_out_len)
        self.wire.send()

    def fetch_data_out(self, task: ScsiTask, length: int) -> asyncio.Future[memoryview]:
        """DataSource for the device server: R2T for what has not arrived yet."""
        itask: IscsiTask = task.handle  # type: ignore[assignment]
        seq = itask.data_out
        fut: asyncio.Future[memoryview] = self.loop.create_future()
        if self.closed or (seq is not None and seq.error):
            fut.set_exception(_data_error(seq))
            return fut
        if self.conn.request_data_out(itask, length, fut):
            if seq is None:
                fut.set_result(memoryview(b""))
            elif seq.error:
                fut.set_exception(_data_error(seq))
            else:
                fut.set_result(seq.view())
        else:
            self.wire.send()
        return fut

    def _data_ready(self, itask: IscsiTask) -> None:
        seq = itask.data_out
        assert seq is not None
        fut = seq.waiter
        seq.waiter = None
        if not isinstance(fut, asyncio.Future) or fut.done():
            return
        if seq.error:
            fut.set_exception(_data_error(seq))
        else:
            fut.set_result(seq.view())

    # ---------------------------------------------------------------- task management
    async def _task_management(self, ev: C.TaskManagement) -> None:
        response = await self._do_tmf(ev)
        if not self.closed:
            self.conn.send_tmf_response(ev.itt, response)
            self.wire.send()
        if ev.function == TmfFunction.TARGET_COLD_RESET \
                and response == TmfResponse.FUNCTION_COMPLETE:
            await self.host.drop_target_connections(self.conn.session)

    async def _do_tmf(self, ev: C.TaskManagement) -> int:
        session = self.conn.session
        assert session is not None and session.target is not None and session.nexus is not None
        nexus = session.nexus
        target = session.target
        fn = ev.function
        lu = target.lookup(decode_lun(ev.lun_field), nexus)
        if fn in _NEEDS_LU and not lu.exists:
            return TmfResponse.LUN_DOES_NOT_EXIST
        if fn == TmfFunction.ABORT_TASK:
            entry = self.inflight.get(ev.referenced_task_tag)
            if entry is None:
                return TmfResponse.TASK_DOES_NOT_EXIST
            scsi, task_lu = entry
            await task_lu.abort_task(scsi.nexus, scsi.tag)
            return TmfResponse.FUNCTION_COMPLETE
        if fn == TmfFunction.ABORT_TASK_SET:
            await lu.abort_task_set(nexus)
            return TmfResponse.FUNCTION_COMPLETE
        if fn == TmfFunction.CLEAR_TASK_SET:
            await lu.abort_task_set(None, issuer=nexus)
            return TmfResponse.FUNCTION_COMPLETE
        if fn == TmfFunction.LOGICAL_UNIT_RESET:
            log.info("LUN reset of %s LUN %d by %s", target.name, lu.lun,
                     nexus.initiator_port_name,
                     extra={"event": "lun_reset", "initiator": nexus.initiator_port_name,
                            "target": target.name, "lun": lu.lun})
            await lu.reset(nexus)
            return TmfResponse.FUNCTION_COMPLETE
        if fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            cold = fn == TmfFunction.TARGET_COLD_RESET
            log.info("target %s reset of %s by %s", "cold" if cold else "warm",
                     target.name, nexus.initiator_port_name,
                     extra={"event": "target_reset", "initiator": nexus.initiator_port_name,
                            "target": target.name})
            for unit in target.units():
                await unit.reset(nexus, power_on=cold)
            return TmfResponse.FUNCTION_COMPLETE
        if fn == TmfFunction.TASK_REASSIGN:
            return TmfResponse.TASK_REASSIGN_NOT_SUPPORTED
        if fn == TmfFunction.CLEAR_ACA:
            return TmfResponse.FUNCTION_NOT_SUPPORTED
        return TmfResponse.FUNCTION_REJECTED

    # ---------------------------------------------------------------- login / logout
    async def _bind(self, ev: C.LoginReady) -> None:
        try:
            session, replaced = self.registry.bind_session(ev.result)
        except LoginError as exc:
            self.conn.fail_login(ev.response, exc.status)
            self.wire.send()
            return
        for old in replaced:
            log.info("session %s reinstated by a new login", old.tsih)
            await self.host.end_session(old, "reinstated")
        if self.closed or self.conn.wants_close:
            self.registry.remove_session(session)
            return
        self.cid = ev.result.cid
        self.conn.complete_login(session, ev.response)
        session.connections.append(self.wire)
        self.host.session_started(session, self.wire)
        self.wire.send()
        self.wire.rearm()  # keep-alive and PDU timers start now, even if all stays quiet

    async def _logout(self, ev: C.LogoutRequested) -> None:
        session = self.conn.session
        assert session is not None
        if ev.reason == LogoutReason.REMOVE_FOR_RECOVERY:
            self.conn.send_logout_response(ev.itt, LogoutResponse.RECOVERY_NOT_SUPPORTED,
                                           close=False)
            self.wire.send()
            return
        if ev.reason == LogoutReason.CLOSE_CONNECTION and ev.cid != self.cid:
            self.conn.send_logout_response(ev.itt, LogoutResponse.CID_NOT_FOUND, close=False)
            self.wire.send()
            return
        self.wire.stop_reading()
        await self.quiesce()
        log.info("logout of %s (TSIH %d)", session.params.initiator_name, session.tsih,
                 extra={"event": "logout", "initiator": session.params.initiator_name,
                        "isid": session.isid.hex(), "tsih": session.tsih})
        self.conn.send_logout_response(ev.itt, LogoutResponse.SUCCESS)
        self.wire.send()

    async def quiesce(self, timeout: float = 30.0) -> None:
        """Wait for the commands of this connection to finish (aborting them after timeout)."""
        if not self.inflight:
            return
        self.idle = self.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self.idle), timeout)
        except TimeoutError:
            await self.abort_all()

    async def abort_all(self) -> None:
        """Abort every command of this connection and wait until each has ended."""
        entries = list(self.inflight.values())
        if entries:
            await asyncio.gather(*(lu.abort_task(scsi.nexus, scsi.tag) for scsi, lu in entries))

    # ---------------------------------------------------------------- teardown
    def connection_lost(self) -> None:
        """The transport has closed the connection: lent data is released, and the
        connection's commands end (Data-Out waiters will never be answered)."""
        if self.closed:
            return
        self.closed = True
        self.release_lent()
        self._spawn(self._cleanup())

    async def _cleanup(self) -> None:
        await self.abort_all()
        session = self.conn.session
        if session is not None:
            await self.host.connection_closed(self.wire, session)
        if not self.done.done():
            self.done.set_result(None)


def _data_error(seq: DataOutSequence | None) -> S.SenseError:
    if seq is not None and seq.error == "digest":
        return S.aborted_command(Asc.PROTOCOL_SERVICE_CRC_ERROR)
    return S.aborted_command(Asc.DATA_PHASE_ERROR)
