"""In-memory wiring of the target's sans-I/O Connection to the sans-I/O initiator.

The target side is the real one minus sockets: a `Connection`, its `Fabric` (the glue to the
device server) and real logical units (`scsi.device.LogicalUnit` over files), LUNs 0 and 1 of
`TARGET`. `Pair` moves bytes between the initiator and the connection, optionally cut into
chunks, until neither side has anything more to say; it stands in for the transport (a `Wire`
that writes nothing itself) and for the server (a `SessionHost` that ends sessions).

Each logical unit is wrapped in a `HarnessUnit` that also answers a few vendor-specific
opcodes (C0h-C2h) with which a test holds a command until it says so, fails one, or has one
produce Data-In of a chosen length. Its blocking I/O runs inline, so a pump is deterministic.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import tempfile
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from pytarget.backstore.base import Extent, ReadHook
from pytarget.backstore.file import FileBackstore
from pytarget.core.sense import Status
from pytarget.core.task import Nexus, ScsiTask
from pytarget.initiator.protocol import CommandComplete, InitiatorConnection, LoginComplete
from pytarget.iscsi import connection as C
from pytarget.iscsi import digest as dg
from pytarget.iscsi import pdu
from pytarget.iscsi.bounds import MemoryBudget
from pytarget.iscsi.connection import Connection
from pytarget.iscsi.fabric import Fabric
from pytarget.iscsi.node import TargetNode
from pytarget.iscsi.params import TargetLimits
from pytarget.iscsi.pdu import Bhs
from pytarget.iscsi.session import ConnectionLink, IscsiTask, Session
from pytarget.iscsi.target import TargetRegistry
from pytarget.scsi.device import LogicalUnit, LuConfig, NoLogicalUnit

TARGET = "iqn.2026-11.io.pytarget:unit"
OTHER_TARGET = "iqn.2026-11.io.pytarget:other"
INITIATOR = "iqn.2026-11.io.pytarget.unit:initiator"
BLOCK = 512
BLOCKS = 65536  # 32 MiB, sparse

TUR = bytes(6)
HOLD = 0xC0  # the unit keeps the command until the test finishes it
FAIL = 0xC1  # CHECK CONDITION, ILLEGAL REQUEST / INVALID FIELD IN CDB
PRODUCE = 0xC2  # Data-In of the length in CDB bytes 2-5 (for residual tests)
LONG_CDB = 0x7F

LOOP = asyncio.new_event_loop()  # every pair runs on it: pairs of one registry share sessions


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def produce(length: int) -> bytes:
    return struct.pack(">BBIHBB", PRODUCE, 0, length, 0, 0, 0)


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key
    sense[7] = 10
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class LoopFileBackstore(FileBackstore):
    """A file backstore whose awaitable calls run on the event loop: the pair's pump sees every
    step of a command without an I/O thread."""

    async def _now(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def aread(self, buf: memoryview, offset: int, then: ReadHook | None = None
              ) -> Awaitable[None]:
        return self._now(self._read_then, buf, offset, then)

    def awrite(self, data: memoryview, offset: int) -> Awaitable[None]:
        return self._now(self.write, data, offset)

    def aflush(self) -> Awaitable[None]:
        return self._now(self.flush)

    def adeallocate(self, offset: int, length: int) -> Awaitable[None]:
        return self._now(self.deallocate, offset, length)

    def azero(self, offset: int, length: int) -> Awaitable[None]:
        return self._now(self.zero, offset, length)

    def aextents(self, offset: int, length: int) -> Awaitable[list[Extent]]:
        return self._now(self.extents, offset, length)


class HarnessUnit:
    """A real logical unit that also answers the harness's vendor-specific opcodes."""

    def __init__(self, lu: LogicalUnit) -> None:
        self.lu = lu
        lu.in_thread = _inline  # type: ignore[method-assign]
        assert lu.backstore is not None
        self.disk = mmap.mmap(lu.backstore.fd, lu.nblocks * lu.block_size)
        self.held: dict[tuple[Any, int], tuple[ScsiTask, Callable[[ScsiTask], None]]] = {}

    @property
    def lun(self) -> int:
        return self.lu.lun

    @property
    def exists(self) -> bool:
        return self.lu.exists

    def submit(self, task: ScsiTask, on_done: Callable[[ScsiTask], None]) -> None:
        op = task.cdb[0]
        if op == HOLD:
            self.held[(task.nexus.key, task.tag)] = (task, on_done)
        elif op == FAIL:
            task.status = Status.CHECK_CONDITION
            task.sense = fixed_sense(0x5, 0x24, 0x00)
            on_done(task)
        elif op == PRODUCE:
            length = struct.unpack_from(">I", bytes(task.cdb), 2)[0]
            task.set_data_in(bytes(i & 0xFF for i in range(length)))
            on_done(task)
        elif op == LONG_CDB:
            on_done(task)
        else:
            self.lu.submit(task, on_done)

    def finish(self, task: ScsiTask) -> None:
        _, on_done = self.held.pop((task.nexus.key, task.tag))
        on_done(task)

    def _abort_held(self, nexus: Nexus | None) -> None:
        for key, (task, on_done) in list(self.held.items()):
            if nexus is None or key[0] == nexus.key:
                del self.held[key]
                task.aborted = True
                task.status = Status.TASK_ABORTED
                on_done(task)

    async def abort_task(self, nexus: Nexus, tag: int) -> bool:
        entry = self.held.pop((nexus.key, tag), None)
        if entry is None:
            return await self.lu.abort_task(nexus, tag)
        task, on_done = entry
        task.aborted = True
        on_done(task)
        return True

    async def abort_task_set(self, nexus: Nexus | None, issuer: Nexus | None = None) -> None:
        self._abort_held(nexus)
        await self.lu.abort_task_set(nexus, issuer)

    async def reset(self, issuer: Nexus | None, power_on: bool = False) -> None:
        self._abort_held(None)
        await self.lu.reset(issuer, power_on)

    def nexus_lost(self, nexus: Nexus) -> None:
        self.lu.nexus_lost(nexus)

    def take_unit_attention(self, nexus: Nexus) -> Any:
        return self.lu.take_unit_attention(nexus)

    def close(self) -> None:
        self.disk.close()
        self.lu.close()


