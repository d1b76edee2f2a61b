"""Block command handlers (SBC-3, SBC-4): READ, WRITE, VERIFY, WRITE AND VERIFY, SYNCHRONIZE
CACHE, PRE-FETCH, READ CAPACITY, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, READ DEFECT DATA,
WRITE ATOMIC(16).
"""

from __future__ import annotations

import struct
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from ..core import limits
from ..core import sense as S
from ..core.buffers import data_buffer
from ..core.buffers import view as buffer_view
from ..core.sense import Status

if TYPE_CHECKING:
    from ..core.table import Cdb, OpSpec
    from ..core.task import ScsiTask
    from .unit import Unit as LogicalUnit


def transfer(lu: LogicalUnit, cdb: Cdb) -> tuple[int, int]:
    """(LBA, blocks) of a READ/WRITE/VERIFY CDB, range- and limit-checked (SBC-3 4.5)."""
    lba, count = cdb.extent
    lu.check_range(lba, count)
    if count * lu.block_size > limits.MAX_TRANSFER_BYTES:
        raise S.invalid_field_in_cdb(cdb.offset_of("transfer_length"), 7)
    return lba, count


def _extent_now(lu: LogicalUnit, task: ScsiTask, spec: OpSpec) -> tuple[int, int, bool]:
    """(LBA, blocks, FUA) of a READ or WRITE for its `now` form; blocks 0 when the command is
    not the common case (no blocks, beyond the medium, longer than a transfer may be): the
    coroutine handler then runs and reports what is wrong."""
    raw = task.cdb
    extent = spec.extent
    assert extent is not None  # rows with a `now` handler have one (OpSpec)
    lba, count = extent.unpack_from(raw)
    if lba + count > lu.nblocks or count * lu.block_size > limits.MAX_TRANSFER_BYTES:
        count = 0
    return lba, count, bool(raw[spec.fua_byte] & spec.fua_bit)


def read_now(lu: LogicalUnit, task: ScsiTask, spec: OpSpec) -> bool:
    """`read` when nothing waits: the blocks unlocked and in the page cache, no FUA."""
    lba, count, fua = _extent_now(lu, task, spec)
    if not count or fua:
        return False
    nbytes = count * lu.block_size
    want = min(nbytes, task.expected_in)
    ranges = lu.ranges
    lock = ranges.try_acquire(lba, count, False)
    if lock is None:
        return False
    if task.lend_data_in and want == nbytes:
        try:
            view = lu.lend_blocks(lba, nbytes)
        except BaseException:
            ranges.release(lock)
            raise
        if view is not None:
            task.set_data_in(view)  # sent from the page cache, as in `read`
            task.on_data_sent = partial(ranges.release, lock)
            return True
    try:
        buf = data_buffer(want)
        if want and not lu.read_cached(buffer_view(buf), lba, task.prepare_data_in):
            return False
    finally:
        ranges.release(lock)
    task.set_data_in(buf, nbytes)
    return True


