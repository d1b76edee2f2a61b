"""The only module that touches sockets: listeners, per-connection drivers, timers.

A `ConnectionDriver` owns one TCP socket. It reads with `recv_into` into the buffer the sans-I/O
`Connection` offers (its staging buffer, or straight into a task's Data-Out buffer), writes
the connection's output with vectored `sendmsg` of header and payload views, runs SCSI commands
on their logical units, and performs task management, login binding and logout. Session-wide
work (reinstatement, resets across sessions) goes through the `Server`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

from .core import sense as S
from .core.sense import Asc
from .core.task import ScsiTask, TaskAttr
from .iscsi import connection as C
from .iscsi.connection import Connection
from .iscsi.errors import LoginError
from .iscsi.pdu import LogoutReason, LogoutResponse, TmfFunction, TmfResponse, decode_lun
from .iscsi.session import IscsiTask

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("pytarget.transport")

_ATTRS = {0: TaskAttr.SIMPLE, 1: TaskAttr.SIMPLE, 2: TaskAttr.ORDERED, 3: TaskAttr.HEAD_OF_QUEUE,
          4: TaskAttr.ACA}
MAX_SEND_PARTS = 512  # IOV_MAX is 1024; keep well below it


class ConnectionDriver:
    """Drives one Connection over one non-blocking socket."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()
        local = sock.getsockname()[:2]
        peer = sock.getpeername()[:2]
        self.peer = peer
        self.conn = Connection(server.registry, server.registry.limits, local, peer,
                               self.loop.time(), **server.connection_options)
        self.cid = 0
        self.pending: deque[memoryview] = deque()
        self.sent_bytes = 0  # since the connection began; compared with conn.queued_bytes
        # Data-In lent by the device server (views of the page cache, their blocks locked):
        # (conn.queued_bytes after the response, release), in the order they were queued.
        self.lent: deque[tuple[int, Callable[[], None]]] = deque()
        self.writing = False
        self.flush_scheduled = False
        self.reading = True
        self.paused = False  # reading stopped while the peer does not take our output
        self.closed = False
        self.streaming = False  # counted in server.streams (see _note_streaming)
        self.last_progress = 0.0
        self.stall_timer: asyncio.TimerHandle | None = None
        self.inflight: dict[int, tuple[ScsiTask, Any]] = {}  # ITT -> (task, logical unit)
        self.idle: asyncio.Future[None] | None = None
        self.background: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.done = self.loop.create_future()
        self.loop.add_reader(self.fd, self._on_readable)
        self._schedule_timer()

    # ---------------------------------------------------------------- I/O
    def _on_readable(self) -> None:
        # Everything this batch of PDUs produces is written at its end, in one `sendmsg`, rather
        # than one loop iteration later (the latency of a lone command): while it runs, `_send`
        # schedules no flush of its own (that would cost an extra loop iteration per command).
        batch = not self.flush_scheduled
        self.flush_scheduled = True
        try:
            self._receive_batch()
        finally:
            if batch:
                self.flush_scheduled = False
        if not self.writing and not self.closed:
            self._write_some()  # also closes a connection whose last output is out
        else:
            self._note_streaming()  # `_write_some` notes it otherwise

    def _note_streaming(self) -> None:
        """Count this connection in `server.streams` while it is in the middle of a transfer:
        a PDU partly received, or output the socket has not taken yet. Its next event is then
        more of the same stream, not a new request: the polling selector sleeps instead."""
        streaming = not self.closed and (self.writing or self.conn.partial_pdu() is not None)
        if streaming != self.streaming:
            self.streaming = streaming
            self.server.streams += 1 if streaming else -1

    def _receive_batch(self) -> None:
        conn = self.conn
        for _ in range(8):
            buf = conn.get_buffer()
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"receive failed: {exc.strerror}")
                return
            if n == 0:
                self._lost("peer closed the connection")
                return
            conn.buffer_updated(n, self.loop.time())
            self._process()
            if self.closed or not self.reading or self.paused or n < len(buf):
                return

    def _send(self) -> None:
        """Queue the connection's output; it is written once per event-loop iteration.

        Responses of commands that complete in the same iteration then leave in one vectored
        `sendmsg` instead of one system call each.
        """
        out = self.conn.data_to_send()
        if out:
            self.pending.extend(out)
            if self.writing and not self.paused:
                self._check_backlog()
        if not self.writing and not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.writing and not self.closed:
            self._write_some()

    def _write_some(self) -> None:
        pending = self.pending
        while pending:
            parts = list(pending) if len(pending) <= MAX_SEND_PARTS else \
                list(islice(pending, MAX_SEND_PARTS))
            try:
                sent = self.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                pending.clear()
                self._lost(f"send failed: {exc.strerror}")
                return
            self.sent_bytes += sent
            if self.writing:
                self.last_progress = self.loop.time()
            while sent:
                head = pending[0]
                if sent >= len(head):
                    sent -= len(head)
                    pending.popleft()
                else:
                    pending[0] = memoryview(head)[sent:]
                    sent = 0
        if self.lent:
            self._release_lent(self.sent_bytes)
        if pending and not self.writing:
            self.writing = True
            self.loop.add_writer(self.fd, self._on_writable)
            self.last_progress = self.loop.time()
            self._arm_stall_timer()
            self._check_backlog()
        elif not pending and self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
            if self.paused:
                self._resume_reading()
        if not pending and self.conn.wants_close and not self.closed:
            self._finish()
        self._note_streaming()

    def _on_writable(self) -> None:
        self._write_some()

    # ---------------------------------------------------------------- output back-pressure
    # Only while the socket refuses data: a peer that stops reading makes us stop reading
    # (so its requests cannot pile up responses), and is dropped after send_timeout.
    def _check_backlog(self) -> None:
        if sum(map(len, self.pending)) > self.server.config.limits.output_high_water:
            self.paused = True
            self.conn.rx_paused = True
            if self.reading and not self.closed:
                self.loop.remove_reader(self.fd)

    def _resume_reading(self) -> None:
        self.paused = False
        self.conn.rx_paused = False
        if self.reading and not self.closed:
            self.loop.add_reader(self.fd, self._on_readable)

    def _arm_stall_timer(self) -> None:
        if self.stall_timer is None:
            self.stall_timer = self.loop.call_at(
                self.last_progress + self.server.config.limits.send_timeout, self._stalled)

    def _stalled(self) -> None:
        self.stall_timer = None
        if not self.writing or self.closed:
            return
        timeout = self.server.config.limits.send_timeout
        if self.loop.time() - self.last_progress >= timeout:
            log.warning("%s: dropped: it took none of our output for %.0f s", self.peer, timeout)
            self.pending.clear()
            self._lost("peer stopped reading")
            return
        self._arm_stall_timer()

    # ---------------------------------------------------------------- events
    def _process(self) -> None:
        events = self.conn.events
        while events:
            ev = events.popleft()
            kind = type(ev)
            if kind is C.ExecuteCommand:
                self._execute(ev.task)
            elif kind is C.DataOutReady:
                self._data_ready(ev.task)
            elif kind is C.TaskManagement:
                self._spawn(self._task_management(ev))
            elif kind is C.LoginReady:
                self._spawn(self._bind(ev))
            elif kind is C.LogoutRequested:
                self._spawn(self._logout(ev))
            elif kind is C.Closed:
                log.debug("%s: %s", self.peer, ev.reason)
        self._send()
        self._schedule_timer()

    def _spawn(self, coro: Any) -> None:
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
        scsi = ScsiTask(itask.cdb, lu.lun, itask.itt, session.nexus,
                        _ATTRS.get(itask.attr, TaskAttr.SIMPLE),
                        itask.edtl if itask.read else 0, itask.edtl if itask.write else 0, self)
        scsi.handle = itask
        itask.scsi = scsi
        if itask.read:
            if self.conn.params.data_digest:
                scsi.prepare_data_in = partial(self._digest_data_in, itask)
            else:
                scsi.lend_data_in = True  # Data-In only passes through sendmsg
        self.inflight[itask.itt] = (scsi, lu)
        lu.submit(scsi, self._completed)

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
        # Data-In lent from the page cache: its blocks stay locked until the socket has taken
        # the last byte of the response (or it is never sent).
        scsi.on_data_sent = None
        queued = self.conn.queued_bytes
        self._respond(scsi)
        if self.conn.queued_bytes == queued or self.closed:
            release()
        else:
            self.lent.append((self.conn.queued_bytes, release))

    def _release_lent(self, sent: float = float("inf")) -> None:
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
        self._send()

    def fetch_data_out(self, task: ScsiTask, length: int) -> asyncio.Future[memoryview]:
        """DataSource for the device server: R2T for what has not arrived yet."""
        itask: IscsiTask = task.handle  # type: ignore[assignment]
        fut: asyncio.Future[memoryview] = self.loop.create_future()
        if itask.data_error or self.closed:
            fut.set_exception(self._data_error(itask))
            return fut
        if self.conn.request_data_out(itask, length, fut):
            fut.set_result(self._data_view(itask))
        else:
            self._send()
        return fut

    @staticmethod
    def _data_view(itask: IscsiTask) -> memoryview:
        if itask.buffer is None:
            return memoryview(b"")
        return memoryview(itask.buffer)[:min(itask.wanted, itask.edtl)]

    @staticmethod
    def _data_error(itask: IscsiTask) -> S.SenseError:
        if itask.data_error == "digest":
            return S.aborted_command(Asc.PROTOCOL_SERVICE_CRC_ERROR)
        return S.aborted_command(Asc.DATA_PHASE_ERROR)

    def _data_ready(self, itask: IscsiTask) -> None:
        fut = itask.waiter
        itask.waiter = None
        if not isinstance(fut, asyncio.Future) or fut.done():
            return
        if itask.data_error:
            fut.set_exception(self._data_error(itask))
        else:
            fut.set_result(self._data_view(itask))

    # ---------------------------------------------------------------- task management
    async def _task_management(self, ev: C.TaskManagement) -> None:
        response = await self._do_tmf(ev)
        if not self.closed:
            self.conn.send_tmf_response(ev.itt, response)
            self._send()
        if ev.function == TmfFunction.TARGET_COLD_RESET and response == TmfResponse.FUNCTION_COMPLETE:
            await self.server.drop_target_connections(self.conn.session)

    async def _do_tmf(self, ev: C.TaskManagement) -> int:
        session = self.conn.session
        assert session is not None and session.target is not None and session.nexus is not None
        nexus = session.nexus
        fn = ev.function
        lun = decode_lun(ev.lun_field)
        needs_lu = fn in (TmfFunction.ABORT_TASK, TmfFunction.ABORT_TASK_SET,
                          TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET)
        lu = session.target.lookup(lun, nexus)
        if needs_lu and not lu.exists:
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
            log.info("LUN reset of %s LUN %d by %s", session.target.name, lu.lun,
                     nexus.initiator_port_name,
                     extra={"event": "lun_reset", "initiator": nexus.initiator_port_name,
                            "target": session.target.name, "lun": lu.lun})
            await lu.reset(nexus)
            return TmfResponse.FUNCTION_COMPLETE
        if fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            cold = fn == TmfFunction.TARGET_COLD_RESET
            log.info("target %s reset of %s by %s", "cold" if cold else "warm",
                     session.target.name, nexus.initiator_port_name,
                     extra={"event": "target_reset", "initiator": nexus.initiator_port_name,
                            "target": session.target.name})
            for unit in session.target.luns.values():
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
            session, replaced = self.server.registry.bind_session(ev.result, self)
        except LoginError as exc:
            self.conn.fail_login(ev.response, exc.status)
            self._send()
            return
        for old in replaced:
            log.info("session %s reinstated by a new login", old.tsih)
            await self.server.end_session(old, "reinstated")
        if self.closed:
            self.server.registry.remove_session(session)
            return
        self.cid = ev.result.cid
        self.conn.complete_login(session, ev.response)
        session.connections.append(self)
        self.server.session_started(session, self)
        self._send()
        self._schedule_timer()  # keep-alive and PDU timers start now, even if all stays quiet

    async def _logout(self, ev: C.LogoutRequested) -> None:
        session = self.conn.session
        assert session is not None
        if ev.reason == LogoutReason.REMOVE_FOR_RECOVERY:
            self.conn.send_logout_response(ev.itt, LogoutResponse.RECOVERY_NOT_SUPPORTED,
                                           close=False)
            self._send()
            return
        if ev.reason == LogoutReason.CLOSE_CONNECTION and ev.cid != self.cid:
            self.conn.send_logout_response(ev.itt, LogoutResponse.CID_NOT_FOUND, close=False)
            self._send()
            return
        self.reading = False
        self.loop.remove_reader(self.fd)
        await self.quiesce()
        log.info("logout of %s (TSIH %d)", session.params.initiator_name, session.tsih,
                 extra={"event": "logout", "initiator": session.params.initiator_name,
                        "isid": session.isid.hex(), "tsih": session.tsih})
        self.conn.send_logout_response(ev.itt, LogoutResponse.SUCCESS)
        self._send()

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
        by_lu: dict[int, tuple[Any, list[tuple[int, Any]]]] = {}
        for scsi, lu in list(self.inflight.values()):
            by_lu.setdefault(id(lu), (lu, []))[1].append((scsi.nexus.key, scsi.tag))
        for lu, keys in by_lu.values():
            await lu.abort([lu.tasks[k] for k in keys if k in lu.tasks])

    # ---------------------------------------------------------------- teardown
    def _lost(self, reason: str) -> None:
        log.info("%s: connection lost: %s", self.peer, reason)
        self.conn.close(reason)
        self._finish()

    def close(self, reason: str) -> None:
        """Close now, after one last non-blocking attempt to send what is queued (a TMF or
        Logout response that precedes the close must reach the initiator)."""
        self.pending.extend(memoryview(b) for b in self.conn.data_to_send())
        if self.pending and not self.closed:
            try:
                self.sock.sendmsg(list(self.pending)[:MAX_SEND_PARTS])
            except OSError:
                pass
        self.conn.close(reason)
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        if self.timer is not None:
            self.timer.cancel()
        if self.stall_timer is not None:
            self.stall_timer.cancel()
        self._note_streaming()
        self.pending.clear()
        self._release_lent()
        try:
            self.sock.close()
        except OSError:
            pass
        self._spawn(self._cleanup())

    async def _cleanup(self) -> None:
        await self.abort_all()
        # Waiters for Data-Out that will never come.
        session = self.conn.session
        if session is not None:
            await self.server.connection_closed(self, session)
        if not self.done.done():
            self.done.set_result(None)

    # ---------------------------------------------------------------- timers
    def _schedule_timer(self) -> None:
        """Arm the timer for the connection's next deadline. A deadline that only moved later
        (every received PDU pushes the keep-alive back) keeps the armed timer: it fires early,
        `on_timer` finds nothing due, and the timer is armed again for the new deadline, so
        a busy connection costs one timer per interval instead of one per receive batch."""
        deadline = self.conn.next_deadline()
        if self.timer is not None:
            if deadline is not None and self.timer.when() <= deadline + 0.001:
                return
            self.timer.cancel()
            self.timer = None
        if deadline is not None and not self.closed:
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.conn.on_timer(self.loop.time())
        self._process()


