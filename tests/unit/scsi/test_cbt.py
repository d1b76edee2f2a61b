"""Changed-block tracking: the checkpoint chain, its persistence, and a test per command that
changes blocks (each must mark exactly its blocks' granules; those that change nothing, none)."""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from pytarget.copy import commands
from pytarget.scsi.cbt import STATE_DIRTY, ChangeTracker, CheckpointError, bitmaps
from pytarget.scsi.device import LogicalUnit
from pytarget.scsi.opcodes import lu_table

from ..backstore.test_device_on_memory import memory_lu
from ..copy.helpers import (
    NEXUS_A as COPY_NEXUS,
)
from ..copy.helpers import (
    ZERO_TOKEN,
    Rig,
    b2b,
    e4,
    lid1,
    token_cdb,
    write_token_params,
    xcopy_cdb,
)
from ..copy.test_tokens import populate
from .harness import NEXUS_A, make_lu, run, run_async
from .test_medium_compare_and_write import memory_lu as medium_caw_lu

BS = 512
G = 4096  # the granularity these tests configure: 8 blocks per granule


def granules(lu: LogicalUnit, name: str = "c1") -> set[int]:
    return {int(i) for i in np.flatnonzero(lu.checkpoints.changed(name))}


def span(lba: int, blocks: int) -> set[int]:
    return set(range(lba * BS // G, ((lba + blocks) * BS - 1) // G + 1))


def tracked(tmp_path: Path, **config: object) -> LogicalUnit:
    lu = make_lu(tmp_path, checkpoint_granularity=G, **config)
    lu.create_checkpoint("c1")
    return lu


def rw(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if opcode == 0x0A:
        return struct.pack(">BBHBB", opcode, lba >> 16, lba & 0xFFFF, blocks, 0)
    if opcode in (0x2A, 0x2E, 0x41):
        return struct.pack(">BBIBHB", opcode, flags, lba, 0, blocks, 0)
    if opcode in (0xAA, 0xAE):
        return struct.pack(">BBIIBB", opcode, flags, lba, blocks, 0, 0)
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, 0)


def unmap(*pairs: tuple[int, int]) -> tuple[bytes, bytes]:
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in pairs)
    params = struct.pack(">HH4x", 6 + len(desc), len(desc)) + desc
    return struct.pack(">BB4xBHB", 0x42, 0, 0, len(params), 0), params


# ---------------------------------------------------------------- the chain
def test_each_write_sets_one_bitmap_and_since_is_the_union() -> None:
    t = ChangeTracker(None, 64 * G, G)
    t.create("a")
    t.mark(0, 1)
    t.create("b")
    t.mark(5 * G, 7 * G)
    assert np.count_nonzero(t.checkpoints[0].bitmap) == 1  # a's own bitmap froze at b
    assert set(np.flatnonzero(t.changed("a"))) == {0, 5, 6}
    assert set(np.flatnonzero(t.changed("b"))) == {5, 6}
    t.create("c")
    t.mark(63 * G + 100, 63 * G + 101)
    assert set(np.flatnonzero(t.changed("a", until="c"))) == {0, 5, 6}  # between a and c
    assert set(np.flatnonzero(t.changed("b", until="c"))) == {5, 6}
    assert set(np.flatnonzero(t.changed("b"))) == {5, 6, 63}
    # deleting b merges its bitmap into a: a's answers do not change, c's neither
    t.delete("b")
    assert set(np.flatnonzero(t.changed("a"))) == {0, 5, 6, 63}
    assert set(np.flatnonzero(t.changed("a", until="c"))) == {0, 5, 6}
    t.delete("c")  # the newest: a records again
    t.mark(10 * G, 10 * G + 1)
    assert set(np.flatnonzero(t.changed("a"))) == {0, 5, 6, 10, 63}
    t.delete("a")
    assert t.active is None
    t.mark(0, G)  # nothing to record into


def test_names_duplicates_and_unknown_checkpoints() -> None:
    t = ChangeTracker(None, 16 * G, G)
    t.create("nightly-2026.12.03")
    for bad in ("", "a b", "-x", "x/y", "x@y", "x" * 129):
        with pytest.raises(CheckpointError):
            t.create(bad)
    with pytest.raises(CheckpointError, match="exists"):
        t.create("nightly-2026.12.03")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        t.delete("other")
    t.create("later")
    with pytest.raises(CheckpointError, match="not later"):
        t.changed("later", until="nightly-2026.12.03")


def test_block_status_extents_are_runs_of_granules_clipped_to_the_request() -> None:
    t = ChangeTracker(None, 10 * G + 512, G)
    t.create("a")
    t.mark(2 * G, 4 * G)
    t.mark(10 * G, 10 * G + 512)  # the partial last granule
    assert t.block_status("a", 0, 10 * G + 512) == [
        (2 * G, 0), (2 * G, STATE_DIRTY), (6 * G, 0), (512, STATE_DIRTY)]
    # from inside a granule, to inside another
    assert t.block_status("a", G + 512, 2 * G) == [(G - 512, 0), (G + 512, STATE_DIRTY)]
    assert t.block_status("a", 100 * G, G) == []


def test_granularity_applies_to_a_new_chain_and_resizing_marks_new_space() -> None:
    t = ChangeTracker(None, 8 * G, G)
    t.wanted_granularity = 2 * G
    t.create("a")
    assert t.granularity == 2 * G and len(t.active or b"") == 4
    t.wanted_granularity = G
    t.create("b")
    assert t.granularity == 2 * G  # the chain keeps its granularity
    t.resize(12 * G)
    assert set(np.flatnonzero(t.changed("b"))) == {4, 5}
    assert set(np.flatnonzero(t.changed("a", until="b"))) == set()


# ---------------------------------------------------------------- persistence
def test_clean_close_keeps_bitmaps_exact_and_a_crash_marks_the_newest_inconsistent(
        tmp_path: Path) -> None:
    path = str(tmp_path / "lun.img.cbt")
    t = ChangeTracker.open(path, 32 * G, G)
    t.create("a")
    t.mark(0, G)
    t.create("b")
    t.mark(3 * G, 4 * G)
    t.close(clean=True)
    again = ChangeTracker.open(path, 32 * G, G)
    assert [cp.name for cp in again.checkpoints] == ["a", "b"]
    assert again.exact("a") and again.exact("b")
    assert set(np.flatnonzero(again.changed("a"))) == {0, 3}
    again.mark(7 * G, 8 * G)
    # no close: what a SIGKILL leaves; the file says "in use"
    ChangeTracker._open.clear()
    crashed = ChangeTracker.open(path, 32 * G, G)
    assert not crashed.exact("a") and not crashed.exact("b")
    assert crashed.exact("a", until="b")  # frozen before the crash: still exact
    assert set(np.flatnonzero(crashed.changed("a", until="b"))) == {0}
    assert [d["state"] for d in crashed.describe()] == ["inconsistent", "inconsistent"]
    assert list(bitmaps(crashed)) == []  # never served as exact
    assert list(bitmaps(crashed, until="b")) == ["a"]
    crashed.create("c")  # a new checkpoint after the crash is exact
    assert list(bitmaps(crashed)) == ["c"]
    crashed.close()
    assert ChangeTracker.open(path, 32 * G, G).exact("c")


def test_grown_medium_and_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "lun.img.cbt"
    t = ChangeTracker.open(str(path), 8 * G, G)
    t.create("a")
    t.close()
    grown = ChangeTracker.open(str(path), 10 * G, G)
    assert set(np.flatnonzero(grown.changed("a"))) == {8, 9}
    grown.close()
    path.write_bytes(b"pytarget-cbt 1\n{\"granularity\": 3}\n")
    ChangeTracker._open.clear()
    broken = ChangeTracker.open(str(path), 8 * G, G)
    assert broken.checkpoints == []
    assert (tmp_path / "lun.img.cbt.corrupt").exists()
    broken.close()
    assert not path.exists()  # no checkpoints, no file


def test_a_unit_closing_cleanly_saves_and_a_reopened_unit_shares_the_tracker(
        tmp_path: Path) -> None:
    state = str(tmp_path / "lun0.img.cbt")
    lu = make_lu(tmp_path, checkpoint_granularity=G, checkpoint_state_path=state)
    lu.create_checkpoint("c1")
    # a reload builds the new unit while the old one still serves the medium
    twin = make_lu(tmp_path, checkpoint_granularity=G, checkpoint_state_path=state)
    assert twin.checkpoints is lu.checkpoints
    assert run(twin, rw(0x8A, 16, 8), b"\1" * 8 * BS).ok()
    lu.close()
    assert run(twin, rw(0x8A, 64, 8), b"\1" * 8 * BS).ok()
    twin.close()
    reopened = make_lu(tmp_path, checkpoint_granularity=G, checkpoint_state_path=state)
    assert granules(reopened) == {2, 8} and reopened.checkpoints.exact("c1")
    reopened.close()


# ---------------------------------------------------------------- every path that changes blocks
WRITES = [(0x0A, "WRITE(6)"), (0x2A, "WRITE(10)"), (0xAA, "WRITE(12)"), (0x8A, "WRITE(16)"),
          (0x2E, "WRITE AND VERIFY(10)"), (0xAE, "WRITE AND VERIFY(12)"),
          (0x8E, "WRITE AND VERIFY(16)"), (0x8B, "ORWRITE(16)")]


@pytest.mark.parametrize(("opcode", "name"), WRITES)
def test_writes_mark_their_granules(tmp_path: Path, opcode: int, name: str) -> None:
    lu = tracked(tmp_path)
    assert run(lu, rw(opcode, 20, 13), b"\x5a" * 13 * BS).ok()
    assert granules(lu) == span(20, 13) == {2, 3, 4}


def test_without_checkpoints_the_range_lock_is_untouched(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)
    assert lu.ranges.on_exclusive_release is None  # release calls nothing: no marking
    lu.create_checkpoint("c1")
    assert lu.ranges.on_exclusive_release is not None
    lu.delete_checkpoint("c1")
    assert lu.ranges.on_exclusive_release is None


def test_reads_verify_and_reserve_mark_nothing(tmp_path: Path) -> None:
    lu = tracked(tmp_path)
    assert run(lu, rw(0x88, 0, 64)).ok()
    assert run(lu, rw(0x8F, 0, 64)).ok()  # VERIFY(16), medium check
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0))).ok()  # RESERVE(6): a barrier, no write
    assert run(lu, bytes((0x17, 0, 0, 0, 0, 0))).ok()
    assert run(lu, rw(0x91, 0, 0)).ok()  # SYNCHRONIZE CACHE(16)
    assert granules(lu) == set()