def make_unit(node: TargetNode[Any], lun: int, blocks: int = BLOCKS) -> HarnessUnit:
    """A logical unit over a sparse file that lives as long as the unit (it is unlinked)."""
    fd, path = tempfile.mkstemp(prefix=f"pytarget-unit-lun{lun}-", suffix=".img")
    os.close(fd)
    os.unlink(path)
    FileBackstore.create(path, blocks * BLOCK)
    try:
        backstore = LoopFileBackstore(path)
    finally:
        os.unlink(path)
    lu = LogicalUnit(LuConfig(lun=lun, block_size=BLOCK, serial=f"UNIT{lun:04d}"), backstore,
                     node)
    return HarnessUnit(lu)


class Device:
    """The far side of a pair as its tests see it: what ran, what is held, what happened."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.executed: list[tuple[int, bytes]] = []
        self.held: dict[int, IscsiTask] = {}
        self.tmfs: list[C.TaskManagement] = []
        self.closed: list[str] = []
        self.replaced: list[Session] = []

    @property
    def disk(self) -> mmap.mmap:
        node = self.pair.registry.target(TARGET)
        assert node is not None
        return node.luns[0].disk  # type: ignore[no-any-return]

    def run(self) -> bool:
        """Act on what the connection has produced, and let the units run."""
        return LOOP.run_until_complete(self._run())

    async def _run(self) -> bool:
        moved = self.process()
        await settle()
        return moved

    def process(self) -> bool:
        conn = self.pair.conn
        moved = bool(conn.events)
        for ev in conn.events:
            if isinstance(ev, C.ExecuteCommand):
                self.executed.append((ev.task.itt, bytes(ev.task.cdb)))
                if ev.task.cdb[0] == HOLD:
                    self.held[ev.task.itt] = ev.task
            elif isinstance(ev, C.TaskManagement):
                self.tmfs.append(ev)
            elif isinstance(ev, C.Closed):
                self.closed.append(ev.reason)
        self.pair.fabric.process()
        if conn.wants_close:
            self.pair.wire.finish()
        for itt in [i for i, t in self.held.items() if t.done]:
            del self.held[itt]
        return moved

    def finish(self, itt: int) -> None:
        """Complete a held command with GOOD status."""
        task = self.held.pop(itt)
        assert task.scsi is not None
        _, unit = self.pair.fabric.inflight[itt]
        assert isinstance(unit, HarnessUnit)
        unit.finish(task.scsi)


async def settle() -> None:
    """Let every task the last step made runnable run (no I/O threads are involved)."""
    for _ in range(16):
        await asyncio.sleep(0)


class MemoryWire:
    """The transport of a pair: output stays in the connection until `Pair.pump` moves it."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.reading = True
        self.finished = False

    @property
    def cid(self) -> int:
        return self.pair.fabric.cid

    @property
    def peer(self) -> tuple[str, int]:
        return self.pair.conn.peer_address

    @property
    def done(self) -> asyncio.Future[None]:
        return self.pair.fabric.done

    def close(self, reason: str) -> None:
        self.pair.conn.close(reason)
        self.finish()

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.pair.fabric.connection_lost()

    def send(self) -> None:
        pass

    def rearm(self) -> None:
        pass

    def stop_reading(self) -> None:
        self.reading = False


