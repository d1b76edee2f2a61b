"""Snapshots of RBD LUNs: a set of two images taken at one instant through the device server's
quiesce, each opened read-only at its snapshot, a rollback, a copy-on-write clone (and the
snapshot it depends on refusing to go until the clone is gone), and the same through the
command line against a live target, on the session's throw-away cluster."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from pathlib import Path

import pytest

from pytarget.backstore.rbd import RbdBackstore
from pytarget.initiator.client import Initiator
from pytarget.scsi import snapshots
from pytarget.scsi.device import LogicalUnit, LuConfig

from ..ceph_cluster import CephCluster
from ..conftest import INITIATOR1, TARGET_IQN, LiveTarget, run, start_target
from ..conftest import write_config as write_target_config
from ..e2e.test_reload import pytarget
from ..unit.scsi.harness import Directory
from .test_rbd_backstore import rbd_params, remove
from .test_rbd_target import rbd_lun

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


def test_rbd_snapshots_through_the_command_line(ceph_cluster: CephCluster, tmp_path: Path
                                                ) -> None:
    """A live target with two RBD LUNs: a set taken with `pytarget snapshot create`, one
    member shown read-only as LUN 5, the other cloned into a new image served as LUN 6, the
    snapshot a clone depends on refusing deletion with the reason."""
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    images = [f"{prefix}-{n}" for n in range(2)]
    clone_image = f"{prefix}-clone"
    config = write_target_config(tmp_path, luns=[
        rbd_lun(ceph_cluster, n, image) for n, image in enumerate(images)])
    data = [os.urandom(64 * 512) for _ in range(2)]

    async def go(target: LiveTarget) -> None:
        async def cli(*args: str, ok: bool = True) -> str:
            status, out = await pytarget("snapshot", *args, "--config", str(config))
            assert (status == 0) == ok, out
            return out

        ini = await Initiator.connect(target.host, target.port)
        await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
        for lun in (0, 1):
            await ini.clear_unit_attentions(lun)
            (await ini.write(lun, 0, data[lun])).check()
        assert "(rbd)" in await cli("create", "s", "0", "1")
        for lun in (0, 1):
            (await ini.write(lun, 0, bytes(64 * 512))).check()
        await cli("expose", "0@s", "--lun", "5")
        await cli("clone", "1@s", "--image", clone_image, "--id", "6")
        for lun in (5, 6):
            await ini.clear_unit_attentions(lun)
        assert (await ini.read(5, 0, 64)).check().data == data[0]
        assert (await ini.write(5, 0, data[1])).sense_key == 0x7  # DATA PROTECT
        assert (await ini.read(6, 0, 64)).check().data == data[1]
        (await ini.write(6, 0, data[0])).check()
        out = await cli("delete", "1@s", ok=False)
        assert "clone" in out and "flatten or remove" in out
        await cli("unexpose", "0@s")
        await cli("delete", "0@s")
        rows = json.loads(await cli("list", "--json"))
        assert [(r["lun"], r["method"]) for r in rows] == [(1, "rbd")]
        assert (tmp_path / f"rbd.{ceph_cluster.pool}.{images[1]}.snapshots.json").exists()
        await ini.logout()

    target = start_target(config)
    try:
        run(go(target), timeout=300)
    finally:
        target.stop()
        with contextlib.suppress(FileNotFoundError):
            remove(ceph_cluster, clone_image)
        for image in images:
            store = RbdBackstore.open(rbd_params(ceph_cluster, image))
            with contextlib.suppress(FileNotFoundError):
                store.delete_snapshot("s")
            store.close()
            remove(ceph_cluster, image)
