"""The copy engine: resolves CSCD descriptors, checks every segment before any data moves, then
moves the data chunk by chunk through the device server (SPC-4 6.4.5, 6.4.6).

Data moves through `LogicalUnit.copy_blocks_from`, which applies the policy a READ of the source
and a WRITE of the destination would meet on the requesting initiator's behalf and picks the
backstore's fastest path; byte-offset segments that need read-modify-write issue internal READ
and WRITE sub-commands instead. Chunks of one segment are pipelined (the next chunk is read while
this one is written) except when source and destination overlap within one logical unit, which
is copied in the direction that gives memmove semantics. Cancellation (ABORT TASK, LUN RESET,
COPY OPERATION ABORT) stops a copy within the chunk in flight.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core import limits
from ..core import sense as S
from ..core.sense import Asc, SenseError, SenseKey, Status
from ..core.table import Opcode
from ..core.task import ScsiTask
from .descriptors import CSCD_ID_SELF, CopyList, Cscd, CscdType, Segment, SegmentType

if TYPE_CHECKING:
    from ..core.task import Nexus
    from .manager import CopyOperation, CopyService
    from .unit import LogicalUnit

_tags = itertools.count(1 << 31)
TEST_UNIT_READY = bytes((Opcode.TEST_UNIT_READY,)) + bytes(5)
# Paths that move no data through the target: while every chunk takes them, chunks grow (fewer
# lock rounds, and more objects per in-cluster copy for the storage to work on at once).
OFFLOADED = frozenset(("reflink", "hole", "copy_range"))


class CopyAborted(Exception):
    """COPY OPERATION ABORT asked this operation to stop."""


@dataclass(frozen=True)
class Side:
    lu: LogicalUnit
    cscd: Cscd | None  # None: the copy manager's own logical unit (ID FFFFh)


@dataclass(frozen=True)
class Plan:
    """One checked segment: byte ranges on resolved logical units."""

    segment: Segment
    src: Side
    dst: Side | None
    src_byte: int = 0
    dst_byte: int = 0
    nbytes: int = 0

    @property
    def dst_blocks(self) -> int:
        assert self.dst is not None
        return -(-self.nbytes // self.dst.lu.block_size)


class _Buffer:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data)

    async def fetch_data_out(self, task: ScsiTask, length: int) -> memoryview:
        return self.data[:length]


async def internal_command(lu: LogicalUnit, cdb: bytes, nexus: Nexus,
                           data_out: bytes | bytearray | memoryview = b"",
                           expected_in: int = 0) -> ScsiTask:
    """Run a sub-command through `lu`'s device server on `nexus`'s behalf (no unit attention
    reported or consumed); a failure comes back as a SenseError naming the status and sense."""
    task = ScsiTask(cdb, lu.lun, next(_tags), nexus, expected_in=expected_in,
                    expected_out=len(data_out), source=_Buffer(data_out))
    task.internal = True
    await lu.execute(task)
    if task.status not in (Status.GOOD, Status.CONDITION_MET):
        raise SubcommandFailed(task.status, task.sense)
    return task


class SubcommandFailed(Exception):
    """What a copy source or destination answered to a sub-command, for forwarded sense data
    (SPC-4 4.5.2.9): its status, its sense data, and which side it was
    (`sense.FORWARDED_FROM_SOURCE` or `FORWARDED_FROM_DESTINATION`, None until known)."""

    def __init__(self, status: int, sense: bytes | None, side: int | None = None) -> None:
        super().__init__(f"status {status:#x}")
        self.status = status
        self.sense = sense
        self.side = side

    def on(self, side: int) -> SubcommandFailed:
        """The same failure, attributed to `side`."""
        return SubcommandFailed(self.status, self.sense, side)

    @classmethod
    def refused(cls, exc: SenseError, side: int) -> SubcommandFailed:
        """A sub-command `side` refused before it ran (reservation, medium, protection)."""
        sense = exc.encode(True) if exc.status == Status.CHECK_CONDITION else None
        return cls(exc.status, sense, side)


class CopyJob:
    """The segments of one EXTENDED COPY parameter list, checked and then processed."""

    def __init__(self, service: CopyService, nexus: Nexus, plist: CopyList,
                 op: CopyOperation) -> None:
        self.service = service
        self.manager = service.manager
        self.lu = service.lu
        self.nexus = nexus
        self.plist = plist
        self.op = op
        self._resolved: dict[int, Side] = {}
        self.guard: Callable[[], None] | None = None  # run under the locks of every chunk

    # ------------------------------------------------------------------ checks
    def prepare(self) -> list[Plan]:
        """Resolve every CSCD a segment names and check every segment's ranges, so that a copy
        that cannot complete fails before it reads or writes anything."""
        return [self._plan(seg) for seg in self.plist.segments]

    def _side(self, seg: Segment, cscd_id: int, at: int) -> Side:
        if cscd_id == CSCD_ID_SELF:
            return Side(self.lu, None)
        if cscd_id >= len(self.plist.cscds):
            raise S.copy_target_not_reachable(seg.index, at)
        side = self._resolved.get(cscd_id)
        if side is not None:
            return side
        cscd = self.plist.cscds[cscd_id]
        lu = None if cscd.nul else self._resolve(cscd)
        if lu is None:
            raise S.copy_target_not_reachable(seg.index, cscd.at)
        if cscd.block_length and cscd.block_length != lu.block_size:
            size = 64 if cscd.type == CscdType.IPV6 else 32
            raise S.invalid_field_in_parameter_list(cscd.at + size - 3, 7)
        side = self._resolved[cscd_id] = Side(lu, cscd)
        return side

    def _resolve(self, cscd: Cscd) -> LogicalUnit | None:
        if cscd.type == CscdType.IDENTIFICATION:
            return self.manager.resolve_designator(self.nexus, cscd.designator_type,
                                                   cscd.designator)
        lu = self.manager.domain.portal_unit(self.nexus, cscd.address, cscd.port, cscd.lun)
        return lu if lu is not None and lu.exists else None

    def _plan(self, seg: Segment) -> Plan:
        src = self._side(seg, seg.src, seg.at + 4)
        if seg.type is SegmentType.VERIFY_CSCD:
            return Plan(seg, src, None)
        dst = self._side(seg, seg.dst, seg.at + 6)
        sbs, dbs = src.lu.block_size, dst.lu.block_size
        nbytes = seg.blocks * (dbs if seg.dc else sbs)
        if seg.src_offset >= sbs or seg.dst_offset >= dbs:
            raise S.invalid_field_in_parameter_list(
                seg.at + (28 if seg.src_offset >= sbs else 30), 7)
        if seg.type is SegmentType.BLOCK_TO_BLOCK and (nbytes % sbs or nbytes % dbs):
            raise S.copy_aborted(Asc.UNEXPECTED_INEXACT_SEGMENT, seg.index, pointer=seg.at)
        src_byte = seg.src_lba * sbs + seg.src_offset
        dst_byte = seg.dst_lba * dbs + seg.dst_offset
        for side, start, at in ((src, src_byte, seg.at + 12), (dst, dst_byte, seg.at + 20)):
            end_block = -(-(start + nbytes) // side.lu.block_size)
            if end_block > side.lu.nblocks or start // side.lu.block_size > side.lu.nblocks:
                raise S.copy_target_not_reachable(seg.index, at)
        return Plan(seg, src, dst, src_byte, dst_byte, nbytes)

    # ------------------------------------------------------------------ processing
    async def run(self, plans: list[Plan]) -> None:
        for plan in plans:
            if self.op.abort_requested:
                raise CopyAborted
            await self._segment(plan)
            self.op.segments_processed += 1

    async def _segment(self, plan: Plan) -> None:
        seg = plan.segment
        if seg.type is SegmentType.VERIFY_CSCD:
            if seg.test_unit_ready:
                try:
                    await internal_command(plan.src.lu, TEST_UNIT_READY, self.nexus)
                except SubcommandFailed as exc:
                    raise self._forward(seg, S.FORWARDED_FROM_SOURCE, exc.status, exc.sense,
                                        0) from None
            self.op.operations += 1
            return
        assert plan.dst is not None
        if not plan.nbytes:
            return
        src, dst = plan.src.lu, plan.dst.lu
        if plan.src_byte % src.block_size or plan.dst_byte % dst.block_size:
            await self._copy_unaligned(plan)
        else:
            await self._copy_blocks(plan)

    def _forward(self, seg: Segment, source: int, status: int, sense: bytes | None,
                 residual: int) -> SenseError:
        return S.copy_aborted(Asc.THIRD_PARTY_DEVICE_FAILURE, seg.index, residual=residual,
                              pointer=seg.at,
                              forwarded=S.forwarded_sense(source, status, sense))

    async def _copy_blocks(self, plan: Plan) -> None:
        """Whole blocks through `copy_blocks_from`, a window of chunks at a time."""
        assert plan.dst is not None
        src, dst = plan.src.lu, plan.dst.lu
        total = plan.nbytes
        unit = max(src.block_size, dst.block_size)
        overlap = src is dst and plan.src_byte < plan.dst_byte + total \
            and plan.dst_byte < plan.src_byte + total
        backward = overlap and plan.dst_byte > plan.src_byte
        depth = 1 if overlap else limits.COPY_PIPELINE_DEPTH
        chunk = limits.COPY_CHUNK_BYTES // unit * unit
        pending: deque[tuple[asyncio.Task[set[str]], int]] = deque()
        issued = done = 0
        try:
            while done < total:
                while issued < total and len(pending) < depth:
                    if self.op.abort_requested:
                        raise CopyAborted
                    n = min(chunk, total - issued)
                    if not backward:
                        n = min(self._to_boundary(plan.dst_byte + issued, chunk, unit), n)
                    off = total - issued - n if backward else issued
                    pending.append((asyncio.create_task(self._chunk(plan, off, n)), n))
                    issued += n
                runner, n = pending[0]
                await asyncio.wait([runner])
                pending.popleft()
                paths = runner.result()
                done += n
                self.op.bytes_transferred += n
                self.op.blocks_transferred += n // dst.block_size
                self.op.operations += 1
                if paths and paths <= OFFLOADED:
                    chunk = min(chunk * 4, limits.COPY_CHUNK_MAX_BYTES // unit * unit)
        except SubcommandFailed as exc:
            assert exc.side is not None
            raise self._forward(plan.segment, exc.side, exc.status, exc.sense,
                                self._residual(plan, total - done)) from None
        except SenseError as exc:
            if exc.key == SenseKey.COPY_ABORTED:
                raise
            raise self._failed(plan, exc, total - done) from None
        finally:
            for runner, _ in pending:
                runner.cancel()
            if pending:
                await asyncio.wait([r for r, _ in pending])

    @staticmethod
    def _to_boundary(dst_byte: int, chunk: int, unit: int) -> int:
        """Bytes from `dst_byte` to the next multiple of `chunk` in the destination (a chunk
        whole in both block sizes): chunks that start there cover whole units of a
        backstore's clone or in-storage copy (4 KiB, an RBD object), none split between two
        chunks."""
        n = chunk - dst_byte % chunk
        return n if n % unit == 0 else chunk

    async def _chunk(self, plan: Plan, off: int, n: int) -> set[str]:
        assert plan.dst is not None
        src, dst = plan.src.lu, plan.dst.lu
        await self.service.scheduler.acquire(self.op.priority)
        try:
            if self.manager.chunk_gate is not None:
                await self.manager.chunk_gate()
            for lu, opcode, side in ((src, Opcode.READ_16, S.FORWARDED_FROM_SOURCE),
                                     (dst, Opcode.WRITE_16, S.FORWARDED_FROM_DESTINATION)):
                try:
                    lu.admit_internal(self.nexus, opcode)
                except SenseError as exc:
                    raise SubcommandFailed.refused(exc, side) from None
            return await dst.copy_blocks_from(
                src, (plan.src_byte + off) // src.block_size,
                (plan.dst_byte + off) // dst.block_size, n // dst.block_size, self.nexus,
                guard=self.guard)
        finally:
            self.service.scheduler.release()

    @staticmethod
    def _residual(plan: Plan, residual_bytes: int) -> int:
        assert plan.dst is not None
        return -(-residual_bytes // plan.dst.lu.block_size)

    def _failed(self, plan: Plan, exc: SenseError, residual_bytes: int) -> SenseError:
        """A failure of the data mover itself: a read error is the source's, any other the
        destination's."""
        side = S.FORWARDED_FROM_SOURCE if exc.asc == Asc.UNRECOVERED_READ_ERROR \
            else S.FORWARDED_FROM_DESTINATION
        sense = exc.encode(True) if exc.status == Status.CHECK_CONDITION else None
        return self._forward(plan.segment, side, exc.status, sense,
                             self._residual(plan, residual_bytes))

    async def _copy_unaligned(self, plan: Plan) -> None:
        """Byte offsets (segment 0Ah): internal READs, read-modify-write of the destination's
        partial blocks, internal WRITEs, 1 MiB at a time."""
        assert plan.dst is not None
        src, dst = plan.src.lu, plan.dst.lu
        sbs, dbs = src.block_size, dst.block_size
        step = 1 << 20
        done = 0
        while done < plan.nbytes:
            if self.op.abort_requested:
                raise CopyAborted
            n = min(step, plan.nbytes - done)
            s0, d0 = plan.src_byte + done, plan.dst_byte + done
            try:
                first, last = s0 // sbs, -(-(s0 + n) // sbs)
                got = await self._io(src, _rw16(False, first, last - first), sbs * (last - first),
                                     side=S.FORWARDED_FROM_SOURCE)
                payload = got[s0 - first * sbs:s0 - first * sbs + n]
                dfirst, dlast = d0 // dbs, -(-(d0 + n) // dbs)
                span = bytearray((dlast - dfirst) * dbs)
                head, tail = d0 - dfirst * dbs, (dlast * dbs) - (d0 + n)
                if head or tail:
                    old = await self._io(dst, _rw16(False, dfirst, dlast - dfirst),
                                         len(span), side=S.FORWARDED_FROM_DESTINATION)
                    span[:] = old
                span[head:head + n] = payload
                await self._io(dst, _rw16(True, dfirst, dlast - dfirst), 0, data_out=span,
                               side=S.FORWARDED_FROM_DESTINATION)
            except SubcommandFailed as exc:
                assert exc.side is not None
                residual = -(-(plan.nbytes - done) // dbs)
                raise self._forward(plan.segment, exc.side, exc.status, exc.sense,
                                    residual) from None
            done += n
            self.op.bytes_transferred += n
            self.op.operations += 1

    async def _io(self, lu: LogicalUnit, cdb: bytes, expected_in: int, *, side: int,
                  data_out: bytes | bytearray = b"") -> bytes:
        try:
            task = await internal_command(lu, cdb, self.nexus, data_out, expected_in)
        except SubcommandFailed as exc:
            raise exc.on(side) from None
        if task.data_in is None:
            return b""
        return bytes(task.data_in[:task.data_in_len])


def _rw16(write: bool, lba: int, blocks: int) -> bytes:
    op = Opcode.WRITE_16 if write else Opcode.READ_16
    return bytes((op, 0)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)