class MemoryHost:
    """Session-wide work as the server does it."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.registry = pair.registry

    def session_started(self, session: Session, link: ConnectionLink) -> None:
        # A new nexus starts with a power-on unit attention; an initiator's first command
        # would consume it, the tests' first command expects GOOD.
        if session.target is not None and session.nexus is not None:
            for unit in session.target.luns.values():
                while unit.take_unit_attention(session.nexus) is not None:
                    pass

    async def end_session(self, session: Session, reason: str) -> None:
        if reason == "reinstated":
            self.pair.device.replaced.append(session)
        for link in list(session.connections):
            link.close(reason)
            await link.done
        if not session.closed:
            self._session_gone(session)

    async def connection_closed(self, link: ConnectionLink, session: Session) -> None:
        if link in session.connections:
            session.connections.remove(link)
        if not session.connections and not session.closed:
            self._session_gone(session)

    def _session_gone(self, session: Session) -> None:
        session.closed = True
        self.registry.remove_session(session)
        if session.target is not None and session.nexus is not None:
            for unit in session.target.units():
                unit.nexus_lost(session.nexus)

    async def drop_target_connections(self, origin: Session | None) -> None:
        if origin is None or origin.target is None:
            return
        for session in list(self.registry.sessions.values()):
            if session.target is origin.target:
                await self.end_session(session, "target cold reset")


Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    yield data


def byte_by_byte(data: bytes) -> Iterable[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


def make_registry(limits: TargetLimits | None = None, window: int = 128) -> TargetRegistry:
    """TARGET with LUNs 0 and 1, and OTHER_TARGET with none."""
    registry = TargetRegistry(limits or TargetLimits(), window=window,
                              absent_unit=NoLogicalUnit)
    node: TargetNode[HarnessUnit] = TargetNode(TARGET, alias="unit")
    node.luns = {lun: make_unit(node, lun) for lun in (0, 1)}
    registry.add_target(node)
    registry.add_target(TargetNode(OTHER_TARGET))
    registry.portals = [("127.0.0.1", 3260)]
    weakref.finalize(registry, _close_units, list(node.luns.values()))
    return registry


def _close_units(units: list[HarnessUnit]) -> None:
    for unit in units:
        unit.close()


class Pair:
    """A target Connection and an InitiatorConnection joined by in-memory byte pipes."""

    def __init__(self, *, limits: TargetLimits | None = None, window: int = 128,
                 now: float = 0.0, login_timeout: float = 30.0, nop_interval: float = 0.0,
                 nop_timeout: float = 30.0, registry: TargetRegistry | None = None,
                 target_name: str | None = TARGET, split: Chunker = whole,
                 rsplit: Chunker = whole, pdu_timeout: float = 0.0,
                 auth_failure_delay: float = 0.0, budget: MemoryBudget | None = None,
                 initiator: str = INITIATOR, **ini_kwargs: Any) -> None:
        self.limits = limits or TargetLimits()
        self.registry = registry or make_registry(self.limits, window)
        self.now = now
        self.conn = Connection(self.registry, self.limits, ("127.0.0.1", 3260),
                               ("127.0.0.1", 50000), now, login_timeout=login_timeout,
                               nop_interval=nop_interval, nop_timeout=nop_timeout, window=window,
                               pdu_timeout=pdu_timeout, auth_failure_delay=auth_failure_delay,
                               budget=budget)
        self.device = Device(self)
        self.wire = MemoryWire(self)
        self.host = MemoryHost(self)
        self.fabric = Fabric(self.conn, self.registry, self.host, self.wire, LOOP)
        self.unread = bytearray()  # what arrived after the target stopped reading
        self.received: list[tuple[Bhs, bytes]] = []
        ini_kwargs.setdefault("trace", lambda bhs, data: self.received.append((bhs, data)))
        self.ini = InitiatorConnection(initiator, target_name=target_name, **ini_kwargs)
        self.split = split
        self.rsplit = rsplit
        self.events: list[Any] = []
        self.sent = bytearray()

    # ------------------------------------------------------------------ moving bytes
    def to_target(self, data: bytes) -> None:
        if not self.wire.reading:
            self.unread += data
            return
        for chunk in self.split(data):
            self.conn.receive_data(chunk, self.now)

    def pump(self, rounds: int = 10000) -> None:
        LOOP.run_until_complete(self._pump(rounds))

    async def _pump(self, rounds: int) -> None:
        settled = False
        for _ in range(rounds):
            moved = False
            out = self.ini.data_to_send()
            if out:
                moved = True
                self.sent += out
                self.to_target(out)
            moved |= self.device.process()
            tout = self.conn.data_to_send()
            if tout:
                moved = True
                data = b"".join(bytes(b) for b in tout)
                self.fabric.release_lent(self.conn.queued_bytes)
                for chunk in self.rsplit(data):
                    self.ini.receive_data(chunk)
            new = self.ini.events()
            if new:
                moved = True
                self.events += new
            if moved:
                settled = False
            elif settled:
                return
            else:
                await settle()
                settled = True
        raise AssertionError("the pair never went quiet")

    def login(self) -> LoginComplete:
        self.ini.start_login()
        self.pump()
        done = [e for e in self.events if isinstance(e, LoginComplete)]
        assert done, f"login did not complete: {self.events} {self.device.closed}"
        return done[-1]

    def tick(self, now: float) -> None:
        self.now = now
        self.conn.on_timer(now)
        self.pump()

    # ------------------------------------------------------------------ looking at results
    def take(self, kind: type) -> list[Any]:
        found = [e for e in self.events if isinstance(e, kind)]
        self.events = [e for e in self.events if not isinstance(e, kind)]
        return found

    def result(self, itt: int) -> CommandComplete:
        for e in self.events:
            if isinstance(e, CommandComplete) and e.itt == itt:
                return e
        raise AssertionError(f"no result for ITT {itt}: {self.events}")

    def command(self, lun: int, cdb: bytes, data_out: bytes = b"", read_length: int = 0,
                **options: Any) -> CommandComplete:
        itt = self.ini.send_command(lun, cdb, data_out, read_length, **options)
        self.pump()
        return self.result(itt)

    def target_pdus(self, opcode: int | None = None) -> list[tuple[Bhs, bytes]]:
        return [(b, d) for b, d in self.received if opcode is None or b.opcode == opcode]

    @property
    def closed(self) -> bool:
        return self.conn.state == C.State.CLOSED


def frame(header: bytes | bytearray, data: bytes = b"", header_digest: bool = False,
          data_digest: bool = False) -> bytes:
    """One PDU on the wire, with padding and optional digests."""
    out = bytearray(header)
    if header_digest:
        out += dg.digest((header,))
    if data:
        padded = data + bytes(pdu.pad_len(len(data)))
        out += padded
        if data_digest:
            out += dg.digest((padded,))
    return bytes(out)


def split_pdus(stream: bytes, header_digest: bool = False, data_digest: bool = False
               ) -> list[tuple[Bhs, bytes]]:
    """Cut a digest-consistent byte stream into (header, data) pairs."""
    out = []
    pos = 0
    while pos < len(stream):
        bhs = Bhs(stream[pos:pos + pdu.BHS_LEN])
        hlen = pdu.BHS_LEN + bhs.total_ahs_length + (4 if header_digest else 0)
        dsl = bhs.data_segment_length
        dlen = dsl + pdu.pad_len(dsl) + (4 if dsl and data_digest else 0)
        out.append((bhs, stream[pos + hlen:pos + hlen + dsl]))
        pos += hlen + dlen
    return out

