"""EXTENDED COPY and ODX on RBD LUNs (docs/ceph.md, "Copies"): whole objects copied inside the
cluster (RADOS copy-from) with the unaligned edges through the target, holes kept as holes,
librbd's object map and the destination's snapshots kept true, a clone's parent data read
through, and copies between a file LUN and an RBD LUN through the generic engine. The logical
units run in process (the copy manager's test rig) over images of the session's cluster."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytarget.backstore import open_backstore, provision_backstore
from pytarget.backstore.rbd import RbdBackstore
from pytarget.scsi.device import LogicalUnit

from ..ceph_cluster import CephCluster
from ..unit.copy.helpers import NEXUS_A, Rig, b2b, e4, lid1, xcopy_cdb
from ..unit.copy.test_tokens import populate, write
from ..unit.scsi.harness import run
from .test_rbd_backstore import rbd_params, remove

pytestmark = pytest.mark.ceph

MiB = 1 << 20
OBJECT = 4 * MiB
BS = 512
SIZE = 24 * MiB  # six objects


class Images:
    """RBD images on the session's cluster, removed (with their snapshots) at the end."""

    def __init__(self, cluster: CephCluster) -> None:
        self.cluster = cluster
        self.names: list[str] = []
        self.stores: list[RbdBackstore] = []

    def rbd(self, *argv: str) -> str:
        done = subprocess.run(["rbd", "-c", str(self.cluster.conf), "--keyring",
                               str(self.cluster.keyring), *argv],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    def name(self) -> str:
        name = f"copy-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return name

    def open(self, name: str, size: int = SIZE) -> RbdBackstore:
        params = rbd_params(self.cluster, name)
        provision_backstore("rbd", params, size)
        store = open_backstore("rbd", params)
        assert isinstance(store, RbdBackstore)
        self.stores.append(store)
        return store

    def close(self) -> None:
        for store in self.stores:
            store.close()
        for name in reversed(self.names):
            spec = f"{self.cluster.pool}/{name}"
            subprocess.run(["rbd", "-c", str(self.cluster.conf), "snap", "unprotect",
                            f"{spec}@base"], capture_output=True, timeout=60)
            subprocess.run(["rbd", "-c", str(self.cluster.conf), "snap", "purge", spec],
                           capture_output=True, timeout=60)
            remove(self.cluster, name)

    def object_map_clean(self, name: str) -> None:
        """`rbd object-map check` finds nothing to correct."""
        out = self.rbd("object-map", "check", f"{self.cluster.pool}/{name}")
        assert "object map error" not in out and "invalidating" not in out, out


@pytest.fixture
def images(ceph_cluster: CephCluster) -> Iterator[Images]:
    made = Images(ceph_cluster)
    try:
        yield made
    finally:
        made.close()


def lun(rig: Rig, number: int, store: Any) -> LogicalUnit:
    return rig.unit(number, blocks=store.size // BS, backstore=store)


def read(lu: LogicalUnit, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    assert lu.backstore is not None
    lu.backstore.read_into(memoryview(buf), offset)
    return bytes(buf)


def xcopy(src: LogicalUnit, dst: LogicalUnit, src_byte: int, dst_byte: int,
          nbytes: int) -> None:
    segments = []
    done = 0
    while done < nbytes:
        n = min(65528 * BS, nbytes - done)
        segments.append(b2b(0, 1, n // BS, (src_byte + done) // BS, (dst_byte + done) // BS))
        done += n
    params = lid1([e4(src), e4(dst)], segments)
    r = run(src, xcopy_cdb(len(params)), params, NEXUS_A)
    assert r.ok(), r.sense


def test_whole_objects_are_copied_in_the_cluster_and_the_edges_through_the_target(
        tmp_path: Path, images: Images) -> None:
    rig = Rig(tmp_path)
    size = 8 * OBJECT
    src_name, dst_name = images.name(), images.name()
    src = lun(rig, 0, images.open(src_name, size))
    dst = lun(rig, 1, images.open(dst_name, size))
    assert dst.backstore is not None and dst.backstore.caps.copy_range
    data = os.urandom(13 * MiB)  # objects 0 to 2 and part of 3; 4 to 7 never written
    src.backstore.write(memoryview(data), 0)  # type: ignore[union-attr]
    dst.backstore.write(memoryview(b"\xEE" * size), 0)
    start, end = MiB + 3 * BS, 7 * OBJECT - 5 * BS
    xcopy(src, dst, start, start + OBJECT, end - start)  # objects one apart: alignment kept
    want = data[start:] + bytes(end - len(data))
    assert read(dst, start + OBJECT, end - start) == want
    assert read(dst, 0, start + OBJECT) == b"\xEE" * (start + OBJECT)
    assert read(dst, end + OBJECT, size - end - OBJECT) == b"\xEE" * (size - end - OBJECT)
    # source objects 1 and 2 are whole in the range and hold data: copied by the OSDs
    assert dst.stats_copy_bytes["copy_range"] == 2 * OBJECT
    assert dst.stats_copy_bytes["buffered"] < 3 * OBJECT
    # source objects 4 and 5 are holes: so are destination objects 5 and 6
    extents = dst.backstore.extents(5 * OBJECT, 2 * OBJECT)
    assert [(e.offset, e.length, e.mapped) for e in extents] == [(5 * OBJECT, 2 * OBJECT,
                                                                  False)]
    images.object_map_clean(dst_name)


def test_ranges_that_do_not_share_their_object_alignment_go_through_the_target(
        tmp_path: Path, images: Images) -> None:
    rig = Rig(tmp_path)
    src, dst = lun(rig, 0, images.open(images.name())), lun(rig, 1, images.open(images.name()))
    data = os.urandom(2 * OBJECT)
    src.backstore.write(memoryview(data), 0)  # type: ignore[union-attr]
    xcopy(src, dst, 0, BS, 2 * OBJECT)
    assert read(dst, BS, 2 * OBJECT) == data
    assert "copy_range" not in dst.stats_copy_bytes


def test_a_snapshot_of_the_destination_keeps_what_it_held(tmp_path: Path,
                                                          images: Images) -> None:
    rig = Rig(tmp_path)
    dst_name = images.name()
    src, dst = lun(rig, 0, images.open(images.name())), lun(rig, 1, images.open(dst_name))
    old, new = os.urandom(2 * OBJECT), os.urandom(2 * OBJECT)
    dst.backstore.write(memoryview(old), OBJECT)  # type: ignore[union-attr]
    src.backstore.write(memoryview(new), 0)  # type: ignore[union-attr]
    images.rbd("snap", "create", f"{images.cluster.pool}/{dst_name}@before")
    xcopy(src, dst, 0, OBJECT, 2 * OBJECT)
    assert dst.stats_copy_bytes["copy_range"] == 2 * OBJECT
    assert read(dst, OBJECT, 2 * OBJECT) == new
    exported = tmp_path / "before.raw"
    images.rbd("export", f"{images.cluster.pool}/{dst_name}@before", str(exported))
    with exported.open("rb") as f:
        f.seek(OBJECT)
        assert f.read(2 * OBJECT) == old
    images.object_map_clean(dst_name)


def test_a_clones_data_in_its_parent_is_read_through(tmp_path: Path, images: Images) -> None:
    rig = Rig(tmp_path)
    pool = images.cluster.pool
    parent_name, child_name = images.name(), images.name()
    parent = images.open(parent_name)
    data = os.urandom(2 * OBJECT)
    parent.write(memoryview(data), 0)
    parent.flush()
    images.rbd("snap", "create", f"{pool}/{parent_name}@base")
    images.rbd("snap", "protect", f"{pool}/{parent_name}@base")
    images.rbd("clone", f"{pool}/{parent_name}@base", f"{pool}/{child_name}")
    images.names.remove(child_name)
    images.names.append(child_name)  # removed before its parent
    dst_name = images.name()
    src, dst = lun(rig, 0, images.open(child_name)), lun(rig, 1, images.open(dst_name))
    xcopy(src, dst, 0, 0, 2 * OBJECT)
    assert read(dst, 0, 2 * OBJECT) == data
    images.object_map_clean(dst_name)


def test_odx_between_rbd_luns_copies_in_the_cluster(tmp_path: Path, images: Images) -> None:
    rig = Rig(tmp_path)
    dst_name = images.name()
    src, dst = lun(rig, 0, images.open(images.name())), lun(rig, 1, images.open(dst_name))
    data = os.urandom(2 * OBJECT)
    src.backstore.write(memoryview(data), 0)  # type: ignore[union-attr]
    blocks = 2 * OBJECT // BS
    r, token = populate(rig, (0, blocks))
    assert r.ok(), r.sense
    r = write(rig, token, (OBJECT // BS, blocks))
    assert r.ok(), r.sense
    assert read(dst, OBJECT, 2 * OBJECT) == data
    assert dst.stats_copy_bytes["copy_range"] == 2 * OBJECT
    images.object_map_clean(dst_name)


def test_file_and_rbd_luns_copy_through_the_generic_engine(tmp_path: Path,
                                                           images: Images) -> None:
    """Both ways, with an unaligned start; zeros in the data become holes on the thin
    destination."""
    rig = Rig(tmp_path)
    rbd = lun(rig, 0, images.open(images.name()))
    file = rig.unit(1, blocks=SIZE // BS)
    data = os.urandom(5 * MiB) + bytes(2 * MiB) + os.urandom(MiB)
    file.backstore.write(memoryview(data), 3 * BS)  # type: ignore[union-attr]
    params = lid1([e4(file), e4(rbd)], [b2b(0, 1, len(data) // BS, 3, 7)])
    r = run(file, xcopy_cdb(len(params)), params, NEXUS_A)
    assert r.ok(), r.sense
    assert read(rbd, 7 * BS, len(data)) == data
    assert "copy_range" not in rbd.stats_copy_bytes and rbd.stats_copy_bytes["buffered"]
    params = lid1([e4(rbd), e4(file)], [b2b(0, 1, len(data) // BS, 7, 20000)])
    r = run(rbd, xcopy_cdb(len(params)), params, NEXUS_A)
    assert r.ok(), r.sense
    assert read(file, 20000 * BS, len(data)) == data
    assert "copy_range" not in file.stats_copy_bytes