def test_write_atomic_marks_its_granules() -> None:
    lu = memory_lu(checkpoint_granularity=G)
    lu.create_checkpoint("c1")
    unit = lu.atomic_write_blocks
    assert run(lu, struct.pack(">BBQHHBB", 0x9C, 0, unit * 3, 0, unit, 0, 0),
               b"\7" * unit * BS).ok()
    assert granules(lu) == span(unit * 3, unit)


@pytest.mark.parametrize(("flags", "data"), [(0, b"\x42" * BS), (0, bytes(BS)),
                                              (0x08, bytes(BS)), (0x01, b"")],
                         ids=["pattern", "zeros", "unmap", "ndob"])
def test_write_same_marks_its_granules(tmp_path: Path, flags: int, data: bytes) -> None:
    lu = tracked(tmp_path)
    assert run(lu, rw(0x93, 100, 40, flags), data).ok()  # pattern, zeros, UNMAP, NDOB
    assert run(lu, rw(0x41, 300, 3), b"\x42" * BS).ok()
    assert granules(lu) == span(100, 40) | span(300, 3)


def test_unmap_marks_every_descriptor(tmp_path: Path) -> None:
    lu = tracked(tmp_path)
    cdb, params = unmap((8, 8), (1000, 100))
    assert run(lu, cdb, params).ok()
    assert granules(lu) == span(8, 8) | span(1000, 100)


