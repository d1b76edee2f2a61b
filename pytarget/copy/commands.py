"""Command handlers of the copy manager: EXTENDED COPY (LID1, LID4), POPULATE TOKEN, WRITE USING
TOKEN, COPY OPERATION ABORT (83h) and RECEIVE COPY RESULTS / RECEIVE ROD TOKEN INFORMATION /
REPORT ALL ROD TOKENS (84h). SPC-4 6.4, 6.18; SBC-3 5.10, 5.46.

Handlers take (lu, task, cdb) like every device-server handler and raise SenseError; `ROWS`
are the copy manager's rows of the opcode table, one per service action.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..core import limits
from ..core import sense as S
from ..core.cdb import be16, be32, be64
from ..core.policy import Flag, Pr
from ..core.sense import Asc, SenseError
from ..core.table import (
    CONTROL,
    GROUP,
    LEN4,
    Cdb,
    Field,
    Handler,
    Layout,
    Opcode,
    OpSpec,
    ThirdPartyCopyIn,
    ThirdPartyCopyOut,
    usage,
)
from . import descriptors, discovery
from .descriptors import ListIdUsage, Segment, SegmentType
from .engine import (
    CopyAborted,
    CopyJob,
    Plan,
    Side,
    SubcommandFailed,
    internal_command,
)
from .manager import CopyOperation, CopyService, CopyStatus
from .tokens import ROD_TYPE_AUR, ROD_TYPE_BLOCK_ZERO, TOKEN_LENGTH, RodToken

if TYPE_CHECKING:
    from ..core.task import ScsiTask
    from .unit import LogicalUnit

RANGE_DESCRIPTOR = 16
PT_HEADER = 16
WUT_HEADER = 536
WUT_TOKEN_AT = 16
UNITS_BYTES = 0x00
UNITS_BLOCKS = 0xF1


def _service(lu: LogicalUnit) -> CopyService:
    service = lu.copy_service
    if not isinstance(service, CopyService):
        raise S.invalid_opcode()
    return service


def _reply(task: ScsiTask, data: bytes | bytearray, alloc: int) -> None:
    task.set_data_in(bytes(data[:alloc]))


async def _parameter_list(task: ScsiTask, length: int) -> bytes:
    data = bytes(await task.receive_data_out(length))
    if len(data) < length:
        raise S.parameter_list_length_error()
    return data


async def _run(service: CopyService, op: CopyOperation, work: asyncio.Future[None] | None,
               coro_factory: Callable[[], Awaitable[None]]) -> None:
    """Run an operation's work as its own task, so COPY OPERATION ABORT can stop it; record the
    outcome; re-raise the failure for the command's status."""
    runner = asyncio.ensure_future(coro_factory())
    op.runner = runner
    try:
        try:
            await asyncio.wait([runner])
        except asyncio.CancelledError:
            runner.cancel()
            await asyncio.wait([runner])
            op.finish(None, aborted=True)
            raise
        if runner.cancelled() or isinstance(runner.exception(), CopyAborted):
            op.finish(S.task_aborted(), aborted=True)
            raise S.task_aborted()
        exc = runner.exception()
        if isinstance(exc, SenseError):
            op.finish(exc)
            raise exc
        if exc is not None:
            op.finish(S.internal_target_failure())
            raise exc
        op.finish(None)
    finally:
        op.runner = None
        service.end(op)


