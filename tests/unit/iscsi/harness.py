"""In-memory wiring of the target's sans-I/O Connection to the sans-I/O initiator.

`FakeDevice` stands in for the device server and the transport's event handling: it binds
logins through the real TargetRegistry, runs a handful of commands against a bytearray disk,
and answers task management and logout. `Pair` moves bytes between the two state machines,
optionally cut into chunks, until neither side has anything more to say.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from pytarget.initiator.protocol import CommandComplete, InitiatorConnection, LoginComplete
from pytarget.iscsi import connection as C
from pytarget.iscsi import digest as dg
from pytarget.iscsi import pdu
from pytarget.iscsi.bounds import MemoryBudget
from pytarget.iscsi.connection import Connection
from pytarget.iscsi.errors import LoginError
from pytarget.iscsi.params import TargetLimits
from pytarget.iscsi.pdu import Bhs, TmfFunction, TmfResponse
from pytarget.iscsi.session import IscsiTask
from pytarget.iscsi.target import TargetNode, TargetRegistry

TARGET = "iqn.2026-11.io.pytarget:unit"
OTHER_TARGET = "iqn.2026-11.io.pytarget:other"
INITIATOR = "iqn.2026-11.io.pytarget.unit:initiator"
BLOCK = 512

TUR = bytes(6)
HOLD = 0xC0  # the fake device keeps the command until the test finishes it
FAIL = 0xC1  # CHECK CONDITION, ILLEGAL REQUEST / INVALID FIELD IN CDB
PRODUCE = 0xC2  # Data-In of the length in CDB bytes 2-5 (for residual tests)
LONG_CDB = 0x7F


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


class FakeDevice:
    """Executes commands for a Connection the way the transport and device server would."""

    def __init__(self, conn: Connection, registry: TargetRegistry, blocks: int = 4096) -> None:
        self.conn = conn
        self.registry = registry
        self.disk = bytearray(blocks * BLOCK)
        self.executed: list[tuple[int, bytes]] = []
        self.held: dict[int, IscsiTask] = {}
        self.writes: dict[int, IscsiTask] = {}
        self.failed_data: list[tuple[int, str]] = []
        self.tmfs: list[C.TaskManagement] = []
        self.closed: list[str] = []
        self.replaced: list[Any] = []
        self.answer_logout = True

    def run(self) -> bool:
        events = self.conn.events
        moved = bool(events)
        while events:
            ev = events.popleft()
            if isinstance(ev, C.ExecuteCommand):
                self.execute(ev.task)
            elif isinstance(ev, C.DataOutReady):
                self.data_ready(ev.task)
            elif isinstance(ev, C.TaskManagement):
                self.task_management(ev)
            elif isinstance(ev, C.LoginReady):
                try:
                    session, replaced = self.registry.bind_session(ev.result, self.conn)
                except LoginError as exc:
                    self.conn.fail_login(ev.response, exc.status)
                    continue
                self.replaced += replaced
                self.conn.complete_login(session, ev.response)
                session.connections.append(self.conn)
            elif isinstance(ev, C.LogoutRequested):
                if self.answer_logout:
                    self.conn.send_logout_response(ev.itt, pdu.LogoutResponse.SUCCESS)
            elif isinstance(ev, C.Closed):
                self.closed.append(ev.reason)
        return moved

    def execute(self, task: IscsiTask) -> None:
        cdb = bytes(task.cdb)
        self.executed.append((task.itt, cdb))
        op = cdb[0]
        if op == 0x28:
            lba, blocks = struct.unpack_from(">IxH", cdb, 2)
            data = bytes(self.disk[lba * BLOCK:(lba + blocks) * BLOCK])
            self.conn.send_scsi_result(task, 0, None, data, len(data), 0)
        elif op == 0x2A:
            lba, blocks = struct.unpack_from(">IxH", cdb, 2)
            self.writes[task.itt] = task
            task.scsi = None
            if self.conn.request_data_out(task, blocks * BLOCK, waiter=object()):
                self.data_ready(task)
        elif op == HOLD:
            self.held[task.itt] = task
        elif op == FAIL:
            self.conn.send_scsi_result(task, 2, fixed_sense(0x5, 0x24, 0x00), None, 0, 0)
        elif op == PRODUCE:
            length = struct.unpack_from(">I", cdb, 2)[0]
            data = bytes(i & 0xFF for i in range(length))
            self.conn.send_scsi_result(task, 0, None, data, length, 0)
        else:
            self.conn.send_scsi_result(task, 0, None, None, 0, 0)

    def data_ready(self, task: IscsiTask) -> None:
        self.writes.pop(task.itt, None)
        if task.data_error:
            self.failed_data.append((task.itt, task.data_error))
            asc = (0x47, 0x05) if task.data_error == "digest" else (0x4B, 0x00)
            self.conn.send_scsi_result(task, 2, fixed_sense(0xB, *asc), None, 0, task.wanted)
            return
        lba, blocks = struct.unpack_from(">IxH", bytes(task.cdb), 2)
        assert task.buffer is not None
        self.disk[lba * BLOCK:(lba + blocks) * BLOCK] = memoryview(task.buffer)[:blocks * BLOCK]
        self.conn.send_scsi_result(task, 0, None, None, 0, blocks * BLOCK)

    def finish(self, itt: int) -> None:
        task = self.held.pop(itt)
        self.conn.send_scsi_result(task, 0, None, None, 0, 0)

    def task_management(self, ev: C.TaskManagement) -> None:
        self.tmfs.append(ev)
        response = TmfResponse.FUNCTION_COMPLETE
        if ev.function == TmfFunction.ABORT_TASK:
            task = self.held.pop(ev.referenced_task_tag, None) or self.writes.pop(
                ev.referenced_task_tag, None)
            if task is None:
                response = TmfResponse.TASK_DOES_NOT_EXIST
            else:
                self.conn.drop_task(task)
        elif ev.function in (TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.ABORT_TASK_SET):
            for table in (self.held, self.writes):
                for task in [t for t in table.values() if t.lun_field == ev.lun_field]:
                    del table[task.itt]
                    self.conn.drop_task(task)
        self.conn.send_tmf_response(ev.itt, response)


Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    yield data


def byte_by_byte(data: bytes) -> Iterable[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


def make_registry(limits: TargetLimits | None = None, window: int = 128) -> TargetRegistry:
    registry = TargetRegistry(limits or TargetLimits(), window=window)
    registry.add_target(TargetNode(TARGET, alias="unit"))
    registry.add_target(TargetNode(OTHER_TARGET))
    registry.portals = [("127.0.0.1", 3260)]
    return registry


class Pair:
    """A target Connection and an InitiatorConnection joined by in-memory byte pipes."""

    def __init__(self, *, limits: TargetLimits | None = None, window: int = 128,
                 now: float = 0.0, login_timeout: float = 30.0, nop_interval: float = 0.0,
                 nop_timeout: float = 30.0, registry: TargetRegistry | None = None,
                 target_name: str | None = TARGET, split: Chunker = whole,
                 rsplit: Chunker = whole, pdu_timeout: float = 0.0,
                 auth_failure_delay: float = 0.0, budget: MemoryBudget | None = None,
                 **ini_kwargs: Any) -> None:
        self.limits = limits or TargetLimits()
        self.registry = registry or make_registry(self.limits, window)
        self.now = now
        self.conn = Connection(self.registry, self.limits, ("127.0.0.1", 3260),
                               ("127.0.0.1", 50000), now, login_timeout=login_timeout,
                               nop_interval=nop_interval, nop_timeout=nop_timeout, window=window,
                               pdu_timeout=pdu_timeout, auth_failure_delay=auth_failure_delay,
                               budget=budget)
        self.device = FakeDevice(self.conn, self.registry)
        self.received: list[tuple[Bhs, bytes]] = []
        ini_kwargs.setdefault("trace", lambda bhs, data: self.received.append((bhs, data)))
        self.ini = InitiatorConnection(INITIATOR, target_name=target_name, **ini_kwargs)
        self.split = split
        self.rsplit = rsplit
        self.events: list[Any] = []
        self.sent = bytearray()

    # ------------------------------------------------------------------ moving bytes
    def to_target(self, data: bytes) -> None:
        for chunk in self.split(data):
            self.conn.receive_data(chunk, self.now)

    def pump(self, rounds: int = 10000) -> None:
        for _ in range(rounds):
            moved = False
            out = self.ini.data_to_send()
            if out:
                moved = True
                self.sent += out
                self.to_target(out)
            moved |= self.device.run()
            tout = self.conn.data_to_send()
            if tout:
                moved = True
                data = b"".join(bytes(b) for b in tout)
                for chunk in self.rsplit(data):
                    self.ini.receive_data(chunk)
            new = self.ini.events()
            if new:
                moved = True
                self.events += new
            if not moved:
                return
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

