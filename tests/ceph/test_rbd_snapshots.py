"""Snapshots of RBD LUNs: a set of two images taken at one instant through the device server's
quiesce, each opened read-only at its snapshot, a rollback, a copy-on-write clone (and the
snapshot it depends on refusing to go until the clone is gone), against the session's
throw-away cluster."""

from __future__ import annotations

import contextlib
import errno
import uuid

import pytest

from pytarget.backstore.rbd import RbdBackstore
from pytarget.scsi import snapshots
from pytarget.scsi.device import LogicalUnit, LuConfig

from ..ceph_cluster import CephCluster
from ..conftest import run
from ..unit.scsi.harness import Directory
from .test_rbd_backstore import rbd_params, remove

pytestmark = pytest.mark.ceph

MiB = 1 << 20
SIZE = 16 * MiB


def read(store: RbdBackstore, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    store.read_into(memoryview(buf), offset)
    return bytes(buf)


def test_rbd_snapshot_set_rollback_and_clone(ceph_cluster: CephCluster) -> None:
    names = [f"snap-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    clone_name = f"clone-{uuid.uuid4().hex[:10]}"
    params = [rbd_params(ceph_cluster, n) for n in names]
    for p in params:
        RbdBackstore.provision(p, SIZE)
    directory = Directory()
    units = [LogicalUnit(LuConfig(lun=i), RbdBackstore.open(p), directory)
             for i, p in enumerate(params)]
    opened: list[RbdBackstore] = []
    try:
        for i, lu in enumerate(units):
            assert lu.backstore is not None
            lu.backstore.write(memoryview(bytes([0xA0 + i]) * MiB), 0)
        methods, held = run(snapshots.take([(lu, "s") for lu in units]))
        assert methods == {0: "rbd", 1: "rbd"} and held >= 0
        for lu in units:
            assert lu.backstore is not None
            lu.backstore.write(memoryview(b"\xee" * MiB), 0)
        with pytest.raises(snapshots.SnapshotError, match="exists"):
            run(snapshots.take([(units[0], "s")]))

        for i, p in enumerate(params):
            at = RbdBackstore.open(RbdBackstore.snapshot_params(p, "s"))
            opened.append(at)
            assert at.readonly and at.size == SIZE
            assert read(at, 0, MiB) == bytes([0xA0 + i]) * MiB
            with pytest.raises(OSError):
                at.write(memoryview(bytes(512)), 0)
        assert RbdBackstore.exists(RbdBackstore.snapshot_params(params[0], "nope")) is False

        assert run(snapshots.rollback(units[0], "s")) is False
        assert units[0].backstore is not None
        assert isinstance(units[0].backstore, RbdBackstore)
        assert read(units[0].backstore, 0, MiB) == b"\xa0" * MiB

        child = rbd_params(ceph_cluster, clone_name)
        assert units[1].backstore is not None
        units[1].backstore.clone_snapshot("s", child)
        clone = RbdBackstore.open(child)
        opened.append(clone)
        assert read(clone, 0, MiB) == b"\xa1" * MiB
        clone.write(memoryview(b"\x01" * MiB), 0)
        assert read(clone, 0, MiB) == b"\x01" * MiB
        with pytest.raises(OSError) as refused:
            units[1].backstore.delete_snapshot("s")
        assert refused.value.errno == errno.EBUSY and "clone" in str(refused.value)
    finally:
        for store in opened:
            store.close()
        with contextlib.suppress(FileNotFoundError):
            remove(ceph_cluster, clone_name)
        for lu, name in zip(units, names, strict=True):
            assert lu.backstore is not None
            with contextlib.suppress(FileNotFoundError):
                lu.backstore.delete_snapshot("s")
            lu.close()
            remove(ceph_cluster, name)
