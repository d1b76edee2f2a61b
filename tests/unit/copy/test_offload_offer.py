"""Which data path an EXTENDED COPY takes when a backstore offers an in-storage copy with an
alignment (RBD: whole RADOS objects), and when an RBD image pair allows that offer at all
(`copy_offer_refusal`), without a Ceph cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytarget.backstore.base import Backstore
from pytarget.backstore.rbd import RBD_FEATURE_JOURNALING, copy_offer_refusal

from ..backstore.memory import MemoryBackstore
from ..scsi.harness import run
from .helpers import NEXUS_A, Rig, b2b, e4, lid1, xcopy_cdb
from .test_engine import fill, pattern, read

KiB = 1024
OBJECT = 64 * KiB


class AlignedCopier(MemoryBackstore):
    """A memory backstore that offers an in-storage copy of whole OBJECT-sized units only, and
    records what it was asked to copy."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.caps.clone = False
        self.caps.copy_range = True
        self.caps.copy_range_alignment = OBJECT
        self.copies: list[tuple[int, int, int]] = []

    def copy_range_from(self, src: Backstore, src_offset: int, dst_offset: int,
                        length: int) -> bool:
        if not isinstance(src, AlignedCopier):
            return False
        assert src_offset % OBJECT == 0 and dst_offset % OBJECT == 0 and length % OBJECT == 0
        self.copies.append((src_offset, dst_offset, length))
        buf = memoryview(bytearray(length))
        src.read_into(buf, src_offset)
        self.write(buf, dst_offset)
        return True


def units(tmp_path: Path, size: int = 1 << 20):  # type: ignore[no-untyped-def]
    rig = Rig(tmp_path)
    src = rig.unit(0, blocks=size // 512, backstore=AlignedCopier(size))
    dst = rig.unit(1, blocks=size // 512, backstore=AlignedCopier(size))
    return src, dst


def test_whole_units_inside_the_range_are_copied_in_storage_and_the_edges_through(
        tmp_path: Path) -> None:
    src, dst = units(tmp_path)
    data = pattern(1024)  # 512 KiB
    fill(src, 0, data)
    first, blocks = 3, 700  # [1536, 359936): units 1 to 4 whole, a head and a tail around them
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, blocks, first, first + 2 * OBJECT // 512)])
    r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
    assert r.ok(), r.sense
    assert read(dst, first + 2 * OBJECT // 512, blocks) == data[first * 512:(first + blocks) * 512]
    assert dst.backstore.copies == [(OBJECT, 3 * OBJECT, 4 * OBJECT)]
    assert dst.stats_copy_bytes["copy_range"] == 4 * OBJECT
    assert dst.stats_copy_bytes["buffered"] == blocks * 512 - 4 * OBJECT


def test_chunks_start_on_chunk_multiples_so_no_unit_is_split_between_two(
        tmp_path: Path) -> None:
    """20 MiB from an unaligned start span three 8 MiB chunks: every unit wholly inside the
    range is copied in storage, none is split by a chunk boundary (the two segments meet on a
    unit boundary: the initiator splits there)."""
    size = 32 << 20
    src, dst = units(tmp_path, size)
    data = pattern(40960, seed=3)  # 20 MiB
    fill(src, 0, data)
    first, blocks, split = 3, 40960 - 8, 32765  # first + split: a multiple of 128 blocks
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, split, first, first),
                                       b2b(0, 1, blocks - split, first + split,
                                           first + split)])
    r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
    assert r.ok(), r.sense
    assert read(dst, first, blocks) == data[first * 512:(first + blocks) * 512]
    whole = ((first + blocks) * 512 // OBJECT) - (-(-first * 512 // OBJECT))
    assert dst.stats_copy_bytes["copy_range"] == whole * OBJECT
    assert dst.stats_copy_bytes["buffered"] == blocks * 512 - whole * OBJECT


def test_ranges_misaligned_to_each_other_are_never_offered(tmp_path: Path) -> None:
    src, dst = units(tmp_path)
    data = pattern(512)
    fill(src, 0, data)
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 512, 0, 1)])  # one block apart
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert read(dst, 1, 512) == data
    assert dst.backstore.copies == []
    assert "copy_range" not in dst.stats_copy_bytes


def test_an_offer_that_declines_leaves_the_copy_to_the_target(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    src = rig.unit(0, blocks=2048, backstore=MemoryBackstore(1 << 20))
    dst = rig.unit(1, blocks=2048, backstore=AlignedCopier(1 << 20))
    src.backstore.caps.clone = False
    data = pattern(2048)
    fill(src, 0, data)
    params = lid1([e4(src), e4(dst)], [b2b(0, 1, 2048, 0, 0)])
    assert run(src, xcopy_cdb(len(params)), params, NEXUS_A).ok()
    assert read(dst, 0, 2048) == data
    assert dst.backstore.copies == [] and "copy_range" not in dst.stats_copy_bytes


def image(**changes: object) -> dict[str, object]:
    caps: dict[str, object] = {"object_size": 4 << 20, "stripe_unit": 4 << 20,
                               "stripe_count": 1, "features": 0x3D, "fsid": "f1"}
    caps.update(changes)
    return caps


def test_two_plain_images_of_one_cluster_may_copy_inside_it() -> None:
    assert copy_offer_refusal(image()) is None
    assert copy_offer_refusal(image(), image()) is None
    assert copy_offer_refusal(image(object_size=1 << 16, stripe_unit=1 << 16),
                              image(object_size=1 << 16, stripe_unit=1 << 16)) is None


@pytest.mark.parametrize("dst, src, reason", [
    (image(), image(fsid="f2"), "different clusters"),
    (image(), image(object_size=1 << 22 + 1, stripe_unit=1 << 22 + 1), "object sizes differ"),
    (image(stripe_unit=1 << 16, stripe_count=16), image(), "destination image is striped"),
    (image(), image(stripe_count=2), "source image is striped"),
    (image(features=0x3D | RBD_FEATURE_JOURNALING), image(), "destination image is journaled"),
    (image(), image(features=RBD_FEATURE_JOURNALING), "source image is journaled"),
])
def test_what_keeps_a_copy_out_of_the_cluster(dst: dict[str, object], src: dict[str, object],
                                              reason: str) -> None:
    refusal = copy_offer_refusal(dst, src)
    assert refusal is not None and reason in refusal
