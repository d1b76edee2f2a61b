"""WRITE ATOMIC(16) (SBC-4 5.48) and the Block Limits atomic fields (SBC-4 6.6.4).

On a backstore with atomic writes (the memory backstore: 512 B to 64 KiB) the LUN offers one
atomic length, limits.ATOMIC_WRITE_BYTES (16 KiB = 32 blocks of 512 bytes), at LBAs that are
multiples of it; on one without (a file on the test machine's ext4 or tmpfs), the command does
not exist and the fields are zero. Expectations are written out from the standards."""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from pathlib import Path

from pytarget.backstore.base import Capabilities
from pytarget.core.sense import Status
from pytarget.scsi.device import atomic_write_blocks

from ..backstore.test_device_on_memory import memory_lu
from .harness import NEXUS_A, make_lu, run, run_async

UNIT = 32  # blocks


def write_atomic(lba: int, blocks: int, flags: int = 0, boundary: int = 0) -> bytes:
    return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, blocks, 0, 0)


def sense_fixed(key: int, asc: int, ascq: int, sks: bytes = bytes(3)) -> bytes:
    return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0)) + sks


def invalid_field(byte: int, bit: int) -> bytes:
    return sense_fixed(0x05, 0x24, 0x00, bytes((0xC8 | bit, 0, byte)))


def test_block_limits_atomic_fields() -> None:
    lu = memory_lu()
    page = run(lu, bytes((0x12, 0x01, 0xB0, 0, 64, 0))).data
    assert page[:4] == bytes((0, 0xB0, 0, 0x3C))
    assert page[44:64] == bytes((0, 0, 0, 32,  # MAXIMUM ATOMIC TRANSFER LENGTH
                                 0, 0, 0, 32,  # ATOMIC ALIGNMENT
                                 0, 0, 0, 32,  # ATOMIC TRANSFER LENGTH GRANULARITY
                                 0, 0, 0, 0,  # MAXIMUM ATOMIC TRANSFER LENGTH WITH BOUNDARY
                                 0, 0, 0, 0))  # MAXIMUM ATOMIC BOUNDARY SIZE


def test_report_supported_operation_codes_usage_data() -> None:
    lu = memory_lu()
    data = run(lu, bytes((0xA3, 0x0C, 0x01, 0x9C, 0, 0, 0, 0, 2, 0, 0, 0))).data
    # WRPROTECT unsupported, DPO FUA; LBA; ATOMIC BOUNDARY not honoured; TRANSFER LENGTH; GROUP
    assert data == bytes((0, 0x03, 0, 16, 0x9C, 0x18, *[0xFF] * 8, 0, 0, 0xFF, 0xFF, 0x1F, 0))


def test_an_atomic_write_lands_whole() -> None:
    lu = memory_lu()
    data = bytes(range(256)) * (UNIT * 2)
    assert run(lu, write_atomic(UNIT * 3, UNIT, flags=0x08), data).ok()  # FUA
    assert run(lu, struct.pack(">BBQIBB", 0x88, 0, UNIT * 3, UNIT, 0, 0)).data == data
    assert run(lu, write_atomic(lu.nblocks - UNIT, UNIT), data).ok()


def test_lengths_and_alignment_outside_the_advertised_ones() -> None:
    lu = memory_lu()
    data = bytes(UNIT * 512 * 2)
    assert run(lu, write_atomic(0, UNIT // 2), data[:UNIT * 256]).sense == invalid_field(12, 7)
    assert run(lu, write_atomic(0, UNIT * 2), data).sense == invalid_field(12, 7)
    assert run(lu, write_atomic(UNIT // 2, UNIT), data[:UNIT * 512]).sense == invalid_field(2, 7)
    # ATOMIC BOUNDARY: MAXIMUM ATOMIC BOUNDARY SIZE is 0, the field is not honoured
    assert run(lu, write_atomic(0, UNIT, boundary=UNIT), data[:UNIT * 512]).sense == \
        invalid_field(11, 5)  # the lowest byte of the field holds 32
    assert run(lu, write_atomic(0, UNIT, flags=0x20), data[:UNIT * 512]).sense == \
        invalid_field(1, 7)  # WRPROTECT: no protection information


def test_lba_out_of_range_comes_first() -> None:
    lu = memory_lu()
    lba_oob = sense_fixed(0x05, 0x21, 0x00)
    for lba, blocks in ((lu.nblocks - UNIT, 2 * UNIT), (1 << 63, UNIT), ((1 << 64) - UNIT, UNIT),
                        (lu.nblocks + UNIT, 0), (lu.nblocks - 1, 7)):
        assert run(lu, write_atomic(lba, blocks), bytes(blocks * 512)).sense == lba_oob
    assert run(lu, write_atomic(0, 0)).ok()


def test_a_short_data_out_writes_nothing() -> None:
    lu = memory_lu()
    result = run(lu, write_atomic(0, UNIT), bytes(UNIT * 256))
    assert result.sense == sense_fixed(0x05, 0x0E, 0x03)
    assert run(lu, struct.pack(">BBQIBB", 0x88, 0, 0, UNIT, 0, 0)).data == bytes(UNIT * 512)


def test_concurrent_readers_see_all_or_nothing() -> None:
    lu = memory_lu()
    old, new = b"\x01" * UNIT * 512, b"\x02" * UNIT * 512

    async def go() -> list[bytes]:
        lu.ua.setdefault(NEXUS_A.key, deque()).clear()
        assert (await run_async(lu, write_atomic(0, UNIT), old)).ok()
        reads = [run_async(lu, struct.pack(">BBQIBB", 0x88, 0, 0, UNIT, 0, 0))
                 for _ in range(8)]
        writes = [run_async(lu, write_atomic(0, UNIT), new if i % 2 else old) for i in range(8)]
        results = await asyncio.gather(*[x for pair in zip(reads, writes, strict=True)
                                         for x in pair])
        return [r.data for r in results[0::2]]
    for data in asyncio.run(go()):
        assert data in (old, new)


def test_no_atomic_writes_no_command_and_zero_fields(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)  # the test directory's filesystem: no RWF_ATOMIC unless XFS and 6.11
    if lu.caps.atomic_write_unit_max:
        return  # covered by tests/e2e/test_xfs_atomic.py
    result = run(lu, write_atomic(0, 8), bytes(4096))
    assert result.status == Status.CHECK_CONDITION
    assert result.sense == sense_fixed(0x05, 0x20, 0x00, bytes((0xC0, 0, 0)))
    page = run(lu, bytes((0x12, 0x01, 0xB0, 0, 64, 0))).data
    assert page[44:64] == bytes(20)


def test_the_atomic_length_is_clamped_into_the_backstores_units() -> None:
    def caps(lo: int, hi: int) -> Capabilities:
        return Capabilities(atomic_write_unit_min=lo, atomic_write_unit_max=hi)
    assert atomic_write_blocks(caps(4096, 1 << 20), 512) == 32
    assert atomic_write_blocks(caps(4096, 1 << 20), 4096) == 4
    assert atomic_write_blocks(caps(4096, 8192), 512) == 16  # the backstore's maximum
    assert atomic_write_blocks(caps(65536, 1 << 20), 512) == 128  # its minimum
    assert atomic_write_blocks(caps(512, 2048), 4096) == 0  # less than a block
    assert atomic_write_blocks(Capabilities(), 512) == 0
