"""Logical block provisioning (SBC-3 4.7): UNMAP, WRITE SAME(10/16), GET LBA STATUS.

A thin LUN is a sparse file. Deallocation punches holes (`fallocate(PUNCH_HOLE|KEEP_SIZE)`):
whole 4 KiB granules go back to the filesystem and the filesystem zeroes the partial ones, so
every deallocated LBA reads back as zeros (LBPRZ=1). WRITE SAME with the UNMAP bit deallocates
(whatever the Data-Out block holds); a WRITE SAME of zeros deallocates on thin LUNs and zeroes
in place (`FALLOC_FL_ZERO_RANGE`) on thick ones; any other pattern is written.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from ..core import limits
from ..core import sense as S
from ..core.cdb import be16, be32, be64
from .sbc import physical_exponent

if TYPE_CHECKING:
    from ..core.table import Cdb
    from ..core.task import ScsiTask
    from .unit import Unit as LogicalUnit

MAPPED = 0
DEALLOCATED = 1
REPLICATE_CHUNK = 1 << 20


async def unmap(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """UNMAP (SBC-3 5.28): deallocate every range in the parameter list."""
    if cdb[1] & 0x01:
        raise S.invalid_field_in_cdb(1, 0)  # ANCHOR: anchored state is not supported
    length = cdb.parameter_list_length
    if length == 0:
        return
    if length < 8:
        raise S.parameter_list_length_error()
    if length > 8 + 16 * limits.MAX_UNMAP_DESCRIPTORS + 16:
        raise S.invalid_field_in_cdb(cdb.offset_of("parameter_list_length"), 7)
    data = await task.receive_data_out(length)
    if len(data) < length:
        raise S.parameter_list_length_error()
    descriptor_bytes = min(be16(data, 2), length - 8)
    count = descriptor_bytes // 16  # an incomplete last descriptor is ignored
    if count > limits.MAX_UNMAP_DESCRIPTORS:
        raise S.invalid_field_in_parameter_list(2, 7)
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(count):
        at = 8 + 16 * i
        lba = be64(data, at)
        blocks = be32(data, at + 8)
        lu.check_range(lba, blocks) if blocks else _check_lba(lu, lba)
        total += blocks
        if total > limits.MAX_UNMAP_BLOCKS:
            raise S.invalid_field_in_parameter_list(at + 8, 7)
        if blocks:
            ranges.append((lba, blocks))
    for lba, blocks in _coalesce(ranges):
        await deallocate(lu, lba, blocks)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges sorted, with adjacent and overlapping ones joined: one deallocation per run
    (a list of one descriptor per block costs one medium request, not one per block; on RBD
    each is a round trip to the cluster). The blocks deallocated are the same."""
    out: list[tuple[int, int]] = []
    for lba, blocks in sorted(ranges):
        if out and lba <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], lba + blocks - start))
        else:
            out.append((lba, blocks))
    return out


def _check_lba(lu: LogicalUnit, lba: int) -> None:
    """A zero-length descriptor may name any LBA up to the capacity (SBC-3 5.28)."""
    if lba > lu.nblocks:
        raise S.lba_out_of_range()


async def deallocate(lu: LogicalUnit, lba: int, blocks: int) -> None:
    assert lu.backstore is not None
    bs = lu.block_size
    async with lu.ranges.exclusive(lba, blocks):
        try:
            await lu.backstore.adeallocate(lba * bs, blocks * bs)
        except OSError as exc:
            raise lu.io_error(exc, lba, write=True) from exc


async def zero(lu: LogicalUnit, lba: int, blocks: int) -> None:
    """Zeros that stay allocated (thick LUNs)."""
    assert lu.backstore is not None
    bs = lu.block_size
    async with lu.ranges.exclusive(lba, blocks):
        try:
            await lu.backstore.azero(lba * bs, blocks * bs)
            if not lu.mode.write_cache:
                await lu.backstore.aflush()
        except OSError as exc:
            raise lu.io_error(exc, lba, write=True) from exc


