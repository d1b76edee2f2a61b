"""pytarget.backstore.rbd.RbdImage against the throw-away cluster: data, allocation, COMPARE
AND WRITE, WRITE SAME, snapshots, and two handles on one image as two gateways would hold."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from pytarget.backstore.rbd import CompareAndWriteRefused, RbdImage, remove_image

from ..ceph_cluster import CephCluster
from ..conftest import run

pytestmark = pytest.mark.ceph

T = TypeVar("T")
MiB = 1 << 20
IMAGE_SIZE = 64 * MiB


async def opened(cluster: CephCluster, name: str, size: int | None = IMAGE_SIZE) -> RbdImage:
    return await RbdImage.open(cluster.pool, name, conf=str(cluster.conf),
                               keyring=str(cluster.keyring), client_id=cluster.client_id,
                               size=size)


def with_image(cluster: CephCluster, name: str,
               body: Callable[[RbdImage], Awaitable[T]]) -> T:
    async def go() -> T:
        image = await opened(cluster, name)
        try:
            return await body(image)
        finally:
            await image.close()
            await remove_image(cluster.pool, name, conf=str(cluster.conf),
                               keyring=str(cluster.keyring))
    return run(go(), timeout=120)


async def read(image: RbdImage, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    assert await image.read(buf, offset) == length
    return bytes(buf)


def test_created_with_size_and_caps(ceph_cluster: CephCluster, image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        assert image.size == IMAGE_SIZE
        assert image.caps["object_size"] == 4 * MiB
        assert image.caps["discard_granularity"] == 64 * 1024
        assert image.caps["stripe_unit"] == 4 * MiB
        assert image.caps["caw_atomic_max"] == 512
        assert await image.extents() == []
        assert await image.allocated_bytes() == 0
    with_image(ceph_cluster, image_name, body)


def test_open_missing_image_without_size_fails(ceph_cluster: CephCluster,
                                               image_name: str) -> None:
    with pytest.raises(FileNotFoundError):
        run(opened(ceph_cluster, image_name, size=None))


def test_round_trip_unaligned(ceph_cluster: CephCluster, image_name: str) -> None:
    pieces = [(1, 1), (511, 3), (4095, 5000), (4 * MiB - 700, 1400), (9 * MiB + 17, 2 * MiB + 3)]

    async def body(image: RbdImage) -> None:
        written = {offset: os.urandom(length) for offset, length in pieces}
        await asyncio.gather(*(image.write(data, offset) for offset, data in written.items()))
        await image.flush()
        for offset, data in written.items():
            assert await read(image, offset, len(data)) == data
        view = memoryview(bytearray(8192))[100:4196]
        assert await image.read(view, 4095) == 4096
        assert bytes(view[:5000]) == (written[4095] + bytes(4096))[:4096]
        assert await read(image, 40 * MiB, 4096) == bytes(4096)
    with_image(ceph_cluster, image_name, body)


def test_discard_frees_whole_granules_only(ceph_cluster: CephCluster,
                                           image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        granule = image.caps["discard_granularity"]
        await image.write(b"\xff" * MiB, 0)
        await image.deallocate(4096, 4096)
        assert await read(image, 4096, 4096) == b"\xff" * 4096
        await image.deallocate(granule, granule)
        assert await read(image, granule, granule) == bytes(granule)
        await image.deallocate(3 * granule - 1000, granule + 2000)
        data = await read(image, 3 * granule - 1000, granule + 2000)
        assert data == b"\xff" * 1000 + bytes(granule) + b"\xff" * 1000
    with_image(ceph_cluster, image_name, body)


def test_extents_follow_objects(ceph_cluster: CephCluster, image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        await image.write(b"\x01" * 4096, 0)
        await image.write(b"\x02" * 4096, 2 * MiB)
        await image.write(b"\x03" * MiB, 8 * MiB)
        assert await image.extents() == [(0, 2 * MiB + 4096), (8 * MiB, MiB)]
        assert await image.extents(8 * MiB, 4096) == [(8 * MiB, 4096)]
        await image.deallocate(2 * MiB, 2 * MiB)
        assert await image.extents() == [(0, 2 * MiB), (8 * MiB, MiB)]
        await image.deallocate(8 * MiB, 4 * MiB)
        assert await image.extents() == [(0, 2 * MiB)]
        assert await image.allocated_bytes() == 2 * MiB
    with_image(ceph_cluster, image_name, body)


def test_write_zeroes(ceph_cluster: CephCluster, image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        await image.write(b"\xee" * MiB, 0)
        await image.write_zeroes(1000, 5000)
        assert await read(image, 0, 8192) == b"\xee" * 1000 + bytes(5000) + b"\xee" * 2192
        await image.write_zeroes(12 * MiB, 4 * MiB)
        assert await read(image, 12 * MiB, 4096) == bytes(4096)
        assert await image.extents(12 * MiB, 4 * MiB) == []
    with_image(ceph_cluster, image_name, body)


def test_compare_and_write(ceph_cluster: CephCluster, image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        offset = 8 * MiB + 512
        await image.write(b"A" * 512, offset)
        assert await image.compare_and_write(offset, b"A" * 512, b"B" * 512) is None
        assert await read(image, offset, 512) == b"B" * 512
        expected = bytearray(b"B" * 512)
        expected[300] = 0
        assert await image.compare_and_write(offset, bytes(expected), b"C" * 512) == 300
        assert await read(image, offset, 512) == b"B" * 512
        assert await image.compare_and_write(offset + 100, b"B" * 10, b"D" * 10) is None
        assert await read(image, offset + 96, 20) == b"B" * 4 + b"D" * 10 + b"B" * 6
    with_image(ceph_cluster, image_name, body)


@pytest.mark.parametrize("where, length", [
    ("sector", 1024), ("unaligned", 512), ("object", 512)])
def test_compare_and_write_beyond_one_sector_is_refused(ceph_cluster: CephCluster,
                                                        image_name: str, where: str,
                                                        length: int) -> None:
    async def body(image: RbdImage) -> None:
        offset = {"sector": 0, "unaligned": 100,
                  "object": image.caps["object_size"] - 256}[where]
        await image.write(b"D" * length, offset)
        with pytest.raises(CompareAndWriteRefused) as refused:
            await image.compare_and_write(offset, b"D" * length, b"E" * length)
        assert refused.value.unit == 512
        assert await read(image, offset, length) == b"D" * length
    with_image(ceph_cluster, image_name, body)


def test_write_same(ceph_cluster: CephCluster, image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        pattern = os.urandom(512)
        await image.write_same(3 * MiB + 512, 2 * MiB, pattern)
        assert await read(image, 3 * MiB + 512, 2 * MiB) == pattern * 4096
        await image.write_same(3 * MiB + 512, 512, bytes(512))
        assert await read(image, 3 * MiB, 1536) == bytes(1024) + pattern
        with pytest.raises(ValueError):
            await image.write_same(0, 1000, pattern)
    with_image(ceph_cluster, image_name, body)


def test_cancelled_read_completes_before_close(ceph_cluster: CephCluster,
                                              image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        await image.write(b"\x5a" * 4 * MiB, 0)
        buf = bytearray(4 * MiB)
        reading = asyncio.ensure_future(image.read(buf, 0))
        await asyncio.sleep(0)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await image.close()
        assert buf == b"\x5a" * 4 * MiB
    with_image(ceph_cluster, image_name, body)


def test_snapshots(ceph_cluster: CephCluster, image_name: str) -> None:
    async def body(image: RbdImage) -> None:
        await image.write(b"v1" * 2048, 0)
        await image.snapshot_create("before")
        await image.write(b"v2" * 2048, 0)
        names = [name for name, _, _ in await image.snapshots()]
        assert names == ["before"]
        assert await read(image, 0, 4096) == b"v2" * 2048
        await image.snapshot_remove("before")
        assert await image.snapshots() == []
    with_image(ceph_cluster, image_name, body)


def test_two_gateways_see_each_others_writes(ceph_cluster: CephCluster,
                                             image_name: str) -> None:
    async def body(first: RbdImage) -> None:
        second = await opened(ceph_cluster, image_name)
        try:
            await first.write(b"1" * 4096, 0)
            assert await read(second, 0, 4096) == b"1" * 4096
            await second.write(b"2" * 4096, 0)
            assert await read(first, 0, 4096) == b"2" * 4096
            assert await first.compare_and_write(0, b"2" * 512, b"3" * 512) is None
            assert await second.compare_and_write(0, b"2" * 512, b"4" * 512) == 0
            assert await read(second, 0, 512) == b"3" * 512
        finally:
            await second.close()
    with_image(ceph_cluster, image_name, body)


def test_compare_and_write_counter_across_two_gateways(ceph_cluster: CephCluster,
                                                       image_name: str) -> None:
    """Two counters per gateway increment a counter sector with read + COMPARE AND WRITE
    while a plain writer per gateway rewrites the next sector of the same object: no
    increment is lost and no sector is torn, while the exclusive lock moves between them."""
    increments = 15

    async def count(image: RbdImage, done: list[int]) -> None:
        while done[0] < increments:
            current = await read(image, 0, 512)
            value = int.from_bytes(current[:8], "little")
            assert current == value.to_bytes(8, "little") * 64
            new = (value + 1).to_bytes(8, "little") * 64
            if await image.compare_and_write(0, current, new) is None:
                done[0] += 1

    async def overwrite(image: RbdImage, fill: bytes, counters: list[asyncio.Task[None]]
                        ) -> None:
        while not all(task.done() for task in counters):
            await image.write(fill * 512, 512)
            block = await read(image, 512, 512)
            assert block in (b"x" * 512, b"y" * 512)

    async def body(first: RbdImage) -> None:
        await first.write(bytes(512), 0)
        second = await opened(ceph_cluster, image_name)
        try:
            counters = [asyncio.ensure_future(count(image, [0]))
                        for image in (first, second, first, second)]
            writers = [overwrite(first, b"x", counters), overwrite(second, b"y", counters)]
            await asyncio.gather(*counters, *writers)
            final = await read(second, 0, 512)
            assert final == (4 * increments).to_bytes(8, "little") * 64
        finally:
            await second.close()
    with_image(ceph_cluster, image_name, body)
