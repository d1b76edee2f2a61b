"""The contract every backstore meets (pytarget.backstore.base), run against each kind.

A new kind adds its factory to `KINDS_UNDER_TEST`; everything else here must pass unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytarget.backstore import (
    KINDS,
    backstore_kind,
    open_backstore,
    provision_backstore,
)
from pytarget.backstore.base import Backstore, Extent
from pytarget.backstore.file import FileBackstore
from pytarget.backstore.threads import io_threads_busy, run_blocking

from .memory import MemoryBackstore

MiB = 1 << 20
SIZE = 8 * MiB

Factory = Callable[[str], Backstore]


def _file(tmp_path: Path) -> Factory:
    def make(name: str) -> Backstore:
        path = str(tmp_path / f"{name}.img")
        FileBackstore.create(path, SIZE)
        return FileBackstore(path)
    return make


def _memory(tmp_path: Path) -> Factory:
    return lambda name: MemoryBackstore(SIZE, name=name)


KINDS_UNDER_TEST: dict[str, Callable[[Path], Factory]] = {"file": _file, "memory": _memory}


@pytest.fixture(params=sorted(KINDS_UNDER_TEST))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    opened: list[Backstore] = []

    def factory(name: str) -> Backstore:
        store = KINDS_UNDER_TEST[request.param](tmp_path)(name)
        opened.append(store)
        return store
    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(make: Factory) -> Backstore:
    return make("a")


def data(n: int, seed: int = 1) -> bytes:
    return (bytes((seed + i) % 256 for i in range(251)) * (n // 251 + 1))[:n]


def read(store: Backstore, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    store.read_into(memoryview(buf), offset)
    return bytes(buf)


def check_cover(extents: list[Extent], offset: int, end: int) -> None:
    """In order, contiguous from offset to end, adjacent runs of different kinds."""
    pos = offset
    for i, extent in enumerate(extents):
        assert extent.offset == pos and extent.length > 0
        if i:
            assert extent.mapped != extents[i - 1].mapped
        pos += extent.length
    assert pos == end


def test_identity(store: Backstore) -> None:
    assert store.size == SIZE and store.medium_size() == SIZE
    assert store.location and not store.closed and not store.readonly
    assert store.kind and isinstance(store.kind, str)


def test_blocking_write_then_read(store: Backstore) -> None:
    payload = data(3 * 4096 + 512)
    store.write(memoryview(payload), MiB + 512)
    assert read(store, MiB + 512, len(payload)) == payload
    assert read(store, 5 * MiB, 4096) == bytes(4096)  # never written


def test_awaitable_calls(store: Backstore) -> None:
    payload = data(65536, seed=7)
    seen: list[bytes] = []

    async def go() -> bytes:
        await store.awrite(memoryview(payload), 2 * MiB)
        await store.aflush()
        buf = bytearray(len(payload))
        await store.aread(memoryview(buf), 2 * MiB, lambda view: seen.append(bytes(view)))
        return bytes(buf)
    assert asyncio.run(go()) == payload
    assert seen == [payload]  # the hook ran once, on the filled buffer, before the caller resumed


def test_fast_path_agrees_with_the_capabilities(store: Backstore) -> None:
    payload = data(65536, seed=3)
    store.write(memoryview(payload), 4096)
    buf = bytearray(len(payload))
    if not store.caps.read_nowait:
        assert store.read_nowait(memoryview(buf), 4096) is False
    elif store.read_nowait(memoryview(buf), 4096):
        assert bytes(buf) == payload
    view = store.mapped(4096, len(payload))
    if not store.caps.lend:
        assert view is None
    elif view is not None:
        assert view.readonly and bytes(view) == payload
        view.release()
    store.prefetch(0, MiB)


def test_deallocate(store: Backstore) -> None:
    granule = max(store.caps.deallocate_granularity, 4096)
    store.write(memoryview(data(16 * granule)), 0)
    store.flush()
    store.deallocate(2 * granule + 512, 8 * granule)
    got = read(store, 0, 16 * granule)
    assert got[:2 * granule + 512] == data(16 * granule)[:2 * granule + 512]
    assert got[10 * granule + 512:] == data(16 * granule)[10 * granule + 512:]
    if store.caps.deallocated_reads_zero:
        assert got[2 * granule + 512:10 * granule + 512] == bytes(8 * granule)
    extents = store.extents(0, 16 * granule)
    check_cover(extents, 0, 16 * granule)
    if store.caps.thin:
        holes = [e for e in extents if not e.mapped]
        assert holes and holes[0].offset == 3 * granule  # the whole granules inside the range
        assert holes[0].offset + holes[0].length == 10 * granule


def test_zero_keeps_the_range_allocated(store: Backstore) -> None:
    store.write(memoryview(data(65536)), 0)
    store.zero(4096, 32768)
    assert read(store, 4096, 32768) == bytes(32768)
    assert all(e.mapped for e in store.extents(0, 65536))


def test_extents_cover_the_range_and_stop_at_the_end(store: Backstore) -> None:
    for at in (0, MiB, 3 * MiB + 65536, SIZE - 4096):
        store.write(memoryview(data(4096)), at)
    check_cover(store.extents(0, SIZE), 0, SIZE)
    check_cover(store.extents(MiB - 4096, 3 * MiB), MiB - 4096, 4 * MiB - 4096)
    check_cover(store.extents(SIZE - 8192, MiB), SIZE - 8192, SIZE)
    assert store.extents(SIZE, 4096) == []

    async def go() -> list[Extent]:
        return await store.aextents(0, SIZE)
    assert asyncio.run(go()) == store.extents(0, SIZE)


def test_allocated_bytes_follow_deallocation(store: Backstore) -> None:
    if not store.caps.thin:
        pytest.skip("not thin")
    store.write(memoryview(data(MiB)), MiB)
    store.flush()
    before = store.allocated_bytes()
    assert before >= MiB
    store.deallocate(MiB, MiB)
    assert store.allocated_bytes() <= before - MiB + store.caps.deallocate_granularity


def test_copy_offers_between_two_of_a_kind(make: Factory) -> None:
    src, dst = make("src"), make("dst")
    payload = data(4 * 65536, seed=11)
    src.write(memoryview(payload), 65536)
    src.flush()
    before = read(dst, 65536, len(payload))
    if dst.caps.clone:
        assert dst.caps.clone_alignment and 65536 % dst.caps.clone_alignment == 0
    if dst.clone_from(src, 65536, 65536, len(payload)):
        assert read(dst, 65536, len(payload)) == payload
    else:
        assert read(dst, 65536, len(payload)) == before
    if dst.copy_range_from(src, 65536, 2 * MiB, len(payload)):
        assert read(dst, 2 * MiB, len(payload)) == payload


def test_no_copy_offer_across_kinds(make: Factory, tmp_path: Path) -> None:
    dst = make("dst")
    other: Backstore
    if isinstance(dst, MemoryBackstore):
        other = _file(tmp_path)("other")
    else:
        other = MemoryBackstore(SIZE, name="other")
    other.write(memoryview(data(65536)), 0)
    try:
        assert dst.clone_from(other, 0, 0, 65536) is False
        assert dst.copy_range_from(other, 0, 0, 65536) is False
        assert read(dst, 0, 65536) == bytes(65536)
    finally:
        other.close()


def test_optional_atomic_calls_match_the_capabilities(store: Backstore) -> None:
    old, new = data(4096, seed=1), data(4096, seed=2)
    store.write(memoryview(old), 0)

    async def go() -> None:
        if not store.caps.compare_and_write_max:
            with pytest.raises(NotImplementedError):
                await store.acompare_and_write(memoryview(old), memoryview(new), 0)
        else:
            # offered for ranges up to compare_and_write_max (RBD: one 512-byte sector)
            n = min(4096, store.caps.compare_and_write_max)
            stale = bytearray(old[:n])
            stale[123] ^= 1
            assert await store.acompare_and_write(memoryview(stale), memoryview(new[:n]),
                                                  0) == 123
            assert read(store, 0, 4096) == old
            assert await store.acompare_and_write(memoryview(old[:n]), memoryview(new[:n]),
                                                  0) is None
            assert read(store, 0, n) == new[:n]
        unit = store.caps.atomic_write_unit_max
        if not unit:
            with pytest.raises(NotImplementedError):
                await store.awrite_atomic(memoryview(new), 0)
        else:
            assert store.caps.atomic_write_unit_min <= unit
            await store.awrite_atomic(memoryview(data(unit, seed=5)), unit)
            assert read(store, unit, unit) == data(unit, seed=5)
    asyncio.run(go())


def test_resize(store: Backstore) -> None:
    store.write(memoryview(data(4096)), SIZE - 4096)
    store.resize(SIZE + MiB)
    assert store.size == SIZE + MiB and store.medium_size() == SIZE + MiB
    assert read(store, SIZE - 4096, 4096) == data(4096)
    assert read(store, SIZE, MiB) == bytes(MiB)
    store.resize(SIZE)
    assert store.size == SIZE and store.medium_size() == SIZE


def test_close_twice(store: Backstore) -> None:
    store.close()
    store.close()
    assert store.closed


# -- the registry and building from plain parameters

def test_file_kind_by_configuration_key(tmp_path: Path) -> None:
    assert KINDS["file"] is FileBackstore and backstore_kind("file") is FileBackstore
    path = str(tmp_path / "sub" / "lun.img")
    assert provision_backstore("file", {"path": path}, SIZE) is True
    assert os.path.getsize(path) == SIZE and os.stat(path).st_blocks == 0
    assert provision_backstore("file", {"path": path}, 2 * SIZE) is False  # never touched
    store = open_backstore("file", {"path": path}, readonly=True)
    try:
        assert store.size == SIZE and store.readonly and store.location == path
        with pytest.raises(OSError):
            store.write(memoryview(bytes(512)), 0)
    finally:
        store.close()
    with pytest.raises(FileExistsError):
        FileBackstore.provision({"path": path}, SIZE)


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown backstore 'nbd'.*file"):
        backstore_kind("nbd")
    with pytest.raises(ValueError, match="needs 'path'"):
        open_backstore("file", {})
    with pytest.raises(ValueError, match="takes no 'pool'"):
        open_backstore("file", {"path": "/x", "pool": "rbd"})


def test_a_new_kind_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, "memory", MemoryBackstore)
    monkeypatch.setattr(MemoryBackstore, "media", {})
    assert provision_backstore("memory", {"name": "m", "granule": 65536}, SIZE) is True
    assert provision_backstore("memory", {"name": "m"}, SIZE) is False
    store = open_backstore("memory", {"name": "m"})
    assert store.size == SIZE and store.caps.deallocate_granularity == 65536
    with pytest.raises(FileNotFoundError):
        open_backstore("memory", {"name": "absent"})


# -- the I/O threads

def test_a_cancelled_caller_waits_for_its_blocking_work() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def work() -> None:
        started.set()
        release.wait()
        finished.append("work")

    async def go() -> None:
        caller = asyncio.ensure_future(run_blocking(work))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        assert io_threads_busy()
        caller.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
        assert not caller.done()  # still waiting for the thread, whose buffers it may own
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert finished == ["work"]
    asyncio.run(go())
    assert not io_threads_busy()


def test_errors_are_oserror(tmp_path: Path) -> None:
    path = str(tmp_path / "lun.img")
    FileBackstore.create(path, SIZE)
    store = FileBackstore(path, readonly=True)
    try:
        with pytest.raises(OSError) as info:
            store.write(memoryview(bytes(512)), 0)
        assert info.value.errno == errno.EBADF
    finally:
        store.close()
