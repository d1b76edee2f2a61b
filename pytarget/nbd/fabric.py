"""The glue between one NBD connection and the device server, with no socket in sight.

An `NbdFabric` takes the events an `NbdConnection` produces and does the work they ask for,
entirely through SCSI commands submitted as `ScsiTask`s to the logical unit behind the export
(`core.frontend`), on an I_T nexus of its own. Reservations, range locks, write protection,
unit attentions and the per-command metrics therefore apply to an NBD client exactly as they do
to an iSCSI initiator.

| NBD                          | SCSI                                                          |
|------------------------------|---------------------------------------------------------------|
| NBD_OPT_GO / INFO            | READ CAPACITY(16), MODE SENSE(6), INQUIRY VPD B0h and B2h     |
| NBD_CMD_READ                 | READ(16) (lent from the page cache); holes from GET LBA STATUS |
| NBD_CMD_WRITE (FUA)          | WRITE(16) with FUA                                            |
| NBD_CMD_FLUSH                | SYNCHRONIZE CACHE(16) of the whole medium                     |
| NBD_CMD_TRIM                 | UNMAP                                                         |
| NBD_CMD_WRITE_ZEROES         | WRITE SAME(16) NDOB, UNMAP on a thin unit; NO_HOLE: WRITE(16) |
|                              | of zeroes on a thin unit, WRITE SAME(16) NDOB on a thick one  |
| NBD_CMD_CACHE                | PRE-FETCH(16)                                                 |
| NBD_CMD_BLOCK_STATUS         | GET LBA STATUS(16) for `base:allocation`                      |

Requests longer than the unit's MAXIMUM TRANSFER LENGTH (or its UNMAP and WRITE SAME limits)
are split. A UNIT ATTENTION is not an NBD concept: the command is retried after it, as an
initiator's disk driver would. SCSI failures become NBD errors by `nbd_error` (docs/nbd.md has
the table). What it needs of the transport is its `Wire`; tests drive it in memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from ..core.frontend import FrontEndUnit
from ..core.sense import Asc, SenseKey, Status
from ..core.task import Nexus, ScsiTask, TaskAttr
from . import connection as C
from .connection import ExportFacts, NbdConnection
from .exports import Export, ExportDirectory, match_contexts
from .proto import BASE_ALLOCATION, Cmd, CmdFlag, Errno, Opt, Rep, State, TransmissionFlag

log = logging.getLogger("pytarget.nbd")

# The target port NBD clients reach (iSCSI's is 1: iscsi.node.DEFAULT_TPGT, RELATIVE_PORT).
NBD_TPGT = 2
NBD_RELATIVE_PORT = 2
MAX_RETRIES = 8  # unit attentions (or an abort by another initiator's reset) per command
HOLE_READ_MIN = 65536  # reads at least this long look for holes first (structured replies)
STATUS_DESCRIPTORS = 512  # GET LBA STATUS descriptors asked for per BLOCK_STATUS
MAX_EXTENT = 0xFFFFFFFF

_isids = itertools.count(1)

_READ_CAPACITY_16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
_MODE_SENSE_6 = bytes([0x1A, 0x08, 0x08, 0x00, 0xFF, 0x00])  # DBD, caching page
_INQUIRY_B0 = bytes([0x12, 0x01, 0xB0, 0x00, 0xFF, 0x00])
_INQUIRY_B2 = bytes([0x12, 0x01, 0xB2, 0x00, 0xFF, 0x00])


class Wire(Protocol):
    """What the fabric needs of the transport that carries its connection."""

    def send(self) -> None:
        """Write what the connection has queued (now or at the end of the receive batch)."""
        ...

    def upgrade_tls(self) -> None:
        """Encrypt the stream from here on (after NBD_OPT_STARTTLS was acknowledged)."""
        ...


class CommandFailed(Exception):
    """A SCSI command of an NBD request ended in something other than GOOD."""

    def __init__(self, error: Errno, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


@dataclass
class Geometry:
    """What the fabric learned of a unit when the export was opened."""

    block_size: int
    blocks: int
    physical_exponent: int = 0
    thin: bool = False
    zeroes_when_deallocated: bool = False
    read_only: bool = False
    max_transfer_blocks: int = 0  # 0: no limit reported
    max_unmap_blocks: int = 0
    max_write_same_blocks: int = 0
    unmap: bool = False
    write_same_unmap: bool = False

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    def facts(self, export: Export) -> ExportFacts:
        flags = TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA \
            | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO \
            | TransmissionFlag.SEND_CACHE | TransmissionFlag.CAN_MULTI_CONN
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        if self.unmap:
            flags |= TransmissionFlag.SEND_TRIM
        return ExportFacts(self.size, flags, minimum_block=self.block_size,
                           preferred_block=max(4096, self.block_size << self.physical_exponent),
                           maximum_payload=C.MAX_PAYLOAD, name=export.name,
                           description=export.description)


def sense_fields(sense: bytes | None) -> tuple[int, int]:
    """(sense key, ASC<<8|ASCQ) of fixed or descriptor sense data (SPC-4 4.5)."""
    if not sense or len(sense) < 4:
        return 0, 0
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0x0F, (sense[2] << 8) | sense[3]
    if len(sense) < 14:
        return sense[2] & 0x0F, 0
    return sense[2] & 0x0F, (sense[12] << 8) | sense[13]


def nbd_error(status: int, sense: bytes | None) -> tuple[Errno, str]:
    """The NBD error for a SCSI command's outcome ("Error values"; docs/nbd.md)."""
    if status == Status.RESERVATION_CONFLICT:
        return Errno.EPERM, "reservation conflict: another initiator holds the LUN"
    if status != Status.CHECK_CONDITION:
        return Errno.EIO, f"SCSI status {status:#04x}"
    key, asc = sense_fields(sense)
    text = f"sense key {key:#x}, ASC/ASCQ {asc:04x}"
    if key == SenseKey.DATA_PROTECT:
        if asc == Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT:
            return Errno.ENOSPC, "no space left for the LUN's blocks"
        return Errno.EPERM, "the LUN is write-protected"
    if key == SenseKey.ILLEGAL_REQUEST:
        if asc == Asc.LBA_OUT_OF_RANGE:
            return Errno.EINVAL, "beyond the end of the LUN"
        if asc == Asc.INVALID_COMMAND_OPERATION_CODE:
            return Errno.ENOTSUP, "the LUN does not support this command"
        if asc == Asc.LOGICAL_UNIT_NOT_SUPPORTED:
            return Errno.EIO, "the LUN no longer exists"
        return Errno.EINVAL, text
    return Errno.EIO, text


