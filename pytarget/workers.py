"""More than one core (`workers: N`): a parent process that owns the portals and the control
socket and hands each accepted connection to one of N worker processes, each a full `Server`
over the same backing files; the channel between them carries connections, the change
notices of the documents the workers share, status and reload.

Routing: the parent peeks at the first PDU of a connection (without consuming it). A Login
Request names its session by InitiatorName and ISID (RFC 7143 4.4.4.1): a session seen before
goes to the worker that has it, so every connection of one session and its reinstatement meet
in one worker; a new one goes to the next worker in turn (`Router`). Anything else goes to
worker 0, which answers it as a single process would.

The channel is a unix SOCK_SEQPACKET socketpair per worker: one JSON object per message, a
connection's socket passed with it as SCM_RIGHTS. docs/performance.md, *More than one core*,
has the design, what is shared and how, and its limits.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import status
from .assembly import prepare_backing_files, serve_as_worker, worker_documents
from .cluster.local import remove_document
from .config import Config, ConfigError, load
from .control import ControlError, ControlServer, start_control
from .core.sense import SenseError
from .server import Server, swap_portals
from .transport import Listener, PollingSelector, bind_portal

log = logging.getLogger("pytarget.workers")

BHS_LENGTH = 48
LOGIN_REQUEST = 0x03
FIRST_PDU_TIMEOUT = 30.0  # seconds a new connection may take to send its first PDU header
PEEK_RETRY = 0.002  # seconds before looking again at a partly received header
MAX_LOGIN_DATA = 8192  # a first Login Request's data segment (MaxRecvDataSegmentLength)
ROUTE_MEMORY = 65536  # sessions whose worker the router remembers
# The largest message a channel end receives (a status document). A datagram larger than the
# sender's socket buffer (net.core.wmem_max, 208 KiB by default) fails at send with EMSGSIZE,
# which the worker answers with an error reply.
MAX_MESSAGE = 1 << 20
STOP_GRACE = 30.0  # seconds the workers have to stop (their own shutdown grace is 10 s)


# ---------------------------------------------------------------- the channel
def send_message(sock: socket.socket, message: dict[str, Any], fd: int | None = None) -> None:
    """One message (and a descriptor) on a blocking channel end."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if fd is None:
        sock.sendall(data)
    else:
        socket.send_fds(sock, [data], [fd])


