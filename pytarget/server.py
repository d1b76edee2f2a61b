"""A running pytarget: the targets and logical units `assembly` built from the configuration,
portals listening, sessions tracked across connections, the control socket and metrics
endpoint, the changes a reload applies (one method each, called by `reconfigure`), and a clean
shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any, cast

from . import __version__, checkpoints, status
from .assembly import build_copy_manager, build_exports, build_registry, prepare_backing_files
from .backstore.threads import run_blocking
from .config import Config, ConfigError, load
from .control import ControlError, ControlServer, start_control
from .iscsi.bounds import Bounds, MemoryBudget
from .iscsi.node import TargetNode
from .iscsi.session import ConnectionLink, Session
from .metrics import MetricsServer, render
from .nbd_transport import NbdService, tls_context
from .reconfigure import Reload, ReloadRefused
from .scsi.device import LogicalUnit, io_threads_busy
from .snapshots import COMMANDS as SNAPSHOT_COMMANDS
from .snapshots import Snapshots
from .transport import COMPILED, ConnectionDriver, Listener, PollingSelector

log = logging.getLogger("pytarget")

STATUS_SERVICE = 0x03  # VPD 85h SERVICE TYPE of a status service (SPC-4 7.8.9 table 663)
RETIRE_GRACE = 30.0  # seconds a removed LUN's commands may take before they are aborted


def swap_portals(listeners: list[tuple[tuple[str, int], Listener]],
                 removed: list[tuple[str, int]],
                 added: list[tuple[tuple[str, int], Listener]]) -> list[str]:
    """In `listeners` (configured portal, its listener), close those of the `removed` portals
    (their connections stay) and keep the `added` ones; what changed, one line each. A
    reload's portal change, in a server and in the `workers:` supervisor, which owns the
    portals there."""
    changes = []
    for portal in removed:
        entry = next(e for e in listeners if e[0] == portal)
        listeners.remove(entry)
        entry[1].close()
        changes.append("portal {}:{} removed (its connections stay)".format(*entry[1].address))
    for entry in added:
        listeners.append(entry)
        changes.append("portal {}:{} added".format(*entry[1].address))
    return changes


def _nbd_tls(config: Config) -> tuple[ssl.SSLContext | None, bool]:
    """The TLS context of `nbd_tls` and whether TLS is required (none without it)."""
    tls = config.nbd.tls if config.nbd is not None else None
    if tls is None:
        return None, False
    context = tls_context(str(tls.cert), str(tls.key), str(tls.ca) if tls.ca else None)
    return context, tls.required


class Server:
    """One pytarget instance: owns the registry, the copy manager, listeners and connections."""

    def __init__(self, config: Config, portals: list[tuple[str, int]] | None = None,
                 source: str | os.PathLike[str] | None = None,
                 **connection_options: Any) -> None:
        self.config = config
        # What a reload reads: the file given, or the default lookup of `config.load(None)`.
        self.source = source if source is not None else (
            config.file if Path(config.file).is_file() else None)
        self.fixed_portals = portals is not None
        self.portals = portals or config.portals
        prepare_backing_files(config)
        self.registry = build_registry(config)
        self.registry.portals = list(self.portals)
        self.copy_manager = build_copy_manager(self.registry, config)
        self.snapshots = Snapshots(self)
        for problem in self.snapshots.open_exposed():
            log.error("%s", problem)
        limits = config.limits
        self.budget = MemoryBudget(limits.data_out_memory, limits.session_data_out_memory)
        self.connection_options = {**limits.connection_options(), "budget": self.budget,
                                   **connection_options}
        self.explicit_options = frozenset(connection_options)  # not changed by a reload
        self.refused_connections = 0
        self.listeners: list[tuple[tuple[str, int], Listener]] = []  # (configured portal, its)
        self.drivers: set[ConnectionDriver] = set()
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.nbd: NbdService | None = None  # the NBD front end (config `nbd`)
        self._next_nbd_tls: tuple[ssl.SSLContext | None, bool] = (None, False)
        self.logins: dict[Session, float] = {}
        self.reloads: dict[str, int] = {}
        self.retiring: set[asyncio.Task[None]] = set()
        self.poller: PollingSelector | None = None  # the event loop's selector (use_poller)
        self.streams = 0  # connections in the middle of a transfer (ConnectionDriver)
        self.started = time.monotonic()
        self.stopping = False
        self.stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    # ---------------------------------------------------------------- for the transport
    @property
    def output_high_water(self) -> int:
        return self.config.limits.output_high_water

    @property
    def send_timeout(self) -> float:
        return self.config.limits.send_timeout

    def streaming_changed(self, delta: int) -> None:
        self.streams += delta

    def use_poller(self, poller: PollingSelector) -> None:
        """`poller` is the selector of the event loop this server runs on: it may poll before
        sleeping while no connection is mid-transfer and the I/O threads are idle."""
        self.poller = poller
        poller.quiet = lambda: self.streams == 0 and not io_threads_busy()

    async def start(self) -> None:
        log.info("pytarget %s, data path %s", __version__,
                 "compiled (mypyc)" if COMPILED else "pure Python")
        for host, port in self.portals:
            listener = Listener(self, host, port)
            self.listeners.append(((host, port), listener))
            log.info("listening on %s:%d", *listener.address)
        self._announce_portals()
        if self.config.nbd is not None:
            self.nbd = NbdService(build_exports(self.registry, self.config,
                                                self.snapshots.units),
                                  self.config.limits.max_connections)
            self.nbd.tls, self.nbd.tls_required = _nbd_tls(self.config)
            self.nbd.serve_on(self.nbd.listen(*self.config.nbd.address))
            log.info("NBD exports served on %s:%d", *self.nbd.address or ("-", 0))
        if self.config.metrics is not None:
            self.metrics = await self.start_metrics(self.config.metrics)
        self.update_management_addresses(self.config)
        for node in self.registry.targets.values():
            for lu in node.luns.values():
                if lu.ownership is not None:
                    lu.ownership.start()
        self.control = await start_control(self.config, self.control_request)

    def _announce_portals(self) -> None:
        # A portal given with port 0 is reported with the port the kernel chose.
        self.registry.portals = [lst.address for _, lst in self.listeners]

    async def start_metrics(self, address: tuple[str, int]) -> MetricsServer:
        """A metrics endpoint serving this server, listening at `address` (not yet in use:
        see `replace_metrics`)."""
        metrics = MetricsServer(address[0], address[1], lambda: render(self))
        await metrics.start()
        return metrics


    def update_management_addresses(self, config: Config) -> bool:
        """VPD 85h: the configured addresses, and the metrics endpoint as the status service
        unless one is configured (a wildcard address has no URL to give). True when they
        changed."""
        addresses = list(config.management_addresses)
        if self.metrics is not None and not any(k == STATUS_SERVICE for k, _ in addresses) \
                and self.metrics.address[0] not in ("", "0.0.0.0", "::"):
            addresses.append((STATUS_SERVICE, self.metrics.url))
        changed = addresses != self.copy_manager.management_addresses
        self.copy_manager.management_addresses[:] = addresses
        return changed

    def accepted(self, sock: socket.socket) -> None:
        if self.stopping:
            sock.close()
            return
        if len(self.drivers) >= self.config.limits.max_connections:
            sock.close()
            self.refused_connections += 1
            if self.refused_connections & (self.refused_connections - 1) == 0:
                log.warning("connection refused: %d connections open (limits.max_connections);"
                            " %d refused so far", len(self.drivers), self.refused_connections)
            return
        try:
            driver = ConnectionDriver(self, sock)
        except OSError:
            sock.close()
            return
        self.drivers.add(driver)
        driver.done.add_done_callback(lambda _f: self.drivers.discard(driver))

    # ---------------------------------------------------------------- control socket
    async def control_request(self, command: str, request: dict[str, Any],
                              uid: int | None) -> Any:
        if command == "status":
            return status.collect(self)
        if command == "reload":
            log.info("reload requested over the control socket (uid %s)", uid,
                     extra={"event": "reload_request", "uid": uid})
            return {"changes": await self.reload()}
        if command in SNAPSHOT_COMMANDS:
            return await self.snapshots.handle(command, request)
        if command in checkpoints.COMMANDS:
            return await checkpoints.control(self.registry, command, request)
        raise ControlError(f"unknown command {command!r} (status, reload, "
                           + ", ".join((*SNAPSHOT_COMMANDS, *checkpoints.COMMANDS)) + ")")

    def snapshot_exports_changed(self) -> None:
        """A snapshot was exposed over NBD or stopped being: serve the new set of exports
        (connections to one that is gone are closed)."""
        if self.nbd is not None:
            self.nbd.use_exports(build_exports(self.registry, self.config,
                                               self.snapshots.units))

    # ---------------------------------------------------------------- sessions
    def session_started(self, session: Session, driver: ConnectionLink) -> None:
        kind = session.params.session_type
        self.logins[session] = time.monotonic()
        peer = "{}:{}".format(*driver.peer)
        log.info("login: %s %s session TSIH %d (ISID %s) to %s from %s",
                 session.params.initiator_name, kind.lower(), session.tsih, session.isid.hex(),
                 session.params.target_name or "-", peer,
                 extra={"event": "login", "initiator": session.params.initiator_name,
                        "isid": session.isid.hex(), "tsih": session.tsih,
                        "target": session.params.target_name or None, "peer": peer})

    async def connection_closed(self, driver: ConnectionLink, session: Session) -> None:
        if driver in session.connections:
            session.connections.remove(driver)
        if not session.connections and not session.closed:
            await self._session_gone(session)

    async def end_session(self, session: Session, reason: str) -> None:
        """Terminate a session's connections and tasks (reinstatement, cold reset)."""
        for driver in cast("list[ConnectionDriver]", list(session.connections)):
            driver.close(reason)
            await driver.done
        if not session.closed:
            await self._session_gone(session)

    async def _session_gone(self, session: Session) -> None:
        session.closed = True
        self.logins.pop(session, None)
        self.registry.remove_session(session)
        if session.target is not None and session.nexus is not None:
            for lu in session.target.luns.values():
                lu.nexus_lost(session.nexus)
        kind = session.params.session_type.lower()
        log.info("%s session TSIH %d of %s ended", kind, session.tsih,
                 session.params.initiator_name,
                 extra={"event": "session_end", "initiator": session.params.initiator_name,
                        "isid": session.isid.hex(), "tsih": session.tsih,
                        "target": session.target.name if session.target else None})

    async def drop_target_connections(self, origin: Session | None) -> None:
        """After TARGET COLD RESET every connection to the target closes (RFC 7143 11.5.1)."""
        if origin is None or origin.target is None:
            return
        for session in list(self.registry.sessions.values()):
            if session.target is origin.target:
                await self.end_session(session, "target cold reset")

    # ---------------------------------------------------------------- reconfiguration
    async def reload(self, config: Config | None = None) -> list[str]:
        """Re-read the configuration and apply what changed; the changes, one line each.

        A configuration that cannot be applied whole raises ControlError and changes nothing.
        """
        async with self._reload_lock:
            try:
                try:
                    new = config if config is not None else load(self.source, self.config.gateway)
                except ConfigError as exc:
                    raise ReloadRefused(str(exc)) from None
                nbd_listener = self._prepare_nbd(new)
                nbd_before = self.config.nbd
                try:
                    changes = await Reload(self, new).apply()
                except BaseException:
                    if nbd_listener is not None:
                        nbd_listener.close()
                    raise
                changes += self.snapshots.prune(new)
                if nbd_before is None and new.nbd is not None:
                    changes += await run_blocking(self.snapshots.open_exposed)
                changes += self._commit_nbd(new, nbd_listener)
            except ReloadRefused as exc:
                self.reloads["refused"] = self.reloads.get("refused", 0) + 1
                log.error("reload refused, the running configuration stays: %s", exc,
                          extra={"event": "reload", "outcome": "refused", "reason": str(exc)})
                raise ControlError(f"reload refused, the running configuration stays: {exc}") \
                    from None
            self.reloads["applied"] = self.reloads.get("applied", 0) + 1
            for change in changes:
                log.info("reload: %s", change, extra={"event": "reload", "outcome": "applied",
                                                      "changes": change})
            if not changes:
                log.info("reload: no changes", extra={"event": "reload", "outcome": "applied"})
            return changes

    def _prepare_nbd(self, new: Config) -> Listener | None:
        """The listener a reload's `nbd` address needs, bound before anything changes (a
        listener that cannot bind refuses the reload)."""
        old = self.config.nbd.address if self.config.nbd is not None else None
        wanted = new.nbd.address if new.nbd is not None else None
        try:
            self._next_nbd_tls = _nbd_tls(new)
        except (OSError, ssl.SSLError) as exc:
            raise ReloadRefused(f"nbd_tls: {exc}") from None
        if wanted is None or wanted == old:
            return None
        service = self.nbd or NbdService(build_exports(self.registry, new),
                                         new.limits.max_connections)
        try:
            listener = service.listen(*wanted)
        except OSError as exc:
            raise ReloadRefused(f"nbd: cannot listen on {wanted[0]}:{wanted[1]}: "
                                f"{exc.strerror}") from None
        self.nbd = service
        return listener

    def _commit_nbd(self, new: Config, listener: Listener | None) -> list[str]:
        """The NBD front end as `new` wants it: listening where it says, serving its
        exports (connections to an export that is gone or no longer allowed are closed)."""
        changes: list[str] = []
        if self.nbd is None:
            return changes
        if new.nbd is None:
            if self.nbd.listener is not None:
                self.nbd.serve_on(None)
                changes.append("NBD listener closed (its connections stay)")
        elif listener is not None:
            self.nbd.serve_on(listener)
            changes.append("NBD exports served on {}:{}".format(*listener.address))
        self.nbd.tls, self.nbd.tls_required = self._next_nbd_tls  # for new connections
        closed = self.nbd.use_exports(build_exports(self.registry, new, self.snapshots.units))
        if closed:
            changes.append(f"{closed} NBD connection(s) to removed exports closed")
        return changes

    # What a reload changes (reconfigure.Reload), each applied whole.
    def use_config(self, config: Config) -> None:
        """`config` is now the running configuration (what the next reload compares with)."""
        self.config = config

    def apply_limits(self, limits: Bounds) -> None:
        """New limits: memory budgets at once, timeouts and sizes for new connections (options
        given to the constructor stay)."""
        self.budget.total = limits.data_out_memory
        self.budget.per_holder = limits.session_data_out_memory
        self.connection_options.update((k, v) for k, v in limits.connection_options().items()
                                       if k not in self.explicit_options)

    def set_poll_window(self, window: float) -> bool:
        """The busy-polling window in seconds; False when this server does not poll."""
        if self.poller is None:
            return False
        self.poller.window = window
        return True

    def open_portal(self, host: str, port: int) -> Listener:
        """Listen on a new portal; it serves logins at once, and is announced (SendTargets,
        copy domain) and kept by `change_portals` or closed by its caller."""
        return Listener(self, host, port)

    def change_portals(self, removed: list[tuple[str, int]],
                       added: list[tuple[tuple[str, int], Listener]]) -> list[str]:
        """Close the listeners of `removed` configured portals (their connections stay), keep
        the `added` ones, announce the result; what changed, one line each."""
        changes = swap_portals(self.listeners, removed, added)
        self._announce_portals()
        return changes

    async def replace_metrics(self, metrics: MetricsServer | None) -> None:
        """Serve metrics from `metrics` (from `start_metrics`) or nowhere; the old endpoint
        closes."""
        old, self.metrics = self.metrics, metrics
        if old is not None:
            await old.close()

    def serve_lu(self, node: TargetNode[LogicalUnit], lu: LogicalUnit) -> LogicalUnit | None:
        """Put `lu` at its LUN of `node` with its copy service; the logical unit it replaces,
        still open (retire it)."""
        previous = node.luns.get(lu.lun)
        node.luns[lu.lun] = lu
        self.copy_manager.attach(lu)
        if lu.ownership is not None:
            lu.ownership.start()
        return previous

    def remove_lu(self, node: TargetNode[LogicalUnit], lun: int) -> None:
        """Take LUN `lun` out of `node` and retire its logical unit."""
        lu = node.luns.pop(lun, None)
        if lu is not None:
            self.retire(lu)

    def add_target(self, node: TargetNode[LogicalUnit]) -> None:
        """Serve a new target node with its logical units."""
        self.registry.add_target(node)
        for lu in node.luns.values():
            self.copy_manager.attach(lu)
            if lu.ownership is not None:
                lu.ownership.start()

    async def remove_target(self, node: TargetNode[LogicalUnit], reason: str) -> int:
        """Stop serving a target: no new logins, its sessions end, its logical units retire.
        The number of sessions ended."""
        self.registry.targets.pop(node.name.lower(), None)
        ended = [s for s in list(self.registry.sessions.values()) if s.target is node]
        for session in ended:
            await self.end_session(session, reason)
        for lu in node.luns.values():
            self.retire(lu)
        return len(ended)

    def retire(self, lu: LogicalUnit) -> None:
        """A removed LUN: let its commands finish (abort them after RETIRE_GRACE), end its
        copies and tokens, then close its backing file."""
        task = asyncio.ensure_future(self._retire(lu))
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def _retire(self, lu: LogicalUnit) -> None:
        if lu.copy_service is not None:
            await lu.copy_service.reset()
        self.copy_manager.detach(lu)
        entries = list(lu.tasks.values())
        if entries:
            _, pending = await asyncio.wait([r for _, r in entries], timeout=RETIRE_GRACE)
            if pending:
                await lu.abort([e for e in entries if e[1] in pending])
        lu.close()

    async def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading the configuration", extra={"event": "reload_request"})
        try:
            await self.reload()
        except ControlError:
            pass  # logged by reload
        except Exception:
            log.exception("reload failed")

    # ---------------------------------------------------------------- lifecycle
    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight commands finish, close connections, flush files."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down")
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        for _, listener in self.listeners:
            listener.close()
        if self.nbd is not None:
            await self.nbd.stop(grace)
        drivers = list(self.drivers)
        for driver in drivers:
            driver.stop_reading()
        await asyncio.gather(*(d.quiesce(grace) for d in drivers), return_exceptions=True)
        for driver in drivers:
            driver.close("target shutting down")
        if drivers:
            await asyncio.wait([d.done for d in drivers], timeout=grace)
        if self.retiring:
            await asyncio.wait(list(self.retiring), timeout=grace)
        for node in self.registry.targets.values():
            for lu in node.luns.values():
                lu.close()
        self.snapshots.close()
        self.stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._on_sighup()))
        await self.start()
        await self.stopped.wait()
