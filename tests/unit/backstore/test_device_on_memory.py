"""The device server on a backstore that is not a file: it needs nothing but the interface.

The scenarios of the SBC, COMPARE AND WRITE and provisioning tests run here unchanged on a
logical unit whose backstore lives in memory, has no fast path and completes its I/O from
event-loop callbacks (no I/O thread); then what the capabilities change (VPD B0h/B2h, READ
CAPACITY, WRITE SAME) and copies between kinds.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytarget.backstore import threads
from pytarget.scsi.device import LogicalUnit, LuConfig

from ..copy import test_engine
from ..copy.helpers import NEXUS_A, Rig, b2b, e4, lid1, xcopy_cdb
from ..scsi import test_block_io, test_compare_and_write, test_provisioning
from ..scsi.harness import Directory, make_task, run
from .memory import MemoryBackstore

BLOCKS = 262144  # 128 MiB of 512-byte blocks, as the provisioning tests use


def memory_lu(blocks: int = BLOCKS, block_size: int = 512, granule: int = 4096,
              reads_zero: bool = True, **config: Any) -> LogicalUnit:
    directory = Directory()
    store = MemoryBackstore(blocks * block_size, granule=granule, reads_zero=reads_zero)
    lu = LogicalUnit(LuConfig(lun=0, block_size=block_size, serial="MEM00001",
                              naa=bytes.fromhex("3000000000000042"), **config),
                     store, directory)
    directory.luns[0] = lu
    return lu


def _no_io_threads(*_args: object) -> None:
    raise AssertionError("an I/O thread was used")


@pytest.fixture
def lu(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogicalUnit]:
    """A memory LU; reads, writes, flushes and provisioning must not reach the I/O threads."""
    monkeypatch.setattr(threads, "io_executor", _no_io_threads)
    unit = memory_lu()
    yield unit
    unit.close()


# -- existing scenarios, unchanged, on the memory backstore
test_read6_zero_means_256_blocks = test_block_io.test_read6_zero_means_256_blocks
test_range_checks = test_block_io.test_range_checks
test_fua_write_is_flushed = test_block_io.test_fua_write_is_flushed
test_short_data_out = test_block_io.test_short_data_out_writes_only_whole_blocks_received
test_verify_bytchk = test_block_io.test_verify_bytchk
test_write_and_verify = test_block_io.test_write_and_verify
test_orwrite = test_block_io.test_orwrite
test_synchronize_cache_and_prefetch = test_block_io.test_synchronize_cache_and_prefetch
test_io_error_becomes_medium_error = test_block_io.test_io_error_becomes_medium_error
test_unexpected_exception = test_block_io.test_unexpected_exception_is_internal_target_failure
test_caw_match_and_miscompare = test_compare_and_write.test_match_writes_and_miscompare_does_not
test_caw_first_difference = test_compare_and_write.test_first_difference_offset
test_caw_length_rules = test_compare_and_write.test_length_rules
test_caw_fua_flushes = test_compare_and_write.test_fua_flushes
test_caw_counter = \
    test_compare_and_write.test_counter_increments_are_atomic_with_concurrent_writers
test_caw_reserve_waits = \
    test_compare_and_write.test_reserve_waits_for_a_pending_compare_and_write
test_unmap_partial_granules = test_provisioning.test_unmap_partial_granules_read_zero
test_unmap_parameter_list_errors = test_provisioning.test_unmap_parameter_list_errors
test_write_same_unmap_ndob = test_provisioning.test_write_same_unmap_ndob_and_limits
test_get_lba_status = test_provisioning.test_get_lba_status


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def inquiry_page(lu: LogicalUnit, page: int) -> bytes:
    return run(lu, bytes((0x12, 0x01, page, 0, 255, 0))).data


def read_capacity_16(lu: LogicalUnit) -> bytes:
    return run(lu, bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + b"\0\0").data


# -- what the memory backstore's capabilities change

def test_no_fast_path_means_no_lent_view(lu: LogicalUnit) -> None:
    assert run(lu, rw16(0x8A, 0, 128), b"\x5a" * 65536).ok()
    task = make_task(lu, rw16(0x88, 0, 128))
    task.lend_data_in = True

    async def go() -> None:
        await lu.start(task)
    asyncio.run(go())
    assert task.on_data_sent is None and bytes(task.data_in[:65536]) == b"\x5a" * 65536
    assert isinstance(lu.backstore, MemoryBackstore) and lu.backstore.pending == 0


def test_block_limits_and_provisioning_from_the_capabilities(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    lu = memory_lu(granule=65536)
    b0 = inquiry_page(lu, 0xB0)
    assert struct.unpack_from(">I", b0, 28)[0] == 128  # UNMAP GRANULARITY: 64 KiB in blocks
    assert struct.unpack_from(">I", b0, 32)[0] == 0x80000000  # UGAVALID, aligned at LBA 0
    assert inquiry_page(lu, 0xB2)[5] & 0x04  # LBPRZ
    assert read_capacity_16(lu)[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    lu.caps.deallocate_alignment = 8 * 512
    assert struct.unpack_from(">I", inquiry_page(lu, 0xB0), 32)[0] == 0x80000008


def test_deallocated_blocks_that_do_not_read_zero() -> None:
    lu = memory_lu(reads_zero=False)
    assert inquiry_page(lu, 0xB2)[5] & 0x04 == 0  # no LBPRZ
    assert read_capacity_16(lu)[14] & 0xC0 == 0x80  # LBPME only
    pattern = b"\x77" * 512
    assert run(lu, rw16(0x8A, 0, 64), pattern * 64).ok()
    assert run(lu, rw16(0x93, 0, 64), bytes(512)).ok()  # WRITE SAME of zeros: zeroed in place
    assert run(lu, rw16(0x88, 0, 64)).data == bytes(512 * 64)
    assert run(lu, rw16(0x93, 0, 64, 0x08), pattern).ok()  # UNMAP bit: the pattern is written
    assert run(lu, rw16(0x88, 0, 64)).data == pattern * 64


def test_a_backstore_that_cannot_deallocate_makes_a_thick_lu() -> None:
    directory = Directory()
    store = MemoryBackstore(BLOCKS * 512)
    store.caps.thin = False
    lu = LogicalUnit(LuConfig(lun=0, thin=True), store, directory)
    assert not lu.thin and 0xB2 not in inquiry_page(lu, 0x00)[4:]
    assert read_capacity_16(lu)[14] & 0xC0 == 0


# -- copies: the clone offer between two memory LUs, buffered across kinds

@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_xcopy_between_memory_lus_uses_their_clone_offer(rig: Rig) -> None:
    src = rig.unit(0, backstore=MemoryBackstore(8192 * 512))
    dst = rig.unit(1, backstore=MemoryBackstore(8192 * 512))
    data = test_engine.pattern(256)
    test_engine.fill(src, 1024, data)
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 4096, 0, 0)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert test_engine.read(dst, 1024, 256) == data
    assert dst.stats_copy_paths.keys() == {"hole", "reflink"}
    assert dst.backstore is not None and dst.backstore.allocated_bytes() == 256 * 512


@pytest.mark.parametrize("direction", ["file to memory", "memory to file"])
def test_xcopy_across_kinds_reads_and_writes(rig: Rig, direction: str) -> None:
    memory = rig.unit(0, backstore=MemoryBackstore(8192 * 512))
    file = rig.unit(1)
    src, dst = (file, memory) if direction == "file to memory" else (memory, file)
    data = test_engine.pattern(256, seed=3)
    test_engine.fill(src, 2048, data)
    test_engine.fill(src, 3000, bytes(64 * 512))  # allocated zeros become a hole
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 8192, 0, 0)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert test_engine.read(dst, 2048, 256) == data
    assert test_engine.read(dst, 3000, 64) == bytes(64 * 512)
    assert "buffered" in dst.stats_copy_paths and "reflink" not in dst.stats_copy_paths