def receive_message(sock: socket.socket) -> tuple[dict[str, Any] | None, int | None]:
    """The next message and the descriptor it carries; (None, None) when the other end has
    closed. Call when the socket is readable."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, None
    message = json.loads(data)
    return message, (fds[0] if fds else None)


def first_pdu_length(header: bytes) -> int:
    """How many bytes of a connection's first PDU the router reads: the whole of a Login
    Request (its data segment names the initiator), the BHS of anything else."""
    if len(header) < BHS_LENGTH or header[0] & 0x3F != LOGIN_REQUEST:
        return BHS_LENGTH
    data = int.from_bytes(header[5:8], "big")
    return min(BHS_LENGTH + header[4] * 4 + data, BHS_LENGTH + MAX_LOGIN_DATA)


def session_name(pdu: bytes) -> tuple[str, bytes] | None:
    """(InitiatorName, ISID) of a first Login Request, which names the session with the
    target portal group (RFC 7143 4.4.4.1, 11.12); None for anything else."""
    if len(pdu) < BHS_LENGTH or pdu[0] & 0x3F != LOGIN_REQUEST:
        return None
    start = BHS_LENGTH + pdu[4] * 4
    for pair in pdu[start:].split(b"\0"):
        if pair.startswith(b"InitiatorName="):
            return pair[len(b"InitiatorName="):].decode(errors="replace").lower(), pdu[8:14]
    return None


class Router:
    """Which worker a new connection goes to: a session seen before (by InitiatorName and
    ISID: its next connection, its reinstatement) to the same worker, a new one to the next
    worker in turn. The last ROUTE_MEMORY sessions are remembered; what is not a login, or
    names no initiator, goes to worker 0, which answers it as one process would."""

    def __init__(self, workers: int, memory: int = 0) -> None:
        self.workers = workers
        self.memory = memory or ROUTE_MEMORY
        self._known: dict[tuple[str, bytes], int] = {}
        self._next = 0

    def route(self, pdu: bytes) -> int:
        name = session_name(pdu)
        if name is None:
            return 0
        worker = self._known.pop(name, None)
        if worker is None:
            worker, self._next = self._next, (self._next + 1) % self.workers
        self._known[name] = worker  # the most recent last
        if len(self._known) > self.memory:
            del self._known[next(iter(self._known))]
        return worker


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(parent end, worker end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# ---------------------------------------------------------------- worker side
class WorkerChannel:
    """A worker's end of its channel: the `Relay` of its shared documents, and what the
    parent asks of its server."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.server: WorkerServer | None = None
        self.loop = asyncio.get_running_loop()
        self.open = True
        self._watchers: dict[str, list[Callable[[], Awaitable[None]]]] = {}
        self._announced: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, server: WorkerServer) -> None:
        """Serve `server` from now on (built after this channel, whose relay it uses)."""
        self.server = server
        self.loop.add_reader(self.sock.fileno(), self._readable)

    # Relay
    def connected(self) -> bool:
        return self.open

    def watch(self, key: str, on_notice: Callable[[], Awaitable[None]]) -> None:
        self._watchers.setdefault(key, []).append(on_notice)

    async def announce(self, key: str, version: int) -> None:
        if not self.open:
            raise OSError("the parent process is gone: cannot reach the other workers")
        ident = next(self._ids)
        future: asyncio.Future[None] = self.loop.create_future()
        self._announced[ident] = future
        send_message(self.sock, {"op": "announce", "key": key, "version": version, "id": ident})
        await future

    # messages
    def _readable(self) -> None:
        try:
            message, fd = receive_message(self.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message, fd = None, None
        if message is None:
            self._lost()
            return
        op = message.get("op")
        if op == "connection" and fd is not None and self.server is not None:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.server.accepted(sock)
        elif op == "acked":
            future = self._announced.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(None)
        elif op in ("notice", "status", "reload", "portals", "stop"):
            self._spawn(self._handle(message))
        elif fd is not None:
            os.close(fd)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        assert self.server is not None
        if op == "notice":
            for on_notice in list(self._watchers.get(message["key"], ())):
                try:
                    await on_notice()
                except Exception:
                    log.exception("handling a change of %s", message["key"])
            self._reply({"op": "ack", "id": message["id"]})
        elif op == "status":
            self._reply({"op": "reply", "id": message["id"],
                         "result": status.collect(self.server)})
        elif op == "reload":
            try:
                changes = await self.server.reload()
            except ControlError as exc:
                self._reply({"op": "reply", "id": message["id"], "error": str(exc)})
            else:
                self._reply({"op": "reply", "id": message["id"], "result": changes})
        elif op == "portals":
            self.server.use_portals([(h, p) for h, p in message["portals"]])
        elif op == "stop":
            await self.server.stop()

    def _reply(self, message: dict[str, Any]) -> None:
        if not self.open:
            return
        try:
            send_message(self.sock, message)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                self._lost()
                return
            self._reply({"op": "reply", "id": message.get("id"),
                         "error": f"the answer is larger than the channel takes ({exc})"})

    def _lost(self) -> None:
        if not self.open:
            return
        self.open = False
        self.loop.remove_reader(self.sock.fileno())
        for future in self._announced.values():
            if not future.done():
                future.set_exception(OSError("the parent process is gone"))
        self._announced.clear()
        if self.server is not None and not self.server.stopping:
            log.error("the parent process is gone: this worker stops")
            self._spawn(self.server.stop())


class WorkerServer(Server):
    """A `Server` that listens nowhere: its connections come from the parent, which also
    owns the control socket; the portals it announces (SendTargets) are the parent's."""

    async def start(self) -> None:
        self.registry.portals = list(self.portals)

    async def follow_shared_state(self) -> None:
        """Read every logical unit's shared reservation state now, so that a change another
        worker makes before this one's first command (a reset, a PREEMPT) owes this worker's
        nexuses its unit attentions as it would in one process."""
        for node in self.registry.targets.values():
            for lu in node.luns.values():
                if lu.pr.shared:
                    try:
                        await lu.pr.refresh()
                    except SenseError:
                        log.error("LUN %d: shared reservation state unreadable at start", lu.lun)

    def use_portals(self, portals: list[tuple[str, int]]) -> None:
        self.portals = portals
        self.registry.portals = list(portals)


def run_worker(index: int, config: Config, source: str | os.PathLike[str] | None,
               portals: list[tuple[str, int]], sock: socket.socket,
               options: dict[str, Any]) -> int:
    """A worker's life, in the child process after the fork; its exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # and reloads them
    sock.setblocking(True)
    poller = PollingSelector(config.poll_window())

    async def run() -> None:
        channel = WorkerChannel(sock)
        serve_as_worker(channel)
        server = WorkerServer(config, portals, source, **options)
        server.registry.share_tsihs(index, config.workers)
        server.use_poller(poller)
        channel.attach(server)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop()))
        await server.start()
        await server.follow_shared_state()
        log.info("worker %d (pid %d) serving", index, os.getpid())
        await server.stopped.wait()

    try:
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(poller)) as runner:
            runner.run(run())
    except Exception:
        log.exception("worker %d failed", index)
        return 1
    return 0


# ---------------------------------------------------------------- parent side
class _Worker:
    def __init__(self, index: int, pid: int, sock: socket.socket) -> None:
        self.index = index
        self.pid = pid
        self.sock = sock
        self.alive = True
        self.exited: asyncio.Future[None] | None = None


class _Round:
    """A notice the parent forwards: the workers it awaits an acknowledgement from."""

    def __init__(self, author: _Worker, ident: int, waiting: set[int]) -> None:
        self.author = author
        self.ident = ident
        self.waiting = waiting


class Supervisor:
    """The parent of `workers: N`: portals, control socket, the workers' channels."""

    def __init__(self, config: Config, portals: list[tuple[str, int]] | None,
                 source: str | os.PathLike[str] | None, **options: Any) -> None:
        self.config = config
        self.source = source if source is not None else (
            config.file if Path(config.file).is_file() else None)
        self.portals = portals or config.portals
        self.fixed_portals = portals is not None
        self.options = options
        self.workers: list[_Worker] = []
        self.router = Router(config.workers)
        self.listeners: list[tuple[tuple[str, int], Listener]] = []
        self.control: ControlServer | None = None
        self.started = time.monotonic()
        self.stopping = False
        self.failed = False
        self.stopped: asyncio.Event | None = None
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._rounds: dict[int, _Round] = {}
        self._ids = itertools.count(1)
        self._reload_lock: asyncio.Lock | None = None
        self._bound: list[socket.socket] = []
        self._pending: dict[socket.socket, asyncio.TimerHandle] = {}  # before their first PDU

    # -- before the event loop: bind, prepare, fork
    def spawn(self) -> int | None:
        """Bind the portals, make the backing files and shared documents ready, fork the
        workers. In a worker, runs it and returns its exit status; in the parent, None."""
        prepare_backing_files(self.config)
        self._power_on_documents()
        for host, port in self.portals:
            self._bound.append(bind_portal(host, port))
        addresses = [s.getsockname()[:2] for s in self._bound]
        for index in range(self.config.workers):
            parent_end, worker_end = channel_pair()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                parent_end.close()
                for sock in self._bound:
                    sock.close()
                for worker in self.workers:
                    worker.sock.close()
                return run_worker(index, self.config, self.source, addresses, worker_end,
                                  self.options)
            worker_end.close()
            self.workers.append(_Worker(index, pid, parent_end))
        return None

    def _power_on_documents(self) -> None:
        """The target starts as a power-on of its logical units (SPC-4 5.13.2): the shared
        reservation documents survive only with APTPL, ROD tokens never."""
        for tc in self.config.targets:
            for lc in tc.luns:
                if lc.reservations is not None:
                    continue  # shared with other gateways: not ours to reset
                pr_path, tokens_path = worker_documents(self.config, lc)
                remove_document(tokens_path)
                if not _aptpl(pr_path):
                    remove_document(pr_path)

    # -- in the parent's event loop
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._on_sighup()))
        for worker in self.workers:
            worker.sock.setblocking(True)
            worker.exited = loop.create_future()
            loop.add_reader(worker.sock.fileno(), self._readable, worker)
        for portal, sock in zip(self.portals, self._bound, strict=True):
            self.listeners.append((portal, Listener(self, *portal, bound=sock)))
        self._bound.clear()
        for _, listener in self.listeners:
            log.info("listening on %s:%d", *listener.address)
        log.info("%d workers: pids %s", len(self.workers),
                 ", ".join(str(w.pid) for w in self.workers))
        self.control = await start_control(self.config, self.control_request)
        await self.stopped.wait()
        return 1 if self.failed else 0

    def _announce(self) -> None:
        addresses = [list(lst.address) for _, lst in self.listeners]
        for worker in self.workers:
            self._send(worker, {"op": "portals", "portals": addresses})


    # -- connections
    def accepted(self, sock: socket.socket) -> None:
        if self.stopping:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_PDU_TIMEOUT
        self._pending[sock] = loop.call_later(FIRST_PDU_TIMEOUT, self._silent, sock)
        loop.add_reader(sock.fileno(), self._first_pdu, sock, deadline)

    def _silent(self, sock: socket.socket) -> None:
        """A connection that sent no whole first PDU in time is closed (as a worker closes
        one that does not complete its login)."""
        self._pending.pop(sock, None)
        if sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def _look_again(self, sock: socket.socket, deadline: float) -> None:
        if sock in self._pending:  # not closed as silent meanwhile
            asyncio.get_running_loop().add_reader(sock.fileno(), self._first_pdu, sock,
                                                  deadline)

    def _first_pdu(self, sock: socket.socket, deadline: float) -> None:
        """Look at the first PDU without taking it from the socket (the worker reads it)."""
        loop = asyncio.get_running_loop()
        try:
            pdu = sock.recv(BHS_LENGTH + MAX_LOGIN_DATA, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pdu = b""
        complete = len(pdu) >= first_pdu_length(pdu)
        if pdu and not complete and loop.time() < deadline:
            loop.remove_reader(sock.fileno())  # the rest is on its way
            loop.call_later(PEEK_RETRY, self._look_again, sock, deadline)
            return
        loop.remove_reader(sock.fileno())
        timer = self._pending.pop(sock, None)
        if timer is not None:
            timer.cancel()
        if not complete or self.stopping:
            sock.close()
            return
        worker = self.workers[self.router.route(pdu)]
        if worker.alive:
            self._send(worker, {"op": "connection"}, sock.fileno())
        sock.close()

    # -- the channels
    def _send(self, worker: _Worker, message: dict[str, Any], fd: int | None = None) -> None:
        if not worker.alive:
            return
        try:
            send_message(worker.sock, message, fd)
        except OSError as exc:
            log.error("worker %d (pid %d) unreachable: %s", worker.index, worker.pid, exc)
            self._gone(worker)

    def _readable(self, worker: _Worker) -> None:
        try:
            message, fd = receive_message(worker.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message, fd = None, None
        if fd is not None:
            os.close(fd)
        if message is None:
            self._gone(worker)
            return
        op = message.get("op")
        if op == "announce":
            ident = next(self._ids)
            others = {w.index for w in self.workers if w is not worker and w.alive}
            self._rounds[ident] = _Round(worker, message["id"], others)
            for other in self.workers:
                if other.index in others:
                    self._send(other, {"op": "notice", "key": message["key"], "id": ident})
            self._settle(ident)
        elif op == "ack":
            round_ = self._rounds.get(message["id"])
            if round_ is not None:
                round_.waiting.discard(worker.index)
                self._settle(message["id"])
        elif op == "reply":
            future = self._requests.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(message)

    def _settle(self, ident: int) -> None:
        round_ = self._rounds[ident]
        if not round_.waiting:
            del self._rounds[ident]
            self._send(round_.author, {"op": "acked", "id": round_.ident})

    def _gone(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        asyncio.get_running_loop().remove_reader(worker.sock.fileno())
        worker.sock.close()
        for ident, round_ in list(self._rounds.items()):
            round_.waiting.discard(worker.index)
            if round_.author is worker:
                del self._rounds[ident]
            else:
                self._settle(ident)
        if worker.exited is not None and not worker.exited.done():
            worker.exited.set_result(None)
        if not self.stopping:
            log.error("worker %d (pid %d) ended unexpectedly: the target stops",
                      worker.index, worker.pid)
            self.failed = True
            asyncio.ensure_future(self.stop())

    async def _ask(self, worker: _Worker, op: str) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[ident] = future
        self._send(worker, {"op": op, "id": ident})
        if not worker.alive:
            self._requests.pop(ident, None)
            raise ControlError(f"worker {worker.index} is gone")
        return await future

    # -- control socket
    async def control_request(self, command: str, request: dict[str, Any],
                              uid: int | None) -> Any:
        if command == "status":
            return await self.status()
        if command == "reload":
            log.info("reload requested over the control socket (uid %s)", uid,
                     extra={"event": "reload_request", "uid": uid})
            return {"changes": await self.reload()}
        raise ControlError(f"unknown command {command!r} with workers > 1 (status, reload; "
                           "snapshots need workers: 1)")

    async def status(self) -> dict[str, Any]:
        """Worker 0's document (the LUNs and reservations every worker shares), with every
        worker's sessions, copies and pid, and the parent's portals and control socket."""
        replies = [await self._ask(w, "status") for w in self.workers if w.alive]
        for reply in replies:
            if "error" in reply:
                raise ControlError(f"status: {reply['error']}")
        docs = [r["result"] for r in replies]
        doc = dict(docs[0])
        doc["pid"] = os.getpid()
        doc["uptime_seconds"] = round(time.monotonic() - self.started, 1)
        doc["portals"] = ["{}:{}".format(*lst.address) for _, lst in self.listeners]
        doc["control_socket"] = str(self.control.path) if self.control is not None else None
        doc["workers"] = [w["pid"] for w in docs]
        doc["sessions"] = [dict(s, worker=w["pid"]) for w in docs for s in w["sessions"]]
        doc["copies"] = [dict(c, worker=w["pid"]) for w in docs for c in w["copies"]]
        doc["targets"] = [dict(t, sessions=sum(w["targets"][i]["sessions"] for w in docs))
                          for i, t in enumerate(doc["targets"])]
        return doc

    async def reload(self) -> list[str]:
        """Check the new configuration here, then have each worker apply it in turn (the
        first creates what is new, so the others only open it); the parent moves its
        portals."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            try:
                new = load(self.source, self.config.gateway)
            except ConfigError as exc:
                raise ControlError(f"reload refused, the running configuration stays: {exc}") \
                    from None
            if new.workers != self.config.workers:
                raise ControlError("reload refused, the running configuration stays: workers: "
                                   "changes only with a restart")
            changes = self._change_portals(new)
            for worker in self.workers:
                reply = await self._ask(worker, "reload")
                if "error" in reply:
                    raise ControlError(f"worker {worker.index}: {reply['error']}")
                if worker.index == 0:
                    changes += reply["result"]
            self.config = new
            return changes

    def _change_portals(self, new: Config) -> list[str]:
        if self.fixed_portals or new.portals == self.config.portals:
            return []
        try:
            added = [(p, Listener(self, *p)) for p in new.portals if p not in self.config.portals]
        except OSError as exc:
            raise ControlError(f"reload refused, the running configuration stays: cannot "
                               f"listen: {exc.strerror}") from None
        removed = [p for p, _ in self.listeners if p not in new.portals]
        changes = swap_portals(self.listeners, removed, added)
        self._announce()
        return changes

    async def _on_sighup(self) -> None:
        try:
            await self.reload()
        except ControlError as exc:
            log.error("%s", exc)

    # -- stopping
    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.control is not None:
            await self.control.close()
        for _, listener in self.listeners:
            listener.close()
        for sock in list(self._pending):
            self._pending.pop(sock).cancel()
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        for worker in self.workers:
            self._send(worker, {"op": "stop"})
        exits = [w.exited for w in self.workers if w.exited is not None]
        if exits:
            await asyncio.wait(exits, timeout=STOP_GRACE)
        for worker in self.workers:
            if worker.alive:
                log.error("worker %d (pid %d) did not stop: killed", worker.index, worker.pid)
                os.kill(worker.pid, signal.SIGKILL)
            await asyncio.to_thread(os.waitpid, worker.pid, 0)
        assert self.stopped is not None
        self.stopped.set()


def _aptpl(path: Path) -> bool:
    """Whether a shared reservation document was written with APTPL set."""
    try:
        raw = path.read_bytes()
        return bool(json.loads(raw[8:]).get("aptpl"))
    except (OSError, ValueError, AttributeError):
        return False
