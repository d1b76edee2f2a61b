"""The copy engine: data moved right, holes kept, overlapping copies, cancellation within one
chunk, reservations and access control applied to every sub-command."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from pathlib import Path

import pytest

from pytarget.core import limits
from pytarget.core.sense import Asc, SenseKey, Status
from pytarget.core.task import ScsiTask
from pytarget.iscsi.node import AclEntry

from ..scsi.harness import MemorySource, Result, run, run_async
from .helpers import (
    INIT_B,
    NEXUS_A,
    NEXUS_B,
    Rig,
    b2b,
    b2b_offset,
    e4,
    lid1,
    lid4,
    rcr_cdb,
    verify,
    xcopy_cdb,
)

MiB = 1 << 20


def read(lu, lba: int, blocks: int) -> bytes:  # type: ignore[no-untyped-def]
    buf = bytearray(blocks * lu.block_size)
    lu.backstore.read_into(memoryview(buf), lba * lu.block_size)
    return bytes(buf)


def fill(lu, lba: int, data: bytes) -> None:  # type: ignore[no-untyped-def]
    lu.backstore.write(memoryview(data), lba * lu.block_size)


def pattern(blocks: int, seed: int = 1, bs: int = 512) -> bytes:
    return random.Random(seed).randbytes(blocks * bs)


def quiet(lu) -> None:  # type: ignore[no-untyped-def]
    """No pending unit attention for the test nexuses."""
    for nexus in (NEXUS_A, NEXUS_B):
        lu.ua[nexus.key] = deque()


def segments(src: int, dst: int, total: int, src_lba: int = 0, dst_lba: int = 0,
             per: int = 65528) -> list[bytes]:
    out = []
    done = 0
    while done < total:
        n = min(per, total - done)
        out.append(b2b(src, dst, n, src_lba + done, dst_lba + done))
        done += n
    return out


def test_copy_between_units_and_within_one(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    data = pattern(64)
    fill(src, 100, data)
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 64, 100, 7), b2b(0, 0, 64, 100, 4000)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert read(dst, 7, 64) == data
    assert read(src, 4000, 64) == data


def test_own_unit_by_id_ffff_and_verify_segment(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    fill(src, 0, pattern(8))
    params = lid1([e4(dst)], [verify(0), b2b(0xFFFF, 0, 8, 0, 0)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert read(dst, 0, 8) == pattern(8)


def test_verify_segment_reports_a_not_ready_unit(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    dst.medium_present = False
    params = lid1([e4(dst)], [verify(0)])
    r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
    assert (r.key, r.asc) == (SenseKey.COPY_ABORTED, Asc.THIRD_PARTY_DEVICE_FAILURE)


def test_byte_offset_segment_keeps_the_rest_of_the_blocks(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    fill(src, 0, pattern(4))
    fill(dst, 0, b"\xEE" * 2048)
    params = lid1([e4(src), e4(dst)], [b2b_offset(0, 1, 2, 0, 0, 10, 100)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    got = read(dst, 0, 4)
    assert got[:100] == b"\xEE" * 100
    assert got[100:1124] == pattern(4)[10:1034]
    assert got[1124:] == b"\xEE" * (2048 - 1124)


def test_block_size_conversion(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1, blocks=1024, block_size=4096)
    fill(src, 0, pattern(64))
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 8, 0, 2, dc=True)])  # 8 destination blocks
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert read(dst, 2, 8) == pattern(64)
    inexact = lid1([e4(src), e4(dst)], [b2b(0, 1, 3, 0, 2)])  # 3 source blocks
    r = run(src, xcopy_cdb(len(inexact)), inexact, NEXUS_A)
    assert (r.key, r.asc) == (SenseKey.COPY_ABORTED, Asc.UNEXPECTED_INEXACT_SEGMENT)


def test_sparse_source_stays_sparse(tmp_path: Path) -> None:
    """1 GiB thin LU holding 100 MiB: the copy allocates about 100 MiB, not 1 GiB."""
    rig = Rig(tmp_path)
    blocks = (1 << 30) // 512
    src, dst = rig.unit(0, blocks=blocks), rig.unit(1, blocks=blocks)
    chunk = os.urandom(10 * MiB)
    for i in range(10):
        src.backstore.write(memoryview(chunk), i * 100 * MiB + 3 * MiB)
    os.fsync(src.backstore.fd)
    params = lid1([e4(src), e4(dst)], segments(0, 1, blocks))
    assert len(params) < limits.MAX_DESCRIPTOR_LIST_BYTES + 16
    r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
    assert r.ok(), r.sense
    os.fsync(dst.backstore.fd)
    allocated = dst.backstore.allocated_bytes()
    assert 99 * MiB <= allocated <= 110 * MiB, allocated
    assert "hole" in dst.stats_copy_paths
    for i in (0, 5, 9):
        at = i * 100 * MiB + 3 * MiB
        buf = bytearray(10 * MiB)
        dst.backstore.read_into(memoryview(buf), at)
        assert buf == chunk


def test_zero_blocks_of_data_become_holes_on_a_thin_destination(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    src.backstore.caps.clone = False
    src.backstore.caps.copy_range = False
    dst.backstore.caps.clone = dst.backstore.caps.copy_range = False
    fill(src, 0, b"\0" * (4 * MiB))  # allocated zeros
    fill(src, 1024, pattern(8))
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 8192, 0, 0)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    os.fsync(dst.backstore.fd)
    assert dst.backstore.allocated_bytes() <= 64 * 1024
    assert read(dst, 1024, 8) == pattern(8)


@pytest.mark.parametrize("src_lba, dst_lba", [(0, 3000), (3000, 0), (0, 1), (1, 0)])
def test_overlapping_copy_within_one_unit(tmp_path: Path, src_lba: int, dst_lba: int) -> None:
    """memmove semantics, across chunk boundaries too."""
    rig = Rig(tmp_path)
    lu = rig.unit(0, blocks=65536)
    count = 40000  # > 2 chunks of 8 MiB
    data = pattern(count)
    fill(lu, src_lba, data)
    params = lid1([e4(lu)], [b2b(0, 0, count, src_lba, dst_lba)])
    assert run(lu, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert read(lu, dst_lba, count) == data


def test_copy_target_masked_by_acl_is_unreachable(tmp_path: Path) -> None:
    """CVE-2020-28374: a CSCD never resolves to a LUN the initiator cannot access."""
    rig = Rig(tmp_path)
    src, secret = rig.unit(0), rig.unit(1)
    other = rig.unit(0, node=rig.other)
    rig.node.acl = [AclEntry(NEXUS_A.initiator_name, frozenset({0})), AclEntry(INIT_B, None)]
    rig.other.acl = [AclEntry(INIT_B, None)]
    fill(secret, 0, pattern(8, 9))
    fill(other, 0, pattern(8, 5))
    fill(src, 0, pattern(8, 3))
    for victim in (secret, other):
        for params in (lid1([e4(src), e4(victim)], [b2b(0, 1, 8, 0, 0)]),  # write into it
                       lid1([e4(victim), e4(src)], [b2b(0, 1, 8, 0, 16)])):  # read from it
            r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
            assert (r.key, r.asc) == (SenseKey.COPY_ABORTED,
                                      Asc.COPY_TARGET_DEVICE_NOT_REACHABLE)
    assert read(secret, 0, 8) == pattern(8, 9)
    assert read(other, 0, 8) == pattern(8, 5)
    assert read(src, 16, 8) == bytes(4096)
    assert not secret.stats_copy_paths and not other.stats_copy_paths and not src.stats_copy_paths
    # the initiator allowed everywhere reaches both
    params = lid1([e4(src), e4(other)], [b2b(0, 1, 8, 0, 0)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_B).ok()
    assert read(other, 0, 8) == pattern(8, 3)


def test_reservation_conflict_on_a_sub_command(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    fill(src, 0, pattern(8))
    assert run(dst, bytes((0x16, 0, 0, 0, 0, 0)), b"", NEXUS_B).ok()  # RESERVE(6) by B
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 8, 0, 0)])
    r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
    assert (r.key, r.asc) == (SenseKey.COPY_ABORTED, Asc.THIRD_PARTY_DEVICE_FAILURE)
    assert r.information == 8  # residual blocks of the segment
    assert read(dst, 0, 8) == bytes(4096)
    # reading from a unit reserved by another nexus conflicts too
    params = lid1([e4(dst), e4(src)], [b2b(0, 1, 8, 0, 100)])
    r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
    assert (r.key, r.asc) == (SenseKey.COPY_ABORTED, Asc.THIRD_PARTY_DEVICE_FAILURE)
    # the holder itself may copy
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 8, 0, 0)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_B).ok()


def test_forwarded_sense_in_descriptor_format(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1, readonly=False)
    dst.readonly = True  # DATA PROTECT from the destination
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 8, 0, 0)])

    async def go() -> bytes:
        task = ScsiTask(xcopy_cdb(len(params)), 0, 77, NEXUS_A, expected_out=len(params),
                        source=MemorySource(params))
        src.ua.setdefault(NEXUS_A.key, deque()).clear()
        await src.execute(task)
        return src.copy_service.find(NEXUS_A, 1).error.encode(True)  # type: ignore[union-attr]

    sense = asyncio.run(go())
    assert sense[0] == 0x72 and sense[1] == SenseKey.COPY_ABORTED
    at = 8
    kinds = {}
    while at < 8 + sense[7]:
        kinds[sense[at]] = sense[at:at + 2 + sense[at + 1]]
        at += 2 + sense[at + 1]
    forwarded = kinds[0x0C]
    assert forwarded[2] & 0x0F == 2  # from the copy destination
    assert forwarded[3] == Status.CHECK_CONDITION
    assert forwarded[4] & 0x7F == 0x72 and forwarded[5] & 0x0F == SenseKey.DATA_PROTECT


def test_abort_stops_within_one_chunk(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    blocks = 512 * 1024  # 256 MiB
    src, dst = rig.unit(0, blocks=blocks), rig.unit(1, blocks=blocks)
    fill(src, 0, b"\x5A" * (64 * MiB))
    fill(src, blocks - 65536, b"\x5B" * (32 * MiB))
    original = dst.copy_blocks_from
    started: list[float] = []
    finished: list[float] = []
    params = lid1([e4(src), e4(dst)], segments(0, 1, blocks))

    async def go() -> tuple[ScsiTask, int]:
        first_two, later = asyncio.Event(), asyncio.Event()

        async def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
            """The first two chunks complete; every later one stays in flight after its
            data has moved, until the abort cancels it."""
            started.append(time.monotonic())
            held = len(started) > 2
            try:
                paths = await original(*args, **kwargs)
                if held:
                    await later.wait()
                return paths
            finally:
                finished.append(time.monotonic())
                if len(finished) == 2:
                    first_two.set()

        dst.copy_blocks_from = slow  # type: ignore[method-assign]
        src.ua.setdefault(NEXUS_A.key, deque()).clear()
        task = ScsiTask(xcopy_cdb(len(params)), 0, 5, NEXUS_A, expected_out=len(params),
                        source=MemorySource(params))
        runner = src.start(task)
        await first_two.wait()
        await src.abort([(task, runner)])
        in_flight_at_abort = len(started) - len(finished)
        assert len(finished) == len(started)  # thread I/O done before the abort completed
        return task, in_flight_at_abort

    task, _ = asyncio.run(go())
    assert task.status == Status.TASK_ABORTED
    assert len(started) <= 2 + limits.COPY_PIPELINE_DEPTH + 1
    assert len(started) < blocks * 512 // limits.COPY_CHUNK_BYTES


def test_duplicate_active_list_id(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    blocks = 256 * 1024
    src, dst = rig.unit(0, blocks=blocks), rig.unit(1, blocks=blocks)
    fill(src, 0, b"\x11" * (16 * MiB))
    release = asyncio.Event

    async def go() -> tuple[Result, Result, Result, Result]:
        gate = release()
        moving = {NEXUS_A.key: release(), NEXUS_B.key: release()}  # a copy reached the gate
        original = dst.copy_blocks_from

        async def gated(*args, **kwargs):  # type: ignore[no-untyped-def]
            moving[args[4].key].set()
            await gate.wait()
            return await original(*args, **kwargs)

        dst.copy_blocks_from = gated  # type: ignore[method-assign]
        params = lid1([e4(src), e4(dst)], [b2b(0, 1, 2048, 0, 0)], list_id=9)
        first = asyncio.ensure_future(run_async(src, xcopy_cdb(len(params)), params, NEXUS_A))
        await moving[NEXUS_A.key].wait()
        status = await run_async(src, rcr_cdb(0x00, 9), b"", NEXUS_A)  # in progress
        second = await run_async(src, xcopy_cdb(len(params)), params, NEXUS_A)
        other = asyncio.ensure_future(  # B's own list 9
            run_async(src, xcopy_cdb(len(params)), params, NEXUS_B))
        await moving[NEXUS_B.key].wait()
        gate.set()
        return await first, second, status, await other

    quiet(src)
    first, second, status, other = asyncio.run(go())
    assert first.ok() and other.ok()
    assert (second.key, second.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.OPERATION_IN_PROGRESS)
    assert status.ok() and status.data[4] == 0x00  # copy manager status: in progress


def test_lid4_immediate_copy_runs_in_the_background(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    fill(src, 0, pattern(16))
    params = lid4([e4(src), e4(dst)], [b2b(0, 1, 16, 0, 0)], list_id=0x01020304,
                  immediate=True)

    async def go() -> Result:
        ended = asyncio.Event()
        finished = rig.manager.finished

        def note_end(service, op):  # type: ignore[no-untyped-def]
            finished(service, op)
            ended.set()

        rig.manager.finished = note_end  # type: ignore[method-assign]
        quiet(src)
        r = await run_async(src, xcopy_cdb(len(params), True), params, NEXUS_A)
        assert r.ok()
        for _ in range(2):
            status = await run_async(src, rcr_cdb(0x05, 0x01020304), b"", NEXUS_A)
            if status.data[5] != 0x12:
                return status
            await ended.wait()
        raise AssertionError("copy never finished")

    status = asyncio.run(go())
    assert status.data[4] == 0x01 and status.data[5] == 0x01  # EXTENDED COPY(LID4), completed
    assert read(dst, 0, 16) == pattern(16)


def test_priority_orders_chunk_slots() -> None:
    from pytarget.copy.manager import ChunkScheduler

    async def go() -> list[int]:
        sched = ChunkScheduler(slots=1)
        await sched.acquire(0)
        order: list[int] = []

        async def waiter(p: int) -> None:
            await sched.acquire(p)
            order.append(p)
            sched.release()

        tasks = [asyncio.ensure_future(waiter(p)) for p in (5, 1, 3, 0)]
        await asyncio.sleep(0)
        sched.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(go()) == [0, 1, 3, 5]
