"""The sockets of the NBD front end: its listener and one driver per client connection.

An `NbdDriver` owns one TCP socket, one sans-I/O `nbd.connection.NbdConnection` and its
`nbd.fabric.NbdFabric`. It reads with `recv_into` into the buffer the connection offers (its
staging buffer, or a WRITE's own payload buffer, so write data is copied once, by the kernel),
writes replies with vectored `sendmsg` of headers and data views (READ data lent from the page
cache is never copied in Python), releases lent blocks as their bytes leave, pauses reading while
too many requests are unanswered or the client does not take its replies, and ends a handshake
that takes too long. `NbdService` is the listener and the set of drivers, with the export table
a reload replaces.

TLS (NBD_OPT_STARTTLS): once the acknowledgement has left in clear, the driver runs the stream
through an `ssl.SSLObject` over memory BIOs, so the connection stays sans-I/O and unaware of it;
the zero-copy paths give way to the copies encryption makes anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from itertools import islice

from .nbd.connection import NbdConnection
from .nbd.exports import ExportDirectory, ExportTable
from .nbd.fabric import NbdFabric
from .transport import MAX_SEND_PARTS, Listener

log = logging.getLogger("pytarget.nbd")

NBD_PORT = 10809  # IANA
OUTPUT_HIGH_WATER = 64 << 20  # unsent reply bytes above which reading pauses
SEND_TIMEOUT = 60.0  # seconds a client may take none of our output before it is dropped


class NbdDriver:
    """Drives one NbdConnection over one non-blocking socket."""

    def __init__(self, service: NbdService, sock: socket.socket) -> None:
        self.service = service
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()
        self.peer = sock.getpeername()[:2]
        self.conn = NbdConnection(self.loop.time(), service.handshake_timeout,
                                  tls_available=service.tls is not None,
                                  tls_required=service.tls_required)
        self.tls: ssl.SSLObject | None = None
        self.tls_in = ssl.MemoryBIO()
        self.tls_out = ssl.MemoryBIO()
        self.handshaking = False
        self.fabric = NbdFabric(self.conn, service.directory, self.peer[0], self, self.loop)
        self.pending: deque[bytes | bytearray | memoryview] = deque()
        self.scratch = bytearray(65536)  # encrypted bytes land here under TLS
        self.pending_bytes = 0
        self.sent_bytes = 0
        self.reading = False
        self.writing = False
        self.flush_scheduled = False
        self.closed = False
        self.stall_timer: asyncio.TimerHandle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._update_reading()
        self.send()
        self._schedule_timer()

    @property
    def done(self) -> asyncio.Future[None]:
        return self.fabric.done

    # ---------------------------------------------------------------- Wire (for the fabric)
    def send(self) -> None:
        out = self.conn.data_to_send()
        if self.tls is not None:
            self._encrypt(out)
        for part in out if self.tls is None else ():
            self.pending.append(part)
            self.pending_bytes += len(part)
        if not self.writing and not self.flush_scheduled and not self.closed:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def upgrade_tls(self) -> None:
        """NBD_OPT_STARTTLS was acknowledged: the acknowledgement leaves in clear, everything
        after it through TLS."""
        context = self.service.tls
        assert context is not None
        self.send()
        self.tls = context.wrap_bio(self.tls_in, self.tls_out, server_side=True)
        self.handshaking = True

    def _encrypt(self, parts: list[bytes | bytearray | memoryview]) -> None:
        tls = self.tls
        assert tls is not None
        if not self.handshaking:
            for part in parts:
                if len(part):
                    tls.write(part)
            if self.fabric.lent:
                self.fabric.release_lent(self.conn.queued_bytes)  # copied by the write
        data = self.tls_out.read()
        if data:
            self.pending.append(data)
            self.pending_bytes += len(data)

    def _decrypt(self, data: memoryview) -> bool:
        """Encrypted bytes in; False when the connection ended."""
        tls = self.tls
        assert tls is not None
        self.tls_in.write(data)
        try:
            if self.handshaking:
                tls.do_handshake()
                self.handshaking = False
                log.info("NBD %s: TLS %s established", self.peer[0], tls.version(),
                         extra={"event": "nbd_tls", "peer": self.peer[0]})
                self.conn.tls_started()
            while True:
                clear = tls.read(65536)
                if not clear:
                    self._lost("peer closed TLS")
                    return False
                self.conn.receive_data(clear, self.loop.time())
        except ssl.SSLWantReadError:
            return True
        except ssl.SSLError as exc:
            self._encrypt([])  # the alert, if any
            self._write_some()
            self._lost(f"TLS failed: {exc.reason or exc}")
            return False

    # ---------------------------------------------------------------- reading
    def _update_reading(self) -> None:
        want = not self.closed and self.conn.reading \
            and self.pending_bytes <= OUTPUT_HIGH_WATER
        if want and not self.reading:
            self.loop.add_reader(self.fd, self._on_readable)
        elif not want and self.reading and not self.closed:
            self.loop.remove_reader(self.fd)
        self.reading = want

    def _on_readable(self) -> None:
        # What this batch of requests answers at once leaves at its end in one `sendmsg`,
        # not one loop iteration later.
        batch = not self.flush_scheduled
        self.flush_scheduled = True
        try:
            self._receive_batch()
        finally:
            if batch:
                self.flush_scheduled = False
        if not self.closed:
            if not self.writing:
                self._write_some()
            self._update_reading()
            self._schedule_timer()

    def _receive_batch(self) -> None:
        conn = self.conn
        for _ in range(8):
            buf = conn.get_buffer() if self.tls is None else memoryview(self.scratch)
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(f"receive failed: {exc.strerror}")
                return
            if n == 0:
                self._lost("peer closed the connection")
                return
            if self.tls is None:
                conn.buffer_updated(n, self.loop.time())
            elif not self._decrypt(buf[:n]):
                return
            self.fabric.process()
            if self.closed or not conn.reading or n < len(buf):
                break
        self.send()

    # ---------------------------------------------------------------- writing
    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.closed:
            self._write_some()

    def _write_some(self) -> None:
        pending = self.pending
        while pending:
            parts = list(islice(pending, MAX_SEND_PARTS))
            try:
                sent = self.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(f"send failed: {exc.strerror}")
                return
            self.sent_bytes += sent
            self.pending_bytes -= sent
            while sent:
                head = pending[0]
                if sent >= len(head):
                    sent -= len(head)
                    pending.popleft()
                else:
                    pending[0] = memoryview(head)[sent:]
                    sent = 0
        if self.fabric.lent and self.tls is None:
            self.fabric.release_lent(self.sent_bytes)
        if pending and not self.writing:
            self.writing = True
            self.loop.add_writer(self.fd, self._write_some)
            self._arm_stall_timer()
        elif not pending and self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        if not pending and self.conn.wants_close:
            self._lost(self.conn.close_reason or "closing")
            return
        self._update_reading()

    def _arm_stall_timer(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
        sent = self.sent_bytes
        self.stall_timer = self.loop.call_later(SEND_TIMEOUT, self._stalled, sent)

    def _stalled(self, sent_then: int) -> None:
        self.stall_timer = None
        if not self.writing or self.closed:
            return
        if self.sent_bytes == sent_then:
            log.warning("NBD %s: dropped: it took none of our output for %.0f s", self.peer[0],
                        SEND_TIMEOUT)
            self._lost("peer stopped reading")
            return
        self._arm_stall_timer()

    # ---------------------------------------------------------------- timers and the end
    def _schedule_timer(self) -> None:
        deadline = self.conn.next_deadline()
        if self.timer is not None:
            if deadline is not None and self.timer.when() == deadline:
                return
            self.timer.cancel()
            self.timer = None
        if deadline is not None and not self.closed:
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.conn.on_timer(self.loop.time())
        self.send()

    def close(self, reason: str) -> None:
        """Close now, after one last attempt to send what is queued."""
        self.send()
        if self.pending and not self.closed:
            try:
                self.sock.sendmsg(list(islice(self.pending, MAX_SEND_PARTS)))
            except OSError:
                pass
        self._lost(reason)

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        log.info("NBD %s: connection closed: %s", self.peer[0], reason,
                 extra={"event": "nbd_close", "peer": self.peer[0], "reason": reason})
        self.closed = True
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        for timer in (self.timer, self.stall_timer):
            if timer is not None:
                timer.cancel()
        self.pending.clear()
        self.pending_bytes = 0
        try:
            self.sock.close()
        except OSError:
            pass
        self.conn.close(reason)
        self.fabric.process()
        self.fabric.connection_lost()


class NbdService:
    """The NBD listener, its connections and the exports they may open."""

    def __init__(self, directory: ExportDirectory, max_connections: int = 1024,
                 handshake_timeout: float = 30.0, tls: ssl.SSLContext | None = None,
                 tls_required: bool = False) -> None:
        self.directory = directory
        self.tls = tls
        self.tls_required = tls is not None and tls_required
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.listener: Listener | None = None
        self.drivers: set[NbdDriver] = set()
        self.stopping = False

    @property
    def address(self) -> tuple[str, int] | None:
        return self.listener.address if self.listener is not None else None

    def listen(self, host: str, port: int) -> Listener:
        """Open a listening socket (not yet serving: see `serve_on`)."""
        return Listener(self, host, port)

    def serve_on(self, listener: Listener | None) -> None:
        """Accept on `listener` from now on (None: nowhere); the old one closes, its
        connections stay."""
        old, self.listener = self.listener, listener
        if old is not None and old is not listener:
            old.close()

    def accepted(self, sock: socket.socket) -> None:
        if self.stopping or len(self.drivers) >= self.max_connections:
            sock.close()
            return
        try:
            driver = NbdDriver(self, sock)
        except OSError:
            sock.close()
            return
        self.drivers.add(driver)
        driver.done.add_done_callback(lambda _f: self.drivers.discard(driver))

    def use_exports(self, directory: ExportDirectory) -> int:
        """New exports for new connections; a connection whose export is gone or no longer
        allowed to its client is closed. The number closed."""
        self.directory = directory
        closed = 0
        for driver in list(self.drivers):
            driver.fabric.directory = directory
            export = driver.fabric.export
            if export is not None and directory.lookup(export.name, driver.peer[0]) is None:
                driver.close("export removed")
                closed += 1
        return closed

    async def stop(self, grace: float = 10.0) -> None:
        self.stopping = True
        self.serve_on(None)
        drivers = list(self.drivers)
        await asyncio.gather(*(d.fabric.quiesce(grace) for d in drivers),
                             return_exceptions=True)
        for driver in drivers:
            driver.close("server shutting down")
        if drivers:
            await asyncio.wait([d.done for d in drivers], timeout=grace)


def tls_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """The server side of NBD's TLS: TLS 1.2 or later ("TLS versions"), this certificate and
    key, and with `ca` a client certificate signed by it required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


__all__ = ["NBD_PORT", "ExportTable", "NbdDriver", "NbdService"]
