"""The backstore contract (tests/unit/backstore/test_contract.py) run against `backstore: rbd`,
and what the RBD backstore adds: provisioning through the registry, images with librbd's default
4 MiB objects, the capabilities the VPD pages read, and work in flight counted for the loop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytarget.backstore import KINDS, open_backstore, provision_backstore
from pytarget.backstore.base import Backstore
from pytarget.backstore.rbd import RbdBackstore, remove_image
from pytarget.backstore.threads import io_threads_busy

from ..ceph_cluster import CephCluster
from ..conftest import run
from ..unit.backstore.test_contract import (  # noqa: F401  (the contract, collected here)
    SIZE,
    Factory,
    data,
    read,
    test_allocated_bytes_follow_deallocation,
    test_awaitable_calls,
    test_blocking_write_then_read,
    test_close_twice,
    test_copy_offers_between_two_of_a_kind,
    test_deallocate,
    test_extents_cover_the_range_and_stop_at_the_end,
    test_fast_path_agrees_with_the_capabilities,
    test_identity,
    test_no_copy_offer_across_kinds,
    test_optional_atomic_calls_match_the_capabilities,
    test_resize,
    test_zero_keeps_the_range_allocated,
)

pytestmark = pytest.mark.ceph

MiB = 1 << 20
GRANULE = 64 * 1024


def rbd_params(cluster: CephCluster, name: str, **extra: Any) -> dict[str, Any]:
    return {"pool": cluster.pool, "image": name, "conf": str(cluster.conf),
            "keyring": str(cluster.keyring), "client_id": cluster.client_id, **extra}


def remove(cluster: CephCluster, name: str) -> None:
    run(remove_image(cluster.pool, name, conf=str(cluster.conf), keyring=str(cluster.keyring)))


@pytest.fixture
def make(ceph_cluster: CephCluster) -> Iterator[Factory]:
    """RBD images with 64 KiB objects: rbd_diff_iterate2 reports allocation per object, so
    objects of the discard granule make extents exact to the granule, as the contract wants."""
    opened: list[tuple[Backstore, str]] = []

    def factory(name: str) -> Backstore:
        image = f"contract-{name}-{uuid.uuid4().hex[:8]}"
        params = rbd_params(ceph_cluster, image, object_size=GRANULE)
        assert provision_backstore("rbd", params, SIZE) is True
        store = open_backstore("rbd", params)
        opened.append((store, image))
        return store
    yield factory
    for store, image in opened:
        store.close()
        remove(ceph_cluster, image)


@pytest.fixture
def store(make: Factory) -> Backstore:
    return make("a")


def test_rbd_kind_by_configuration_key(ceph_cluster: CephCluster, image_name: str) -> None:
    assert KINDS["rbd"] is RbdBackstore
    params = rbd_params(ceph_cluster, image_name)
    assert RbdBackstore.exists(params) is False
    with pytest.raises(FileNotFoundError):
        open_backstore("rbd", params)
    assert provision_backstore("rbd", params, SIZE) is True
    try:
        assert provision_backstore("rbd", params, 2 * SIZE) is False  # never touched
        with pytest.raises(FileExistsError):
            RbdBackstore.provision(params, SIZE)
        store = open_backstore("rbd", params, readonly=True)
        try:
            assert store.size == SIZE and store.readonly
            assert store.location == f"{ceph_cluster.pool}/{image_name}"
            with pytest.raises(OSError):
                store.write(memoryview(bytes(512)), 0)
        finally:
            store.close()
    finally:
        remove(ceph_cluster, image_name)


def test_capabilities_say_what_librbd_does(ceph_cluster: CephCluster, image_name: str) -> None:
    """No fast path on the loop; UNMAP granularity = librbd's discard granule; COMPARE AND
    WRITE atomic within one 512-byte sector; no clones, in-cluster copies of whole objects."""
    params = rbd_params(ceph_cluster, image_name)
    provision_backstore("rbd", params, SIZE)
    store = open_backstore("rbd", params)
    try:
        caps = store.caps
        assert not (caps.read_nowait or caps.write_inline or caps.lend)
        assert caps.thin and caps.deallocated_reads_zero
        assert caps.deallocate_granularity == GRANULE and caps.deallocate_alignment == 0
        assert caps.compare_and_write_max == 512 and caps.compare_and_write_boundary == 512
        assert not caps.clone
        assert caps.copy_range and caps.copy_range_alignment == 4 * MiB
    finally:
        store.close()
        remove(ceph_cluster, image_name)


def test_default_objects_report_allocation_per_object(ceph_cluster: CephCluster,
                                                      image_name: str) -> None:
    """With 4 MiB objects a granule discarded inside an object still reads as zeros, and its
    object is reported mapped (never a hole where data is)."""
    params = rbd_params(ceph_cluster, image_name)
    provision_backstore("rbd", params, SIZE)
    store = open_backstore("rbd", params)
    try:
        store.write(memoryview(data(MiB)), 0)
        store.deallocate(GRANULE + 512, 4 * GRANULE)
        got = read(store, 0, MiB)
        assert got[GRANULE + 512:5 * GRANULE + 512] == bytes(4 * GRANULE)
        assert got[:GRANULE + 512] == data(MiB)[:GRANULE + 512]
        assert got[5 * GRANULE + 512:] == data(MiB)[5 * GRANULE + 512:]
        extents = store.extents(0, SIZE)
        assert [(e.offset, e.length, e.mapped) for e in extents] == [
            (0, MiB, True), (MiB, SIZE - MiB, False)]
        store.deallocate(0, 4 * MiB)  # a whole object: gone
        assert [e.mapped for e in store.extents(0, SIZE)] == [False]
    finally:
        store.close()
        remove(ceph_cluster, image_name)


def test_aio_is_counted_and_survives_cancellation(ceph_cluster: CephCluster,
                                                  image_name: str) -> None:
    params = rbd_params(ceph_cluster, image_name)
    provision_backstore("rbd", params, SIZE)
    store = open_backstore("rbd", params)
    payload = data(MiB, seed=9)

    async def go() -> None:
        writer = asyncio.ensure_future(store.awrite(memoryview(payload), 0))
        await asyncio.sleep(0)
        assert io_threads_busy()  # a librbd completion is on its way to the loop
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        assert not io_threads_busy()  # the cancelled caller waited for librbd
        buf = bytearray(MiB)
        await store.aread(memoryview(buf), 0)
        assert bytes(buf) == payload
    try:
        run(go())
    finally:
        store.close()
        remove(ceph_cluster, image_name)


def test_resize_through_another_client_is_seen(ceph_cluster: CephCluster,
                                               image_name: str, tmp_path: Path) -> None:
    params = rbd_params(ceph_cluster, image_name)
    provision_backstore("rbd", params, SIZE)
    first, second = open_backstore("rbd", params), open_backstore("rbd", params)
    try:
        second.resize(2 * SIZE)
        assert second.size == 2 * SIZE
        assert first.medium_size() == 2 * SIZE and first.size == SIZE
    finally:
        first.close()
        second.close()
        remove(ceph_cluster, image_name)
