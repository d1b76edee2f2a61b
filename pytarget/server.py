"""A running pytarget: configuration turned into targets and logical units, portals listening,
sessions tracked across connections, and a clean shutdown."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import signal
import socket
from pathlib import Path
from typing import Any

from .backstore.file import FileBackstore
from .config import Config, prepare_backing_files
from .copy.manager import CopyManager, RegistryDomain
from .iscsi.session import Session
from .iscsi.target import TargetNode, TargetRegistry
from .scsi.device import LogicalUnit, LuConfig
from .scsi.pr import PrStateError
from .transport import ConnectionDriver, Listener

log = logging.getLogger("pytarget")


def lu_identity(target_name: str, lun: int, serial: str | None) -> tuple[str, bytes]:
    """A stable unit serial number and NAA 3h (locally assigned) designator for a LUN."""
    digest = hashlib.sha256(f"{target_name.lower()}:{lun}".encode()).digest()
    value = (0x3 << 60) | (int.from_bytes(digest[:8], "big") & ((1 << 60) - 1))
    naa = value.to_bytes(8, "big")
    return serial or digest[:8].hex().upper(), naa


def build_registry(config: Config) -> TargetRegistry:
    registry = TargetRegistry()
    registry.portals = list(config.portals)
    pr_paths: set[Path] = set()
    for tc in config.targets:
        node = TargetNode(tc.name, tc.alias)
        for lc in tc.luns:
            # APTPL state lives next to the configuration: <config dir>/<backing file>.pr.json
            pr_path = config.base / f"{lc.path.name}.pr.json"
            if pr_path in pr_paths:
                raise PrStateError(errno.EEXIST, "two LUNs would keep persistent reservations "
                                   "in one file (backing file names must differ)", str(pr_path))
            pr_paths.add(pr_path)
            backstore = FileBackstore(str(lc.path), readonly=lc.readonly)
            serial, naa = lu_identity(tc.name, lc.id, lc.serial)
            lu_config = LuConfig(lun=lc.id, block_size=lc.block_size, readonly=lc.readonly,
                                 thin=lc.thin, removable=lc.removable, serial=serial, naa=naa,
                                 pr_state_path=str(pr_path))
            node.luns[lc.id] = LogicalUnit(lu_config, backstore, node)
        registry.add_target(node)
    copy_manager = CopyManager(RegistryDomain(registry), config.management_addresses)
    for node in registry.targets.values():
        for lu in node.luns.values():
            copy_manager.attach(lu)
    return registry


class Server:
    def __init__(self, config: Config, portals: list[tuple[str, int]] | None = None,
                 **connection_options: Any) -> None:
        self.config = config
        self.portals = portals or config.portals
        prepare_backing_files(config)
        self.registry = build_registry(config)
        self.registry.portals = list(self.portals)
        self.connection_options = connection_options
        self.listeners: list[Listener] = []
        self.drivers: set[ConnectionDriver] = set()
        self.stopping = False
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        for host, port in self.portals:
            listener = Listener(self, host, port)
            self.listeners.append(listener)
            log.info("listening on %s:%d", *listener.address)
        # A portal given with port 0 is reported with the port the kernel chose.
        self.registry.portals = [lst.address for lst in self.listeners]

    def accepted(self, sock: socket.socket) -> None:
        if self.stopping:
            sock.close()
            return
        try:
            driver = ConnectionDriver(self, sock)
        except OSError:
            sock.close()
            return
        self.drivers.add(driver)
        driver.done.add_done_callback(lambda _f: self.drivers.discard(driver))

    # ---------------------------------------------------------------- sessions
    def session_started(self, session: Session, driver: ConnectionDriver) -> None:
        kind = session.params.session_type
        log.info("login: %s %s session TSIH %d (ISID %s) to %s from %s",
                 session.params.initiator_name, kind.lower(), session.tsih, session.isid.hex(),
                 session.params.target_name or "-", "%s:%d" % driver.peer)

    async def connection_closed(self, driver: ConnectionDriver, session: Session) -> None:
        if driver in session.connections:
            session.connections.remove(driver)
        if not session.connections and not session.closed:
            await self._session_gone(session)

    async def end_session(self, session: Session, reason: str) -> None:
        """Terminate a session's connections and tasks (reinstatement, cold reset)."""
        for driver in list(session.connections):
            driver.close(reason)
            await driver.done
        if not session.closed:
            await self._session_gone(session)

    async def _session_gone(self, session: Session) -> None:
        session.closed = True
        self.registry.remove_session(session)
        if session.target is not None and session.nexus is not None:
            for lu in session.target.luns.values():
                lu.nexus_lost(session.nexus)
            log.info("session TSIH %d of %s ended", session.tsih, session.params.initiator_name)

    async def drop_target_connections(self, origin: Session | None) -> None:
        """After TARGET COLD RESET every connection to the target closes (RFC 7143 11.5.1)."""
        if origin is None or origin.target is None:
            return
        for session in list(self.registry.sessions.values()):
            if session.target is origin.target:
                await self.end_session(session, "target cold reset")

    # ---------------------------------------------------------------- lifecycle
    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight commands finish, close connections, flush files."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down")
        for listener in self.listeners:
            listener.close()
        drivers = list(self.drivers)
        for driver in drivers:
            if driver.reading and not driver.closed:
                driver.loop.remove_reader(driver.fd)
                driver.reading = False
        await asyncio.gather(*(d.quiesce(grace) for d in drivers), return_exceptions=True)
        for driver in drivers:
            driver.close("target shutting down")
        if drivers:
            await asyncio.wait([d.done for d in drivers], timeout=grace)
        for node in self.registry.targets.values():
            for lu in node.luns.values():
                lu.close()
        self.stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self.start()
        await self.stopped.wait()