async def write_same(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """WRITE SAME(10/16) (SBC-3 5.41, 5.42)."""
    anchor = bool(cdb[1] & 0x10)
    unmap_bit = bool(cdb[1] & 0x08)
    ndob = bool(cdb[1] & 0x01)  # WRITE SAME(16) only: a reserved bit of WRITE SAME(10)
    if anchor:
        raise S.invalid_field_in_cdb(1, 4)  # no anchored state (ANC_SUP=0)
    if unmap_bit and not lu.thin:
        raise S.invalid_field_in_cdb(1, 3)  # LBPWS=0 on fully provisioned LUNs
    bs = lu.block_size
    if task.expected_out != (0 if ndob else bs):
        # the Data-Out buffer is exactly one block (none with NDOB), whatever the residual
        raise S.invalid_field_in_information_unit()
    lba, blocks = cdb.lba, cdb.transfer_length
    if blocks == 0:  # WSNZ=0: through the last LBA
        if lba >= lu.nblocks:
            raise S.lba_out_of_range()
        blocks = lu.nblocks - lba
    lu.check_range(lba, blocks)
    if blocks > lu.max_write_same_blocks:
        raise S.invalid_field_in_cdb(cdb.offset_of("transfer_length"), 7)
    if ndob:
        pattern = memoryview(bytes(bs))
    else:
        pattern = await task.receive_data_out(bs)
    zeros_deallocate = lu.thin and lu.caps.deallocated_reads_zero
    if unmap_bit and zeros_deallocate:
        # SBC-3 4.7.3.4: the device server may unmap instead of writing; deallocated blocks
        # read back as zeros (LBPRZ=1), whatever the Data-Out block held.
        await deallocate(lu, lba, blocks)
        return
    if not np.frombuffer(pattern, dtype=np.uint8).any():
        if zeros_deallocate:
            await deallocate(lu, lba, blocks)
        else:
            await zero(lu, lba, blocks)
        return
    await replicate(lu, lba, blocks, bytes(pattern))


async def replicate(lu: LogicalUnit, lba: int, blocks: int, block: bytes) -> None:
    """Write `block` into each of `blocks` LBAs, a chunk at a time."""
    bs = lu.block_size
    per_chunk = max(1, REPLICATE_CHUNK // bs)
    chunk = np.tile(np.frombuffer(block, dtype=np.uint8), min(per_chunk, blocks)).tobytes()
    async with lu.ranges.exclusive(lba, blocks):
        done = 0
        while done < blocks:
            n = min(per_chunk, blocks - done)
            await lu.write_blocks(memoryview(chunk)[:n * bs], lba + done, fua=False, inline=False)
            done += n


async def get_lba_status(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """GET LBA STATUS (SBC-3 5.16) from SEEK_DATA/SEEK_HOLE on the backing file.

    Compatibility: a starting LBA inside a physical block is reported from the next physical
    block boundary, as libiscsi 1.19's GetLBAStatus.UnmapSingle requires of targets with
    LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT > 0 (docs/conformance.md).
    """
    lba = cdb.lba
    alloc = cdb.allocation_length
    if lba >= lu.nblocks:
        raise S.lba_out_of_range()
    assert lu.backstore is not None
    per_physical = 1 << physical_exponent(lu)
    if lba % per_physical:
        aligned = lba + per_physical - lba % per_physical
        if aligned < lu.nblocks:
            lba = aligned
    max_descriptors = max(1, (alloc - 8) // 16) if alloc >= 24 else 1
    bs = lu.block_size
    extents = await lu.backstore.aextents(lba * bs, (lu.nblocks - lba) * bs)
    descriptors = bytearray()
    for extent in extents:
        if len(descriptors) // 16 >= max_descriptors:
            break
        start = extent.offset // bs
        end = min(-(-(extent.offset + extent.length) // bs), lu.nblocks)
        status = MAPPED if extent.mapped or not lu.thin else DEALLOCATED
        if descriptors and descriptors[-4] == status:
            prev_lba, prev_count = struct.unpack_from(">QI", descriptors, len(descriptors) - 16)
            struct.pack_into(">QI", descriptors, len(descriptors) - 16, prev_lba,
                             end - prev_lba)
            continue
        descriptors += struct.pack(">QIB3x", start, end - start, status)
    data = struct.pack(">I4x", 4 + len(descriptors)) + descriptors
    task.set_data_in(data[:alloc])