# ---------------------------------------------------------------------- EXTENDED COPY
async def extended_copy_lid1(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """EXTENDED COPY(LID1) (SPC-4 6.4.2)."""
    await _extended_copy(lu, task, cdb, ThirdPartyCopyOut.EXTENDED_COPY_LID1)


async def extended_copy_lid4(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """EXTENDED COPY(LID4) (SPC-4 6.4.3)."""
    await _extended_copy(lu, task, cdb, ThirdPartyCopyOut.EXTENDED_COPY_LID4)


async def _extended_copy(lu: LogicalUnit, task: ScsiTask, cdb: Cdb,
                         action: ThirdPartyCopyOut) -> None:
    service = _service(lu)
    lid4 = action == ThirdPartyCopyOut.EXTENDED_COPY_LID4
    length = cdb.parameter_list_length
    if length == 0:
        return  # no parameter list: nothing to do (SPC-4 6.4.1)
    header = descriptors.LID4_HEADER if lid4 else descriptors.LID1_HEADER
    if length > header + limits.MAX_DESCRIPTOR_LIST_BYTES + limits.MAX_INLINE_DATA_BYTES + 4096:
        raise S.invalid_field_in_cdb(cdb.offset_of("parameter_list_length"), 7)
    plist = descriptors.parse(await _parameter_list(task, length), lid4)
    op = service.begin(task.nexus, plist.list_id, action,
                       held=plist.usage is ListIdUsage.HOLD,
                       identified=plist.usage is not ListIdUsage.NONE, priority=plist.priority)
    job = CopyJob(service, task.nexus, plist, op)
    try:
        plans = job.prepare()
    except SenseError as exc:
        op.finish(exc)
        service.end(op)
        raise
    op.total_bytes = sum(plan.nbytes for plan in plans)
    if plist.immediate:
        op.status = CopyStatus.IN_PROGRESS_BACKGROUND
        background = asyncio.ensure_future(_run(service, op, None, lambda: job.run(plans)))
        background.add_done_callback(lambda f: f.cancelled() or f.exception())
        return
    await _run(service, op, None, lambda: job.run(plans))


async def copy_operation_abort(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """COPY OPERATION ABORT (SPC-4 6.3): stop the named copy of this I_T nexus."""
    op = _service(lu).find(task.nexus, cdb.list_identifier)
    if op is None:
        raise S.invalid_field_in_cdb(cdb.offset_of("list_identifier"), 7)
    if op.active:
        op.abort_requested = True
        if op.runner is not None:
            op.runner.cancel()


# ---------------------------------------------------------------------- RECEIVE COPY RESULTS
def _find(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> CopyOperation:
    """The operation the CDB's LIST IDENTIFIER names."""
    op = _service(lu).find(task.nexus, cdb.list_identifier)
    if op is None:
        raise S.invalid_field_in_cdb(cdb.offset_of("list_identifier"), 7)
    return op


def _transfer_count(nbytes: int, width_bits: int) -> tuple[int, int]:
    """(TRANSFER COUNT UNITS, TRANSFER COUNT) in the smallest binary unit that fits."""
    units = 0
    while nbytes >> (10 * units) >= 1 << width_bits:
        units += 1
    return units, nbytes >> (10 * units)


def _sense(lu: LogicalUnit, op: CopyOperation) -> bytes:
    if op.error is None or op.scsi_status != S.Status.CHECK_CONDITION:
        return b""
    return op.error.encode(lu.mode.d_sense)


def _lid4_status(lu: LogicalUnit, op: CopyOperation, tail: bytes = b"") -> bytes:
    sense = _sense(lu, op)
    if op.service_action in (ThirdPartyCopyOut.POPULATE_TOKEN,
                             ThirdPartyCopyOut.WRITE_USING_TOKEN):
        units, count = UNITS_BLOCKS, op.blocks_transferred
    else:
        units, count = UNITS_BYTES, op.bytes_transferred
    body = struct.pack(">BBHIBBBBQH6x", op.service_action, op.status,
                       min(op.operations, 0xFFFF), 0 if not op.active else 1000,
                       op.scsi_status, len(sense), len(sense), units, count,
                       min(op.segments_processed, 0xFFFF)) + sense + tail
    return struct.pack(">I", len(body)) + body


def _retrieved(lu: LogicalUnit, op: CopyOperation) -> None:
    if not op.active:
        _service(lu).discard(op)


async def receive_copy_status_lid1(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """COPY STATUS (SPC-4 6.18.2): LID1 status of a held or active copy."""
    op = _find(lu, task, cdb)
    state = {CopyStatus.COMPLETED: 0x01, CopyStatus.FAILED: 0x02,
             CopyStatus.ABORTED: 0x02}.get(op.status, 0x00)
    units, count = _transfer_count(op.bytes_transferred, 32)
    data = struct.pack(">IBHBI", 8, state, min(op.segments_processed, 0xFFFF), units, count)
    _reply(task, data, cdb.allocation_length)
    if op.status is not CopyStatus.FAILED:
        _retrieved(lu, op)


async def receive_copy_data(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """RECEIVE COPY DATA (LID1, LID4) (SPC-4 6.18.3, 6.18.6): no segment this copy manager
    supports holds data (HELD DATA LIMIT 0), so the list is always empty."""
    _find(lu, task, cdb)
    _reply(task, bytes(4), cdb.allocation_length)


async def receive_copy_operating_parameters(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    _service(lu)
    _reply(task, discovery.operating_parameters(lu), cdb.allocation_length)


async def receive_copy_failure_details(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """FAILURE DETAILS (SPC-4 6.18.5): the sense data of a finished LID1 copy."""
    op = _find(lu, task, cdb)
    if op.active:
        raise S.invalid_field_in_cdb(cdb.offset_of("list_identifier"), 7)
    sense = _sense(lu, op)
    failed = op.status in (CopyStatus.FAILED, CopyStatus.ABORTED)
    data = bytearray(60)
    if failed:
        struct.pack_into(">I", data, 0, 56 + len(sense))
        data[56] = 0x02 if op.scsi_status == S.Status.CHECK_CONDITION else op.scsi_status
        struct.pack_into(">H", data, 58, len(sense))
        data += sense
    _reply(task, data, cdb.allocation_length)
    _retrieved(lu, op)


async def receive_copy_status_lid4(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """RECEIVE COPY STATUS(LID4) (SPC-4 6.18.7)."""
    op = _find(lu, task, cdb)
    _reply(task, _lid4_status(lu, op), cdb.allocation_length)
    _retrieved(lu, op)


async def receive_rod_token_information(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """RECEIVE ROD TOKEN INFORMATION (SBC-3 5.22): status, and the token POPULATE TOKEN made."""
    op = _find(lu, task, cdb)
    tail = struct.pack(">I", 0)
    if op.token is not None:
        tail = struct.pack(">IH", 2 + len(op.token), 0) + op.token
    _reply(task, _lid4_status(lu, op, tail), cdb.allocation_length)
    _retrieved(lu, op)


async def report_all_rod_tokens(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """REPORT ALL ROD TOKENS (SPC-4 6.18.8): ROD management tokens, without the secret part."""
    tokens = _service(lu).manager.tokens.report(task.nexus)
    body = bytes(4) + b"".join(tokens)
    _reply(task, struct.pack(">I", len(body)) + body, cdb.allocation_length)


# ---------------------------------------------------------------------- ROD tokens
def _ranges(lu: LogicalUnit, data: bytes, at: int) -> list[tuple[int, int]]:
    """The block device range descriptors at `at`, their length in the two bytes before it
    (SBC-3 5.10.2): within the parameter list, on the medium, not overlapping."""
    length = be16(data, at - 2)
    if at + length > min(len(data), be16(data, 0) + 2):
        raise S.parameter_list_length_error()
    if length % RANGE_DESCRIPTOR or not length:
        raise S.invalid_field_in_parameter_list(at - 2, 7)
    if length // RANGE_DESCRIPTOR > limits.MAX_ROD_RANGES:
        raise S.parameter_list_error(Asc.TOO_MANY_SEGMENT_DESCRIPTORS, at - 2, 7)
    ranges: list[tuple[int, int]] = []
    for i in range(length // RANGE_DESCRIPTOR):
        lba, count = be64(data, at + 16 * i), be32(data, at + 16 * i + 8)
        lu.check_range(lba, count) if count else None
        if count:
            ranges.append((lba, count))
    ordered = sorted(ranges)
    for (a, n), (b, _) in zip(ordered, ordered[1:], strict=False):
        if a + n > b:
            raise S.invalid_field_in_parameter_list(at, 7)
    return ranges


async def _token_parameter_list(task: ScsiTask, cdb: Cdb,
                                 header: int) -> tuple[int, bytes, int] | None:
    """The parameter list of POPULATE TOKEN or WRITE USING TOKEN, its fixed header of
    `header` bytes checked: (list identifier, data, flags), or None for an empty list."""
    list_id, length = cdb.list_identifier, cdb.parameter_list_length
    if length == 0:
        return None
    if length > header + RANGE_DESCRIPTOR * limits.MAX_ROD_RANGES:
        raise S.invalid_field_in_cdb(cdb.offset_of("parameter_list_length"), 7)
    data = await _parameter_list(task, length)
    if length < header or be16(data, 0) + 2 > length or be16(data, 0) < header - 2:
        raise S.parameter_list_length_error()
    flags = data[2]
    if flags & ~0x03:
        raise S.invalid_field_in_parameter_list(2, 7)
    return list_id, data, flags


async def populate_token(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """POPULATE TOKEN (SBC-3 5.10): a ROD token representing the ranges' data as of now."""
    service = _service(lu)
    parsed = await _token_parameter_list(task, cdb, PT_HEADER)
    if parsed is None:
        return
    list_id, data, flags = parsed
    inactivity = be32(data, 4) or limits.DEFAULT_INACTIVITY_TIMEOUT
    if inactivity > limits.MAX_INACTIVITY_TIMEOUT:
        raise S.invalid_field_in_parameter_list(4, 7)
    if flags & 0x02 and be32(data, 8) != ROD_TYPE_AUR:
        raise S.invalid_field_in_parameter_list(8, 7)  # RTV: only access-upon-reference tokens
    ranges = _ranges(lu, data, PT_HEADER)
    if sum(n for _, n in ranges) * lu.block_size > limits.MAX_TOKEN_TRANSFER_BYTES:
        raise S.invalid_field_in_parameter_list(14, 7)
    op = service.begin(task.nexus, list_id, ThirdPartyCopyOut.POPULATE_TOKEN, held=True,
                       identified=True)
    try:
        token = await _snapshot(lu, task, ranges, inactivity)
    except BaseException as exc:
        op.finish(exc if isinstance(exc, SenseError) else S.internal_target_failure())
        service.end(op)
        raise
    op.token = token.raw
    op.blocks_transferred = token.nbytes // lu.block_size
    op.operations = len(ranges)
    op.finish(None)
    service.end(op)


async def _snapshot(lu: LogicalUnit, task: ScsiTask, ranges: list[tuple[int, int]],
                    inactivity: int) -> RodToken:
    """Register the token while holding shared locks on its ranges: writes already granted
    finish first, and any later write invalidates it."""
    manager = _service(lu).manager
    guards = [lu.ranges.shared(lba, n) for lba, n in sorted(ranges)]
    entered = []
    try:
        for guard in guards:
            await guard.__aenter__()
            entered.append(guard)
        token = manager.tokens.create(lu, task.nexus, ranges, inactivity)
        await manager.tokens.publish(token)
        return token
    finally:
        for guard in reversed(entered):
            await guard.__aexit__(None, None, None)


async def write_using_token(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """WRITE USING TOKEN (SBC-3 5.46): copy the token's data (or zeros) into the ranges."""
    service = _service(lu)
    parsed = await _token_parameter_list(task, cdb, WUT_HEADER)
    if parsed is None:
        return
    list_id, data, flags = parsed
    delete = bool(flags & 0x02)
    offset = be64(data, 8)
    raw = data[WUT_TOKEN_AT:WUT_TOKEN_AT + TOKEN_LENGTH]
    ranges = _ranges(lu, data, WUT_HEADER)
    zero = be32(raw, 0) == ROD_TYPE_BLOCK_ZERO
    tokens = service.manager.tokens
    token = None if zero else await tokens.lookup(raw, task.nexus, WUT_TOKEN_AT)
    total = sum(n for _, n in ranges) * lu.block_size
    if token is not None and offset * lu.block_size + total > token.nbytes:
        raise S.invalid_field_in_parameter_list(8, 7)  # past the end of the ROD
    op = service.begin(task.nexus, list_id, ThirdPartyCopyOut.WRITE_USING_TOKEN, held=True,
                       identified=True)
    op.total_bytes = total

    async def work() -> None:
        if token is None:
            await _write_zeros(lu, task, ranges, op)
            return
        await tokens.acquire(token)
        try:
            await _write_from_token(service, lu, task, token, offset, ranges, op)
        finally:
            await tokens.release(token)

    await _run(service, op, None, work)
    if token is not None and delete and op.status is CopyStatus.COMPLETED:
        await tokens.delete(token)


async def _write_zeros(lu: LogicalUnit, task: ScsiTask, ranges: list[tuple[int, int]],
                       op: CopyOperation) -> None:
    """The block device zero ROD token: WRITE SAME(16) sub-commands, which deallocate on a thin
    LU (UNMAP) and zero in place on a fully provisioned one."""
    step = max(1, lu.max_write_same_blocks)
    for index, (lba, count) in enumerate(ranges):
        done = 0
        while done < count:
            if op.abort_requested:
                raise CopyAborted
            n = min(step, count - done)
            # WRITE SAME(16) with UNMAP and NDOB on a thin LU, NDOB alone on a thick one
            sub = bytes((Opcode.WRITE_SAME_16, 0x09 if lu.thin else 0x01)) \
                + (lba + done).to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(2)
            try:
                await internal_command(lu, sub, task.nexus)
            except SubcommandFailed as exc:
                raise S.copy_aborted(Asc.THIRD_PARTY_DEVICE_FAILURE, index,
                                     residual=count - done,
                                     forwarded=S.forwarded_sense(
                                         S.FORWARDED_FROM_DESTINATION, exc.status,
                                         exc.sense)) from None
            done += n
            op.blocks_transferred += n
            op.operations += 1
            lu.stats_copy_bytes["zero"] = lu.stats_copy_bytes.get("zero", 0) + n * lu.block_size
        op.segments_processed += 1


async def _write_from_token(service: CopyService, lu: LogicalUnit, task: ScsiTask,
                            token: RodToken, offset: int, ranges: list[tuple[int, int]],
                            op: CopyOperation) -> None:
    """Walk the token's source ranges from `offset` alongside the destination ranges; each
    matching piece goes through the copy engine with the token checked under the locks."""
    src = token.lu
    sbs, dbs = src.block_size, lu.block_size
    source = _byte_runs([(a * sbs, n * sbs) for a, n in token.ranges], offset * dbs)
    tokens = service.manager.tokens
    job = CopyJob(service, task.nexus, descriptors.CopyList(True, op.list_id, ListIdUsage.HOLD,
                                                            0, False, (), ()), op)
    job.guard = lambda: tokens.check(token)
    for index, (lba, count) in enumerate(ranges):
        want = count * dbs
        at = lba * dbs
        while want:
            s_at, s_len = next(source)
            n = min(s_len, want)
            if s_len > n:
                source = _chain((s_at + n, s_len - n), source)
            seg = Segment(index, WUT_HEADER + RANGE_DESCRIPTOR * index,
                          SegmentType.BLOCK_TO_BLOCK, 0, 0)
            async with tokens.reading(token):
                await job._copy_blocks(Plan(seg, Side(src, None), Side(lu, None), s_at, at, n))
            at += n
            want -= n
        op.segments_processed += 1
    op.blocks_transferred = op.bytes_transferred // dbs


def _byte_runs(runs: list[tuple[int, int]], skip: int):  # type: ignore[no-untyped-def]
    for start, n in runs:
        if skip >= n:
            skip -= n
            continue
        yield start + skip, n - skip
        skip = 0


def _chain(first: tuple[int, int], rest):  # type: ignore[no-untyped-def]
    yield first
    yield from rest


# ---------------------------------------------------------------------- the opcode table's rows
# Third-party copy (SPC-4 6.3, 6.4, 6.18; SBC-3 5.10, 5.22, 5.46). Sub-commands apply the
# reservation policy on each copy source and destination; the copy manager's own unit only
# conflicts like the command's own effect (POPULATE TOKEN reads, WRITE USING TOKEN writes).
_M = Flag.MEDIUM | Flag.CONFLICTS_SPC2
_W = Flag.MEDIUM | Flag.WRITES | Flag.CONFLICTS_SPC2
_R2 = Flag.CONFLICTS_SPC2
_PLIST_10 = Field(10, 4)  # PARAMETER LIST LENGTH / ALLOCATION LENGTH at byte 10
_LID1 = Layout(list_identifier=Field(2, 1), allocation_length=_PLIST_10)
_LID4 = Layout(list_identifier=Field(2, 4), allocation_length=_PLIST_10)
_TOKEN = Layout(list_identifier=Field(6, 4), parameter_list_length=_PLIST_10)
OUT, IN = ThirdPartyCopyOut, ThirdPartyCopyIn
XC, RCR = Opcode.EXTENDED_COPY, Opcode.RECEIVE_COPY_RESULTS


def _out(sa: ThirdPartyCopyOut, name: str, cdb_usage: bytes, handler: Handler, flags: Flag,
         pr: Pr, layout: Layout) -> OpSpec:
    return OpSpec(XC, sa, name, cdb_usage, handler, flags, pr, layout=layout)


def _in(sa: ThirdPartyCopyIn, name: str, list_id: bytes, handler: Handler,
        layout: Layout) -> OpSpec:
    """A RECEIVE COPY RESULTS row: 16 bytes, LIST IDENTIFIER from byte 2, ALLOCATION LENGTH at
    byte 10."""
    cdb_usage = usage(RCR, sa, *list_id, (0,) * (8 - len(list_id)), LEN4, 0, CONTROL)
    return OpSpec(RCR, sa, name, cdb_usage, handler, _R2, Pr.READ, layout=layout)


_ID1 = bytes((0xFF,))
_ID4 = bytes(LEN4)
ROWS: tuple[OpSpec, ...] = (
    _out(OUT.EXTENDED_COPY_LID1, "EXTENDED COPY(LID1)",
         usage(XC, OUT.EXTENDED_COPY_LID1, (0,) * 8, LEN4, 0, CONTROL), extended_copy_lid1, _R2,
         Pr.ALLOWED, Layout(parameter_list_length=_PLIST_10)),
    _out(OUT.EXTENDED_COPY_LID4, "EXTENDED COPY(LID4)",
         usage(XC, OUT.EXTENDED_COPY_LID4, (0,) * 8, LEN4, 0, CONTROL), extended_copy_lid4, _R2,
         Pr.ALLOWED, Layout(parameter_list_length=_PLIST_10)),
    _out(OUT.POPULATE_TOKEN, "POPULATE TOKEN",
         usage(XC, OUT.POPULATE_TOKEN, (0,) * 4, LEN4, LEN4, GROUP, CONTROL), populate_token, _M,
         Pr.READ, _TOKEN),
    _out(OUT.WRITE_USING_TOKEN, "WRITE USING TOKEN",
         usage(XC, OUT.WRITE_USING_TOKEN, (0,) * 4, LEN4, LEN4, GROUP, CONTROL),
         write_using_token, _W, Pr.WRITE, _TOKEN),
    _out(OUT.COPY_OPERATION_ABORT, "COPY OPERATION ABORT",
         usage(XC, OUT.COPY_OPERATION_ABORT, LEN4, (0,) * 9, CONTROL), copy_operation_abort, _R2,
         Pr.ALLOWED, Layout(list_identifier=Field(2, 4))),
    _in(IN.COPY_STATUS_LID1, "RECEIVE COPY STATUS(LID1)", _ID1, receive_copy_status_lid1, _LID1),
    _in(IN.COPY_DATA_LID1, "RECEIVE COPY DATA(LID1)", _ID1, receive_copy_data, _LID1),
    _in(IN.OPERATING_PARAMETERS, "RECEIVE COPY OPERATING PARAMETERS", b"",
        receive_copy_operating_parameters, Layout(allocation_length=_PLIST_10)),
    _in(IN.FAILURE_DETAILS_LID1, "RECEIVE COPY FAILURE DETAILS(LID1)", _ID1,
        receive_copy_failure_details, _LID1),
    _in(IN.COPY_STATUS_LID4, "RECEIVE COPY STATUS(LID4)", _ID4, receive_copy_status_lid4, _LID4),
    _in(IN.COPY_DATA_LID4, "RECEIVE COPY DATA(LID4)", _ID4, receive_copy_data, _LID4),
    _in(IN.ROD_TOKEN_INFORMATION, "RECEIVE ROD TOKEN INFORMATION", _ID4,
        receive_rod_token_information, _LID4),
    _in(IN.REPORT_ALL_ROD_TOKENS, "REPORT ALL ROD TOKENS", b"", report_all_rod_tokens,
        Layout(allocation_length=_PLIST_10)),
)