def test_compare_and_write_marks_only_when_it_wrote(tmp_path: Path) -> None:
    lu = tracked(tmp_path)
    caw = struct.pack(">BBQ3xBBB", 0x89, 0, 40, 1, 0, 0)
    miscompare = run(lu, caw, b"\1" * BS + b"\2" * BS)
    assert miscompare.key == 0x0E
    assert granules(lu) == set()
    assert run(lu, caw, bytes(BS) + b"\2" * BS).ok()
    assert granules(lu) == span(40, 1)


def test_compare_and_write_on_the_medium_marks_only_when_it_wrote() -> None:
    lu = medium_caw_lu(BS, 4096)  # the RBD path: the medium's own compare-and-write
    lu.checkpoints.wanted_granularity = G
    lu.create_checkpoint("c1")
    caw = struct.pack(">BBQ3xBBB", 0x89, 0, 40, 1, 0, 0)
    assert run(lu, caw, b"\1" * BS + b"\2" * BS).key == 0x0E
    assert granules(lu) == set()
    assert run(lu, caw, bytes(BS) + b"\2" * BS).ok()
    assert granules(lu) == span(40, 1)


def test_sanitize_marks_the_whole_medium(tmp_path: Path) -> None:
    lu = tracked(tmp_path, blocks=256)
    pattern = b"\xaa" * 4
    params = bytes((1, 0)) + struct.pack(">H", len(pattern)) + pattern
    assert run(lu, bytes((0x48, 0x01, 0, 0, 0, 0, 0, 0, len(params), 0)), params).ok()
    assert granules(lu) == span(0, 256)
    lu.create_checkpoint("c2")
    assert run(lu, bytes((0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0))).ok()  # BLOCK ERASE
    assert granules(lu, "c2") == span(0, 256)