class Listener:
    """One listening socket of a portal."""

    def __init__(self, server: Server, host: str, port: int) -> None:
        self.server = server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", exc)
                    return
                raise
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.server.accepted(conn)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class PollingSelector(selectors.EpollSelector):
    """epoll that polls for a short window before it sleeps.

    At low queue depth an initiator sends its next command a few tens of microseconds after
    our response left. A loop asleep in `epoll_wait` sees it only once the scheduler has woken
    it (an inter-processor interrupt; on a virtual machine, an exit on each side), which costs
    more than the command itself. So, before sleeping, the loop polls for up to `window`
    seconds, but only where that can pay:

    - only while `quiet()`: no connection is in the middle of a transfer (there, sleeping
      lets the stream pile up into fewer, larger receives and sends) and the I/O threads hold
      no work (they need the GIL to hand their result back; a sleeping loop lets them have it);
    - not after `MAX_MISSES` windows in a row saw nothing: the loop then sleeps at once, until
      a sleep ends within one window (traffic that the window would have caught).

    A busy loop never polls (it always has work), and an idle one sleeps after a few windows.
    """

    MAX_MISSES = 3

    def __init__(self, window: float, quiet: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.window = window
        self.quiet = quiet
        self.misses = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        poll = super().select
        window = self.window
        if timeout == 0 or window <= 0 or not self.quiet():
            return poll(timeout)
        start = time.monotonic()
        if self.misses >= self.MAX_MISSES:
            ready = poll(timeout)
            if ready and time.monotonic() - start < window:
                self.misses = 0
            return ready
        end = start + (window if timeout is None else min(window, timeout))
        while True:
            ready = poll(0)
            if ready:
                self.misses = 0
                return ready
            now = time.monotonic()
            if now >= end:
                break
        self.misses += 1
        return poll(None if timeout is None else max(0.0, timeout - (now - start)))


def is_local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True when `address` belongs to this host (only a local address can be bound)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True
