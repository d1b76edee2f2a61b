"""The only module that touches sockets: listeners, per-connection drivers, timers.

A `ConnectionDriver` owns one TCP socket. It reads with `recv_into` into the buffer the sans-I/O
`Connection` offers (its staging buffer, or straight into a task's Data-Out buffer), writes
the connection's output with vectored `sendmsg` of header and payload views, arms the
connection's timers, and pauses reading while the peer does not take its output. What the
connection's events ask of the device server and of the sessions is done by its `Fabric`
(iscsi/fabric.py); session-wide work goes to the `ServerHooks` the driver is given.
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
from itertools import islice
from typing import Any, Protocol

from .iscsi.connection import Connection
from .iscsi.fabric import Fabric, SessionHost
from .iscsi.target import TargetRegistry

log = logging.getLogger("pytarget.transport")

MAX_SEND_PARTS = 512  # IOV_MAX is 1024; keep well below it

# True when this module (and with it the data path, setup.py) was compiled by mypyc.
COMPILED = not __file__.endswith(".py")


class ServerHooks(SessionHost, Protocol):
    """What a ConnectionDriver needs of the server that accepted its socket."""

    @property
    def registry(self) -> TargetRegistry: ...

    @property
    def connection_options(self) -> dict[str, Any]:
        """Keyword arguments of every new `Connection` (timeouts, window, memory budget)."""
        ...

    @property
    def output_high_water(self) -> int:
        """Bytes of unsent output above which the driver stops reading."""
        ...

    @property
    def send_timeout(self) -> float:
        """Seconds a peer may take none of our output before it is dropped."""
        ...

    def streaming_changed(self, delta: int) -> None:
        """A connection began (+1) or ended (-1) a transfer in the middle (see PollingSelector)."""
        ...


class Acceptor(Protocol):
    def accepted(self, sock: socket.socket) -> None: ...


class ConnectionDriver:
    """Drives one Connection over one non-blocking socket."""

    def __init__(self, hooks: ServerHooks, sock: socket.socket) -> None:
        self.hooks = hooks
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()
        local = sock.getsockname()[:2]
        peer = sock.getpeername()[:2]
        self.peer = peer
        registry = hooks.registry
        self.conn = Connection(registry, registry.limits, local, peer, self.loop.time(),
                               **hooks.connection_options)
        self.fabric = Fabric(self.conn, registry, hooks, self, self.loop)
        self.pending: deque[bytes | bytearray | memoryview] = deque()
        self.sent_bytes = 0  # since the connection began; compared with conn.queued_bytes
        self.writing = False
        self.flush_scheduled = False
        self.reading = True
        self.paused = False  # reading stopped while the peer does not take our output
        self.closed = False
        self.streaming = False  # counted by the hooks (see _note_streaming)
        self.last_progress = 0.0
        self.stall_timer: asyncio.TimerHandle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop.add_reader(self.fd, self._on_readable)
        self._schedule_timer()

    # ---------------------------------------------------------------- what others read
    @property
    def cid(self) -> int:
        return self.fabric.cid

    @property
    def done(self) -> asyncio.Future[None]:
        return self.fabric.done

    @property
    def inflight(self) -> dict[int, Any]:
        return self.fabric.inflight

    async def quiesce(self, timeout: float = 30.0) -> None:
        """Wait for the commands of this connection to finish (aborting them after timeout)."""
        await self.fabric.quiesce(timeout)

    # ---------------------------------------------------------------- Wire (for the fabric)
    def rearm(self) -> None:
        self._schedule_timer()

    def stop_reading(self) -> None:
        """Read no more from the socket (logout, shutdown); output still goes out."""
        if self.reading and not self.closed:
            self.loop.remove_reader(self.fd)
        self.reading = False

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
        """Count this connection as streaming while it is in the middle of a transfer:
        a PDU partly received, or output the socket has not taken yet. Its next event is then
        more of the same stream, not a new request: the polling selector sleeps instead."""
        streaming = not self.closed and (self.writing or self.conn.partial_pdu() is not None)
        if streaming != self.streaming:
            self.streaming = streaming
            self.hooks.streaming_changed(1 if streaming else -1)

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

    def send(self) -> None:
        """Queue the connection's output; it is written once per event-loop iteration.

        Responses of commands that complete in the same iteration then leave in one vectored
        `sendmsg` instead of one system call each.
        """
        if not self.writing:
            # `_write_some` collects the output when the batch ends or the flush runs
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self._flush)
            return
        out = self.conn.data_to_send()
        if out:
            self.pending.extend(out)
            if not self.paused:
                self._check_backlog()

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.writing and not self.closed:
            self._write_some()

    def _write_some(self) -> None:
        pending = self.pending
        out = self.conn.data_to_send()
        if out:
            pending.extend(out)
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
            outstanding = self.conn.queued_bytes - self.sent_bytes  # all that pending holds
            self.sent_bytes += sent
            if self.writing:
                self.last_progress = self.loop.time()
            if sent == outstanding:
                pending.clear()  # the usual case: everything went
                break
            while sent:
                head = pending[0]
                if sent >= len(head):
                    sent -= len(head)
                    pending.popleft()
                else:
                    pending[0] = memoryview(head)[sent:]
                    sent = 0
        if self.fabric.lent:
            self.fabric.release_lent(self.sent_bytes)
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
        if sum(map(len, self.pending)) > self.hooks.output_high_water:
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
                self.last_progress + self.hooks.send_timeout, self._stalled)

    def _stalled(self) -> None:
        self.stall_timer = None
        if not self.writing or self.closed:
            return
        timeout = self.hooks.send_timeout
        if self.loop.time() - self.last_progress >= timeout:
            log.warning("%s: dropped: it took none of our output for %.0f s", self.peer, timeout)
            self.pending.clear()
            self._lost("peer stopped reading")
            return
        self._arm_stall_timer()

    # ---------------------------------------------------------------- events
    def _process(self) -> None:
        self.fabric.process()
        self.send()
        self._schedule_timer()

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
        try:
            self.sock.close()
        except OSError:
            pass
        self.fabric.connection_lost()

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


def bind_portal(host: str, port: int) -> socket.socket:
    """A TCP socket bound to a portal's address, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """One listening socket of a portal (bound here, or given `bound`)."""

    def __init__(self, acceptor: Acceptor, host: str, port: int,
                 bound: socket.socket | None = None) -> None:
        self.acceptor = acceptor
        self.sock = bound if bound is not None else bind_portal(host, port)
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
            self.acceptor.accepted(conn)

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