async def read(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    lba, count = transfer(lu, cdb)
    if not count:
        return
    fua = cdb.fua
    nbytes = count * lu.block_size
    # Only what the initiator will take is read; the rest is reported as an overflow residual.
    want = min(nbytes, task.expected_in)
    ranges = lu.ranges
    lock = ranges.try_acquire(lba, count, False) or await ranges.acquire(lba, count, False)
    lent = False
    try:
        if fua and lu.mode.write_cache:
            await lu.flush()  # FUA: the data comes from the medium, not a newer cached copy
        if task.lend_data_in and want == nbytes:
            view = lu.lend_blocks(lba, nbytes)
            if view is not None:
                # No copy: the fabric sends from the page cache, and the blocks stay locked
                # against writers until it has (no torn block next to a COMPARE AND WRITE).
                task.set_data_in(view)
                task.on_data_sent = partial(ranges.release, lock)
                lent = True
                return
        buf = data_buffer(want)
        if want:
            view = buffer_view(buf)
            if not lu.read_cached(view, lba, task.prepare_data_in):
                await lu.read_blocks(view, lba, task.prepare_data_in)
    finally:
        if not lent:
            ranges.release(lock)
    task.set_data_in(buf, nbytes)


async def receive_blocks(lu: LogicalUnit, task: ScsiTask, count: int) -> memoryview:
    """Data-Out for `count` blocks, or for the whole blocks the initiator will send.

    When the Expected Data Transfer Length is shorter than the CDB asks, only the blocks it
    covers are transferred and acted on (the residual reports the rest, RFC 7143 11.4.5.2);
    a length that ends inside a block cannot be acted on at all.
    """
    nbytes = count * lu.block_size
    data = await task.receive_data_out(nbytes)
    return _whole_blocks(lu, data, nbytes)


def _whole_blocks(lu: LogicalUnit, data: memoryview, nbytes: int) -> memoryview:
    if len(data) < nbytes and len(data) % lu.block_size:
        raise S.invalid_field_in_information_unit()
    return data


def write_now(lu: LogicalUnit, task: ScsiTask, spec: OpSpec) -> bool:
    """`write` when nothing waits: all of the data came with the command, the blocks are
    unlocked, and the write goes to the page cache on the event loop."""
    lba, count, fua = _extent_now(lu, task, spec)
    if not count or fua:
        return False
    nbytes = count * lu.block_size
    data = task.data_out_now(nbytes)
    if data is None or len(data) != nbytes:
        return False
    ranges = lu.ranges
    lock = ranges.try_acquire(lba, count, True)
    if lock is None:
        return False
    try:
        return lu.write_inline(data, lba, False)
    finally:
        ranges.release(lock)


async def write(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    lba, count = transfer(lu, cdb)
    if not count:
        return
    fua = cdb.fua
    nbytes = count * lu.block_size
    data = task.data_out_now(nbytes)
    if data is None:
        data = await receive_blocks(lu, task, count)
    else:
        data = _whole_blocks(lu, data, nbytes)
    if not data:
        return
    ranges = lu.ranges
    lock = ranges.try_acquire(lba, count, True) or await ranges.acquire(lba, count, True)
    try:
        if not lu.write_inline(data, lba, fua):
            await lu.write_blocks(data, lba, fua)
    finally:
        ranges.release(lock)


async def write_atomic_16(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """WRITE ATOMIC(16) (SBC-4 5.48): all of the blocks or none of them, against concurrent
    readers and writers (an exclusive range lock) and across a power loss (the backstore's
    atomic write). The LBA range is checked first, then the length and alignment the Block
    Limits VPD page advertises (SBC-4 4.29): exactly `lu.atomic_write_blocks` blocks at an LBA
    that is a multiple of it."""
    lba, count = cdb.lba, cdb.transfer_length
    lu.check_range(lba, count)
    if not count:
        return
    unit = lu.atomic_write_blocks
    if count != unit:
        raise S.invalid_field_in_cdb(cdb.offset_of("transfer_length"), 7)
    if lba % unit:
        raise S.invalid_field_in_cdb(cdb.offset_of("lba"), 7)
    fua = cdb.fua
    data = await receive_blocks(lu, task, count)
    if len(data) != count * lu.block_size:
        raise S.invalid_field_in_information_unit()  # a part of an atomic write is not one
    backstore = lu.backstore
    assert backstore is not None
    async with lu.ranges.exclusive(lba, count):
        try:
            await backstore.awrite_atomic(data, lba * lu.block_size)
            if fua or not lu.mode.write_cache:
                await backstore.aflush()
        except OSError as exc:
            raise lu.io_error(exc, lba, write=True) from exc


def first_difference(a: memoryview | bytes | bytearray,
                     b: memoryview | bytes | bytearray) -> int | None:
    """Offset of the first differing byte, or None when equal (numpy compare)."""
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if diff.size else None


async def _compare_with_medium(lu: LogicalUnit, lba: int, data: memoryview) -> None:
    current = bytearray(len(data))
    await lu.read_blocks(memoryview(current), lba)
    offset = first_difference(data, current)
    if offset is not None:
        raise S.miscompare(offset)


async def verify(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """VERIFY(10/12/16) (SBC-3 5.26): BYTCHK 00b checks the medium, 01b compares the Data-Out,
    11b compares one block of Data-Out with every block."""
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 0x02:
        raise S.invalid_field_in_cdb(1, 2)
    lba, count = transfer(lu, cdb)
    if not count:
        return
    if bytchk == 0:
        async with lu.ranges.shared(lba, count):
            await lu.read_blocks(memoryview(bytearray(count * lu.block_size)), lba)
        return
    if bytchk == 1:
        data = await receive_blocks(lu, task, count)
        count = len(data) // lu.block_size
    else:
        block = await receive_blocks(lu, task, 1)
        data = memoryview(bytes(block) * count)
    async with lu.ranges.shared(lba, count):
        await _compare_with_medium(lu, lba, data)


async def write_and_verify(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """WRITE AND VERIFY(10/12/16) (SBC-3 5.35): write, make durable, verify the medium."""
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk > 1:
        raise S.invalid_field_in_cdb(1, 2)
    lba, count = transfer(lu, cdb)
    if not count:
        return
    data = await receive_blocks(lu, task, count)
    if not data:
        return
    async with lu.ranges.exclusive(lba, count):
        await lu.write_blocks(data, lba, fua=True)
        await _compare_with_medium(lu, lba, data)


async def compare_and_write(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """COMPARE AND WRITE (SBC-3 5.2): atomic against every command that writes the range.

    The exclusive range lock is taken before the Data-Out is fetched, so a RESERVE or any
    other writer queued after this command waits for it to finish. On a miscompare nothing is
    written and INFORMATION holds the offset of the first differing byte.
    """
    lba = cdb.lba
    blocks = cdb.transfer_length
    nbytes = blocks * lu.block_size
    if task.expected_out != 2 * nbytes:
        # the Data-Out is the compare half then the write half, exactly (SBC-3 5.2)
        raise S.invalid_field_in_cdb(13, 7)
    if blocks == 0:
        return
    if blocks > lu.max_compare_and_write_blocks:
        raise S.invalid_field_in_cdb(13, 7)
    lu.check_range(lba, blocks)
    fua = cdb.fua
    if lu.medium_compare_and_write:
        await _compare_and_write_on_medium(lu, task, lba, nbytes, fua)
        return
    async with lu.ranges.exclusive(lba, blocks) as held:
        data = await task.receive_data_out(2 * nbytes)
        current = bytearray(nbytes)
        await lu.read_blocks(memoryview(current), lba)
        offset = first_difference(data[:nbytes], current)
        if offset is not None:
            lu.stats_miscompares += 1
            lu.ranges.unchanged(held)
            raise S.miscompare(offset)
        await lu.write_blocks(data[nbytes:], lba, fua)


async def _compare_and_write_on_medium(lu: LogicalUnit, task: ScsiTask, lba: int,
                                       nbytes: int, fua: bool) -> None:
    """COMPARE AND WRITE by the medium's own atomic compare-and-write, for a medium other
    gateways write too (RBD): the range lock still orders it against this process's commands,
    the medium makes it atomic against everyone else's. Lengths are within what the medium
    does atomically (`max_compare_and_write_blocks`)."""
    backstore = lu.backstore
    assert backstore is not None
    blocks = nbytes // lu.block_size
    async with lu.ranges.exclusive(lba, blocks) as held:
        data = await task.receive_data_out(2 * nbytes)
        try:
            offset = await backstore.acompare_and_write(data[:nbytes], data[nbytes:],
                                                        lba * lu.block_size)
            if offset is None and (fua or not lu.mode.write_cache):
                await backstore.aflush()
        except OSError as exc:
            raise lu.io_error(exc, lba, write=True) from exc
        if offset is not None:
            lu.stats_miscompares += 1
            lu.ranges.unchanged(held)
            raise S.miscompare(offset)


async def synchronize_cache(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    lba, count = cdb.lba, cdb.transfer_length
    lu.check_range(lba, count)
    await lu.flush()


async def pre_fetch(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """PRE-FETCH(10/16) (SBC-3 5.9): ask the page cache to read ahead; CONDITION MET when the
    blocks fit in the cache."""
    lba, count = cdb.lba, cdb.transfer_length
    lu.check_range(lba, count)
    assert lu.backstore is not None
    length = (count or lu.nblocks - lba) * lu.block_size
    lu.backstore.prefetch(lba * lu.block_size, length)
    if length <= limits.MAX_PREFETCH_BYTES:
        task.status = Status.CONDITION_MET


async def read_capacity_10(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    if not cdb[8] & 0x01 and cdb.lba:
        raise S.invalid_field_in_cdb(2, 7)  # LBA without PMI
    last = min(lu.nblocks - 1, 0xFFFFFFFF)
    task.set_data_in(struct.pack(">II", last, lu.block_size))


def physical_exponent(lu: LogicalUnit) -> int:
    """LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: 4 KiB physical blocks."""
    return max(0, (4096 // lu.block_size).bit_length() - 1)


async def read_capacity_16(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    alloc = cdb.allocation_length
    if not cdb[14] & 0x01 and cdb.lba:
        raise S.invalid_field_in_cdb(2, 7)
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, lu.nblocks - 1, lu.block_size)
    data[13] = physical_exponent(lu)
    if lu.thin:
        data[14] = 0x80 | (0x40 if lu.caps.deallocated_reads_zero else 0)  # LBPME, LBPRZ
    task.set_data_in(bytes(data[:alloc]))


async def start_stop_unit(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """START STOP UNIT (SBC-3 5.20).

    A file has no spindle: power conditions are accepted and change nothing, and START=0
    only writes the cache back (unless NO_FLUSH), leaving the unit ready. LOEJ ejects and
    loads the medium of a removable LUN, unless a nexus prevents removal.
    """
    if cdb[4] >> 4:
        return
    no_flush = bool(cdb[4] & 0x04)
    loej = bool(cdb[4] & 0x02)
    start = bool(cdb[4] & 0x01)
    if not start and not no_flush and lu.medium_present:
        await lu.flush()
    if loej and lu.removable:
        if lu.prevent:
            raise S.medium_removal_prevented()
        lu.medium_present = start


async def prevent_allow_medium_removal(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """PREVENT ALLOW MEDIUM REMOVAL (SBC-3 5.11): per I_T nexus, for removable media."""
    prevent = cdb[4] & 0x03
    if prevent > 1:
        raise S.invalid_field_in_cdb(4, 1)
    if prevent:
        lu.prevent.add(task.nexus.key)
    else:
        lu.prevent.discard(task.nexus.key)


async def orwrite(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """ORWRITE(16) (SBC-3 5.8): OR the Data-Out into the blocks, atomically."""
    lba, count = transfer(lu, cdb)
    if not count:
        return
    fua = cdb.fua
    data = await receive_blocks(lu, task, count)
    async with lu.ranges.exclusive(lba, count):
        current = bytearray(len(data))
        await lu.read_blocks(memoryview(current), lba)
        merged = np.bitwise_or(np.frombuffer(current, dtype=np.uint8),
                               np.frombuffer(data, dtype=np.uint8))
        await lu.write_blocks(memoryview(merged.tobytes()), lba, fua)


async def read_defect_data_10(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """READ DEFECT DATA(10) (SBC-3 5.18): a file has no defect list; report an empty one."""
    fmt = cdb[2] & 0x1F
    task.set_data_in(struct.pack(">BBH", 0, fmt, 0)[:cdb.allocation_length])


async def read_defect_data_12(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """READ DEFECT DATA(12) (SBC-3 5.19): an empty defect list."""
    fmt = cdb[1] & 0x1F
    task.set_data_in(struct.pack(">BBHI", 0, fmt, 0, 0)[:cdb.allocation_length])