def test_extended_copy_marks_the_destination_only(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src, dst = rig.unit(0), rig.unit(1)
    for lu in (src, dst):
        lu.create_checkpoint("c1")
    assert run(src, rw(0x8A, 0, 16), b"\3" * 16 * BS).ok()
    src.checkpoints.delete("c1")
    src.create_checkpoint("c1")
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 16, 0, 200)])
    assert run(src, xcopy_cdb(len(params)), params, COPY_NEXUS).ok()
    assert granules(src) == set()
    assert granules(dst) == {200 * BS // 65536, (216 * BS - 1) // 65536}


def test_write_using_token_marks_the_destination_ranges(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.unit(0)
    dst = rig.unit(1)
    dst.checkpoints.wanted_granularity = G
    dst.create_checkpoint("c1")
    result, token = populate(rig, (0, 16))
    assert result.ok()
    params = write_token_params(token, (100, 8), (4000, 8))
    assert run(dst, token_cdb(0x11, 2, len(params)), params, COPY_NEXUS).ok()
    assert granules(dst) == span(100, 8) | span(4000, 8)
    zero = write_token_params(ZERO_TOKEN, (6000, 16))  # the block device zero token
    assert run(dst, token_cdb(0x11, 3, len(zero)), zero, COPY_NEXUS).ok()
    assert granules(dst) == span(100, 8) | span(4000, 8) | span(6000, 16)


def test_rollback_marks_everything(tmp_path: Path) -> None:
    lu = tracked(tmp_path, blocks=256)
    lu.checkpoints.mark_all()  # what a rollback to a snapshot calls
    assert granules(lu) == span(0, 256)


def test_every_command_that_writes_has_its_test_here() -> None:
    """A new command flagged as writing must get a test in this file (and its marking checked):
    the set below is what the tests above cover."""
    covered = {(op, None) for op, _ in WRITES} | {
        (0x9C, None), (0x93, None), (0x41, None), (0x42, None), (0x89, None), (0x48, 1),
        (0x48, 2), (0x83, 0x11)}
    table = lu_table(True, commands.ROWS, compare_and_write=True, atomic=True)
    writers = {(s.opcode, s.sa) for s in table.specs if s.writes}
    assert writers == covered


def test_a_checkpoint_created_during_a_write_freezes_its_range_too(tmp_path: Path) -> None:
    lu = tracked(tmp_path)

    async def go() -> None:
        gate = asyncio.Event()
        inner = lu.backstore.awrite  # type: ignore[union-attr]

        async def slow(data: memoryview, offset: int) -> None:
            await gate.wait()
            await inner(data, offset)

        lu.backstore.awrite = slow  # type: ignore[union-attr,method-assign,assignment]
        lu.write_inline = lambda *a: False  # type: ignore[method-assign,assignment]
        lu._inline_write_max = -1
        lu.ua.setdefault(NEXUS_A.key, deque()).clear()
        write = asyncio.ensure_future(run_async(lu, rw(0x8A, 80, 8), b"\1" * 8 * BS))
        while not lu.ranges.exclusive_holds():
            await asyncio.sleep(0)
        lu.create_checkpoint("c2")  # the write holds its lock: the data may land either side
        gate.set()
        assert (await write).ok()

    asyncio.run(go())
    assert granules(lu, "c1") == span(80, 8)
    assert set(np.flatnonzero(lu.checkpoints.changed("c1", until="c2"))) == span(80, 8)
    assert granules(lu, "c2") == span(80, 8)


def test_checkpoints_are_refused_where_other_gateways_write(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)
    lu.pr.store = object()  # type: ignore[assignment]
    with pytest.raises(CheckpointError, match="gateways"):
        lu.create_checkpoint("c1")