class NbdFabric:
    """Runs one NBD connection's options and requests against the device server."""

    def __init__(self, conn: NbdConnection, directory: ExportDirectory, client: str,
                 wire: Wire, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.directory = directory
        self.client = client  # the peer's address: the access rule and the nexus name
        self.wire = wire
        self.loop = loop
        self.isid = next(_isids).to_bytes(6, "big")
        self.nexuses: dict[str, Nexus] = {}
        self.touched: set[tuple[FrontEndUnit, Nexus]] = set()
        self.export: Export | None = None
        self.geometry: Geometry | None = None
        self.tags = itertools.count(1)
        self.inflight: dict[int, tuple[ScsiTask, FrontEndUnit]] = {}  # tag -> task
        # Data-In lent by the device server (views of the page cache, their blocks locked):
        # (conn.queued_bytes after the reply, release), in the order they were queued.
        self.lent: deque[tuple[int, Callable[[], None]]] = deque()
        self.background: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.done: asyncio.Future[None] = loop.create_future()

    # ---------------------------------------------------------------- events
    def process(self) -> None:
        events = self.conn.events
        while events:
            ev = events.popleft()
            if isinstance(ev, C.Request):
                if not self._fast(ev):
                    self._spawn(self._request(ev))
            elif isinstance(ev, C.ListExports):
                self.conn.reply_list([(e.name, e.description)
                                      for e in self.directory.visible(self.client)])
            elif isinstance(ev, C.ExportRequested):
                self._spawn(self._open(ev))
            elif isinstance(ev, C.MetaContextsRequested):
                self._meta_contexts(ev)
            elif isinstance(ev, C.StartTls):
                self.wire.upgrade_tls()
            elif isinstance(ev, C.Closed):
                log.debug("%s: %s", self.client, ev.reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ---------------------------------------------------------------- options
    async def _open(self, ev: C.ExportRequested) -> None:
        export = self.directory.lookup(ev.name, self.client)
        unit = export.unit() if export is not None else None
        if export is None or unit is None or not unit.exists:
            self._refuse(Rep.ERR_UNKNOWN, f"no export {ev.name!r} for this client")
            return
        try:
            geometry = await self._probe(export, unit)
        except CommandFailed as exc:
            self._refuse(Rep.ERR_UNKNOWN, f"export {export.name}: {exc.message}")
            return
        if self.closed:
            return
        if ev.option != Opt.INFO:
            self.export, self.geometry = export, geometry
            log.info("NBD client %s opened %s", self.client, export.name,
                     extra={"event": "nbd_open", "peer": self.client, "export": export.name})
        self.conn.reply_export(geometry.facts(export))
        self.wire.send()

    def _refuse(self, rep: Rep, message: str) -> None:
        if not self.closed:
            self.conn.refuse(rep, message)
            self.wire.send()

    def _meta_contexts(self, ev: C.MetaContextsRequested) -> None:
        export = self.directory.lookup(ev.export, self.client)
        if export is None:
            self.conn.refuse(Rep.ERR_UNKNOWN, f"no export {ev.export!r} for this client")
            return
        listing = ev.option == Opt.LIST_META_CONTEXT
        self.conn.reply_meta_contexts(
            match_contexts(export.context_names(), ev.queries, listing))

    async def _probe(self, export: Export, unit: FrontEndUnit) -> Geometry:
        """The unit's size, block size, provisioning, limits and write protection, asked as
        any initiator asks (SBC-3 5.16, 6.6; SPC-4 6.11)."""
        nexus = self._nexus(export)
        cap = await self._data_in(unit, nexus, _READ_CAPACITY_16, 32)
        last, block_size = struct.unpack_from(">QI", cap)
        geometry = Geometry(block_size, last + 1, physical_exponent=cap[13] & 0x0F,
                            thin=bool(cap[14] & 0x80), zeroes_when_deallocated=bool(cap[14] & 0x40))
        try:
            mode = await self._data_in(unit, nexus, _MODE_SENSE_6, 255)
            geometry.read_only = len(mode) > 2 and bool(mode[2] & 0x80)  # WP (SBC-3 6.5.1)
            b0 = await self._data_in(unit, nexus, _INQUIRY_B0, 255)
        except CommandFailed:
            return geometry  # a reservation may forbid them; the defaults stand
        if len(b0) >= 44:
            geometry.max_transfer_blocks = struct.unpack_from(">I", b0, 8)[0]
            geometry.max_unmap_blocks = struct.unpack_from(">I", b0, 20)[0]
            geometry.max_write_same_blocks = struct.unpack_from(">Q", b0, 36)[0]
        if geometry.thin:
            b2 = await self._data_in(unit, nexus, _INQUIRY_B2, 255)
            if len(b2) >= 6:
                geometry.unmap = bool(b2[5] & 0x80)  # LBPU
                geometry.write_same_unmap = bool(b2[5] & 0x40)  # LBPWS
        return geometry

    # ---------------------------------------------------------------- SCSI commands
    def _nexus(self, export: Export) -> Nexus:
        nexus = self.nexuses.get(export.target_name)
        if nexus is None:
            nexus = self.nexuses[export.target_name] = Nexus(
                f"nbd:{self.client}", self.isid, export.target_name, NBD_TPGT,
                NBD_RELATIVE_PORT)
        return nexus

    def _command(self, unit: FrontEndUnit, nexus: Nexus, cdb: bytes, expected_in: int = 0,
                 data: memoryview | None = None, lend: bool = False
                 ) -> asyncio.Future[ScsiTask]:
        """Submit one command; the future resolves to the ended task (unit attentions and
        aborts by another initiator retried)."""
        fut: asyncio.Future[ScsiTask] = self.loop.create_future()

        def finish(task: ScsiTask | None) -> None:
            if task is not None and not fut.done():
                fut.set_result(task)
            elif not fut.done():
                fut.cancel()

        self._submit(unit, nexus, cdb, expected_in, data, lend, finish)
        return fut

    def _submit(self, unit: FrontEndUnit, nexus: Nexus, cdb: bytes, expected_in: int,
                data: memoryview | None, lend: bool,
                finish: Callable[[ScsiTask | None], None], tries: int = 0) -> None:
        """Submit one command; `finish` gets the ended task (None once the connection is
        gone), maybe before this returns: most commands never wait."""
        self.touched.add((unit, nexus))
        tag = next(self.tags)
        task = ScsiTask(cdb, unit.lun, tag, nexus, TaskAttr.SIMPLE, expected_in,
                        len(data) if data is not None else 0, _Source(data))
        task.lend_data_in = lend
        self.inflight[tag] = (task, unit)

        def done(task: ScsiTask) -> None:
            self.inflight.pop(tag, None)
            if self.closed:
                _release(task)
                finish(None)
                return
            retry = task.aborted or task.status == Status.TASK_ABORTED or (
                task.status == Status.CHECK_CONDITION
                and sense_fields(task.sense)[0] == SenseKey.UNIT_ATTENTION)
            if retry and tries < MAX_RETRIES:
                _release(task)
                self._submit(unit, nexus, cdb, expected_in, data, lend, finish, tries + 1)
                return
            finish(task)

        unit.submit(task, done)

    async def _run(self, unit: FrontEndUnit, nexus: Nexus, cdb: bytes, expected_in: int = 0,
                   data: memoryview | None = None, lend: bool = False) -> ScsiTask:
        task = await self._command(unit, nexus, cdb, expected_in, data, lend)
        if task.status not in (Status.GOOD, Status.CONDITION_MET):
            _release(task)
            raise CommandFailed(*nbd_error(task.status, task.sense))
        return task

    async def _data_in(self, unit: FrontEndUnit, nexus: Nexus, cdb: bytes,
                       expected_in: int) -> bytes:
        task = await self._run(unit, nexus, cdb, expected_in)
        data = task.data_in
        if data is None:
            return b""
        return bytes(memoryview(data)[:task.data_in_len])  # type: ignore[arg-type]

    # ---------------------------------------------------------------- requests
    def _fast(self, req: C.Request) -> bool:
        """A READ or WRITE that one SCSI command answers: submitted at once and answered from
        its completion, with no asyncio Task (most finish before `submit` returns)."""
        export, g = self.export, self.geometry
        assert export is not None and g is not None
        if req.command == Cmd.READ:
            if self.conn.structured and g.thin and g.zeroes_when_deallocated \
                    and not req.flags & CmdFlag.DF and req.length >= HOLE_READ_MIN:
                return False  # looks for holes first
        elif req.command != Cmd.WRITE:
            return False
        bs = g.block_size
        first = req.offset // bs
        count = -(-(req.offset + req.length) // bs) - first
        if g.max_transfer_blocks and count > g.max_transfer_blocks:
            return False
        unit = export.unit()
        if unit is None or not unit.exists:
            return False
        fua = 0x08 if req.flags & CmdFlag.FUA else 0
        finish = partial(self._fast_done, req, first * bs)
        if req.command == Cmd.READ:
            self._submit(unit, self._nexus(export), _rw16(0x88, fua, first, count),
                         count * bs, None, True, finish)
        else:
            self._submit(unit, self._nexus(export), _rw16(0x8A, fua, first, count), 0,
                         req.data, False, finish)
        return True

    def _fast_done(self, req: C.Request, start: int, task: ScsiTask | None) -> None:
        if task is None:
            return
        conn = self.conn
        if task.status != Status.GOOD:
            _release(task)
            error, message = nbd_error(task.status, task.sense)
            conn.reply_error(req.handle, req.command, error, message)
        elif req.command == Cmd.WRITE:
            conn.reply_ok(req.handle, req.command)
        else:
            data = memoryview(task.data_in)  # type: ignore[arg-type]
            at = req.offset - start
            conn.reply_read(req.handle, [(req.offset, data[at:at + req.length])])
            release = task.on_data_sent
            if release is not None:
                task.on_data_sent = None
                self.lent.append((conn.queued_bytes, release))
        self.wire.send()

    async def _request(self, req: C.Request) -> None:
        export, geometry = self.export, self.geometry
        assert export is not None and geometry is not None
        unit = export.unit()
        try:
            if unit is None or not unit.exists:
                raise CommandFailed(Errno.ESHUTDOWN, "the export was removed")
            nexus = self._nexus(export)
            handler = _HANDLERS[req.command]
            await handler(self, unit, nexus, geometry, req)
        except CommandFailed as exc:
            if not self.closed:
                self.conn.reply_error(req.handle, req.command, exc.error, exc.message)
                self.wire.send()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("NBD %s: internal failure of %s", self.client, req)
            if not self.closed:
                self.conn.reply_error(req.handle, req.command, Errno.EIO, "internal failure")
                self.wire.send()

    def _ok(self, req: C.Request) -> None:
        if not self.closed:
            self.conn.reply_ok(req.handle, req.command)
            self.wire.send()

    async def _read(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                    req: C.Request) -> None:
        bs = g.block_size
        first = req.offset // bs
        end = -(-(req.offset + req.length) // bs)
        extents: list[tuple[int, int, bool]] = [(first, end - first, False)]
        if self.conn.structured and g.thin and g.zeroes_when_deallocated \
                and not req.flags & CmdFlag.DF and req.length >= HOLE_READ_MIN:
            extents = await self._allocation(unit, nexus, g, first, end - first)
        parts: list[tuple[int, memoryview | int]] = []
        releases: list[Callable[[], None]] = []
        fua = 0x08 if req.flags & CmdFlag.FUA else 0
        try:
            for lba, count, hole in extents:
                start = max(lba * bs, req.offset)
                stop = min((lba + count) * bs, req.offset + req.length)
                if hole:
                    parts.append((start, stop - start))
                    continue
                for chunk_lba, chunk_blocks in _split(lba, count, g.max_transfer_blocks):
                    cdb = _rw16(0x88, fua, chunk_lba, chunk_blocks)
                    task = await self._run(unit, nexus, cdb, chunk_blocks * bs, lend=True)
                    if task.on_data_sent is not None:
                        releases.append(task.on_data_sent)
                        task.on_data_sent = None
                    data = memoryview(task.data_in)  # type: ignore[arg-type]
                    lo = max(chunk_lba * bs, start)
                    hi = min((chunk_lba + chunk_blocks) * bs, stop)
                    parts.append((lo, data[lo - chunk_lba * bs:hi - chunk_lba * bs]))
        except BaseException:
            for release in releases:
                release()
            raise
        if self.closed:
            for release in releases:
                release()
            return
        self.conn.reply_read(req.handle, parts)
        for release in releases:
            self.lent.append((self.conn.queued_bytes, release))
        self.wire.send()

    async def _allocation(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry, lba: int,
                          count: int) -> list[tuple[int, int, bool]]:
        """[lba, lba+count) as (lba, blocks, deallocated) runs from GET LBA STATUS."""
        out: list[tuple[int, int, bool]] = []
        end = lba + count
        at = lba
        while at < end:
            runs = await self._lba_status(unit, nexus, g, at)
            before = at
            for run_lba, run_blocks, deallocated in runs:
                run_end = min(run_lba + run_blocks, end)
                if run_end <= at:
                    continue
                start = max(run_lba, at)
                if out and out[-1][2] == deallocated and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], run_end - out[-1][0], deallocated)
                else:
                    out.append((start, run_end - start, deallocated))
                at = run_end
                if at >= end:
                    break
            if at == before:
                break  # no progress: the rest is read as data
        if at < end:
            out.append((at, end - at, False))
        return out

    async def _lba_status(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                          lba: int) -> list[tuple[int, int, bool]]:
        """GET LBA STATUS (SBC-3 5.16) from the physical block holding `lba`: its
        descriptors as (lba, blocks, deallocated)."""
        aligned = lba - lba % (1 << g.physical_exponent)
        alloc = 8 + 16 * STATUS_DESCRIPTORS
        cdb = struct.pack(">BBQIBB", 0x9E, 0x12, aligned, alloc, 0, 0)
        data = await self._data_in(unit, nexus, cdb, alloc)
        if len(data) < 8:
            return []
        length = min(struct.unpack_from(">I", data)[0] + 4, len(data))
        runs = []
        for at in range(8, length - 15, 16):
            run_lba, blocks, status = struct.unpack_from(">QIB", data, at)
            if blocks:
                runs.append((run_lba, blocks, status == 1))
        return runs

    async def _write(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                     req: C.Request) -> None:
        assert req.data is not None
        bs = g.block_size
        fua = 0x08 if req.flags & CmdFlag.FUA else 0
        first = req.offset // bs
        for lba, blocks in _split(first, req.length // bs, g.max_transfer_blocks):
            at = (lba - first) * bs
            await self._run(unit, nexus, _rw16(0x8A, fua, lba, blocks),
                            data=req.data[at:at + blocks * bs])
        self._ok(req)

    async def _flush(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                     req: C.Request) -> None:
        await self._run(unit, nexus, bytes([0x91]) + bytes(15))  # SYNCHRONIZE CACHE(16)
        self._ok(req)

    async def _trim(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                    req: C.Request) -> None:
        bs = g.block_size
        first = -(-req.offset // bs)  # "MAY round offset up and length down"
        end = (req.offset + req.length) // bs
        limit = g.max_unmap_blocks or MAX_EXTENT
        for lba, blocks in _split(first, max(0, end - first), min(limit, MAX_EXTENT)):
            params = struct.pack(">HH4xQI4x", 22, 16, lba, blocks)
            cdb = struct.pack(">BB4xBH", 0x42, 0, 0, len(params)) + b"\0"
            await self._run(unit, nexus, cdb, data=memoryview(params))
        if req.flags & CmdFlag.FUA:
            await self._run(unit, nexus, bytes([0x91]) + bytes(15))
        self._ok(req)

    async def _write_zeroes(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                            req: C.Request) -> None:
        bs = g.block_size
        no_hole = bool(req.flags & CmdFlag.NO_HOLE)
        deallocates = g.thin and g.write_same_unmap and g.zeroes_when_deallocated
        if req.flags & CmdFlag.FAST_ZERO and (no_hole or not deallocates):
            # Fast only where zeroing is deallocation; else fail fast, changing nothing.
            raise CommandFailed(Errno.ENOTSUP, "zeroing here is no faster than writing")
        first, count = req.offset // bs, req.length // bs
        if no_hole and g.thin:
            # WRITE SAME of zeroes deallocates on a thin unit: write real zeroes instead.
            for lba, blocks in _split(first, count, g.max_transfer_blocks):
                await self._run(unit, nexus, _rw16(0x8A, 0, lba, blocks),
                                data=_zeroes(blocks * bs))
        else:
            flags = 0x01 | (0x08 if deallocates and not no_hole else 0)  # NDOB, UNMAP
            limit = g.max_write_same_blocks or MAX_EXTENT
            for lba, blocks in _split(first, count, min(limit, MAX_EXTENT)):
                await self._run(unit, nexus, _rw16(0x93, flags, lba, blocks))
        if req.flags & CmdFlag.FUA:
            await self._run(unit, nexus, bytes([0x91]) + bytes(15))
        self._ok(req)

    async def _cache(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                     req: C.Request) -> None:
        bs = g.block_size
        first = req.offset // bs
        end = -(-(req.offset + req.length) // bs)
        for lba, blocks in _split(first, end - first, g.max_transfer_blocks):
            await self._run(unit, nexus, _rw16(0x90, 0, lba, blocks))  # PRE-FETCH(16)
        self._ok(req)

    async def _block_status(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                            req: C.Request) -> None:
        export = self.export
        assert export is not None
        replies: list[tuple[int, list[tuple[int, int]]]] = []
        for context_id, name in self.conn.meta_contexts:
            if name == BASE_ALLOCATION:
                extents = await self._base_allocation(unit, nexus, g, req)
            else:
                source = export.contexts().get(name)
                if source is None:
                    raise CommandFailed(Errno.EIO, f"context {name} is gone")
                extents = await source.block_status(req.offset, req.length)
            if req.flags & CmdFlag.REQ_ONE:
                length, state = extents[0]
                extents = [(min(length, req.length), state)]
            replies.append((context_id, extents))
        if not self.closed:
            self.conn.reply_block_status(req.handle, replies)
            self.wire.send()

    async def _base_allocation(self, unit: FrontEndUnit, nexus: Nexus, g: Geometry,
                               req: C.Request) -> list[tuple[int, int]]:
        """`base:allocation` extents from `req.offset`: deallocated blocks are holes, and
        read as zeroes when the unit says so (LBPRZ)."""
        end = min(req.offset + req.length, g.size)
        if not g.thin:
            return [(end - req.offset, 0)]
        bs = g.block_size
        hole = State.HOLE | (State.ZERO if g.zeroes_when_deallocated else 0)
        runs = await self._lba_status(unit, nexus, g, req.offset // bs)
        extents: list[tuple[int, int]] = []
        at = req.offset
        for lba, blocks, deallocated in runs:
            stop = min((lba + blocks) * bs, g.size)
            if stop <= at:
                continue
            start = max(lba * bs, at)
            if start > at:
                break  # a gap: report what is known
            state = int(hole) if deallocated else 0
            length = min(stop - start, MAX_EXTENT - MAX_EXTENT % bs)
            if extents and extents[-1][1] == state and extents[-1][0] + length <= MAX_EXTENT:
                extents[-1] = (extents[-1][0] + length, state)
            else:
                extents.append((length, state))
            at = start + length
            if at >= end:
                break
        if not extents:
            extents = [(min(end - req.offset, MAX_EXTENT - MAX_EXTENT % bs), 0)]
        return extents

    # ---------------------------------------------------------------- lent data, teardown
    def release_lent(self, sent: float = float("inf")) -> None:
        """Release the blocks of lent Data-In whose reply ends within the first `sent` bytes
        of output (all of it when the connection ends)."""
        lent = self.lent
        while lent and lent[0][0] <= sent:
            lent.popleft()[1]()

    def connection_lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release_lent()
        self._spawn(self._cleanup())

    async def _cleanup(self) -> None:
        entries = list(self.inflight.values())
        if entries:
            await asyncio.gather(*(unit.abort_task(task.nexus, task.tag)
                                   for task, unit in entries), return_exceptions=True)
        for task in list(self.background):
            if task is not asyncio.current_task():
                task.cancel()
        for unit, nexus in self.touched:
            unit.nexus_lost(nexus)
        self.touched.clear()
        if not self.done.done():
            self.done.set_result(None)

    async def quiesce(self, timeout: float = 30.0) -> None:
        """Wait for the requests in flight to be answered (the rest are abandoned)."""
        pending = [t for t in self.background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)


_Handler = Callable[[NbdFabric, FrontEndUnit, Nexus, Geometry, C.Request],
                    Coroutine[Any, Any, None]]
_HANDLERS: dict[Cmd, _Handler] = {
    Cmd.READ: NbdFabric._read,
    Cmd.WRITE: NbdFabric._write,
    Cmd.FLUSH: NbdFabric._flush,
    Cmd.TRIM: NbdFabric._trim,
    Cmd.WRITE_ZEROES: NbdFabric._write_zeroes,
    Cmd.CACHE: NbdFabric._cache,
    Cmd.BLOCK_STATUS: NbdFabric._block_status,
}


class _Source:
    """Data-Out that is already here: a WRITE's payload, an UNMAP parameter list."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview | None) -> None:
        self.data = data

    def fetch_data_out(self, task: ScsiTask, length: int) -> asyncio.Future[memoryview]:
        fut: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
        data = self.data if self.data is not None else memoryview(b"")
        fut.set_result(data[:length])
        return fut


def _release(task: ScsiTask) -> None:
    release = task.on_data_sent
    if release is not None:
        task.on_data_sent = None
        release()


def _rw16(opcode: int, flags: int, lba: int, blocks: int) -> bytes:
    """A 16-byte block command: READ/WRITE/WRITE SAME/PRE-FETCH (SBC-3 5.x)."""
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, 0)


def _split(lba: int, count: int, limit: int) -> list[tuple[int, int]]:
    """[lba, lba+count) in pieces of at most `limit` blocks (0: no limit)."""
    if count <= 0:
        return []
    step = limit if limit > 0 else count
    return [(at, min(step, lba + count - at)) for at in range(lba, lba + count, step)]


_ZERO_BUFFER: list[memoryview] = []


def _zeroes(nbytes: int) -> memoryview:
    if not _ZERO_BUFFER or len(_ZERO_BUFFER[0]) < nbytes:
        _ZERO_BUFFER[:] = [memoryview(bytes(max(nbytes, 1 << 20)))]
    return _ZERO_BUFFER[0][:nbytes]
