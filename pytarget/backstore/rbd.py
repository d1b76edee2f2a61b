"""A logical unit's blocks in one Ceph RBD image, reached through librbd's C API.

Everything goes through ctypes on librados.so.2 and librbd.so.1, over ONE image handle per
open: Debian's Python binding hides the C `rbd_image_t`, and COMPARE AND WRITE and WRITE SAME
(`rbd_aio_compare_and_write`, `rbd_aio_writesame`) exist only in C; a second handle opened
beside the binding's would be a second exclusive-lock owner in the same process and make the
lock move at every write. The C API also reads straight into the caller's buffer.

I/O is asynchronous: each call submits an `rbd_aio_*` request with a completion whose callback
librbd runs on its own thread; the callback only hands the return value to the event loop
(`call_soon_threadsafe`), which resolves the request's future. A caller that is cancelled
stops waiting, but the request's future, its buffers and `close` still wait for librbd.
Opening, closing, snapshots and `rbd_diff_iterate2` are synchronous in librbd and run on a
worker thread (ctypes releases the GIL around every C call). Failures are raised as OSError
with librbd's errno, except the two outcomes of COMPARE AND WRITE that the device server
turns into their own sense data: a miscompare is a returned offset, a range librbd cannot
compare and write atomically (more than one 512-byte sector, see CAW_SECTOR) is
CompareAndWriteRefused.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_CONF = "/etc/ceph/ceph.conf"

# librbd options a SCSI target needs: no client cache, so that a completed WRITE is on the
# OSDs (what SYNCHRONIZE CACHE and FUA promise) and another gateway reading after it sees it.
TARGET_OPTIONS = {"rbd_cache": "false"}

_completion_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_diff_cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p)


class _ImageInfo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("obj_size", ctypes.c_uint64),
        ("num_objs", ctypes.c_uint64),
        ("order", ctypes.c_int),
        ("block_name_prefix", ctypes.c_char * 24),
        ("parent_pool", ctypes.c_int64),
        ("parent_name", ctypes.c_char * 96),
    ]


class _SnapInfo(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("size", ctypes.c_uint64), ("name", ctypes.c_char_p)]


# librbd 16.2 compares and writes atomically only inside one 512-byte sector of one stripe
# unit (ImageCompareAndWriteRequest::prune_object_extents); anything else is EINVAL.
CAW_SECTOR = 512


class CompareAndWriteRefused(ValueError):
    """COMPARE AND WRITE over a range librbd cannot compare and write atomically: one that
    leaves a CAW_SECTOR-aligned sector, a stripe unit or an object."""

    def __init__(self, offset: int, length: int, unit: int) -> None:
        super().__init__(f"compare-and-write of {length} bytes at {offset} leaves its "
                         f"{unit}-byte atomic unit")
        self.offset = offset
        self.length = length
        self.unit = unit


def _errno_error(ret: int, what: str) -> OSError:
    return OSError(-ret, f"{what}: {os.strerror(-ret)}")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise _errno_error(ret, what)
    return ret


class _Lib:
    """librados and librbd with the prototypes used here, loaded once per process."""

    _instance: _Lib | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        vp, u64, sz, i, cp = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                              ctypes.c_int, ctypes.c_char_p)
        rados = ctypes.CDLL("librados.so.2")
        rbd = ctypes.CDLL("librbd.so.1")
        self.rados = rados
        self.rbd = rbd
        prototypes: list[tuple[Any, str, Any, list[Any]]] = [
            (rados, "rados_create", i, [ctypes.POINTER(vp), cp]),
            (rados, "rados_conf_read_file", i, [vp, cp]),
            (rados, "rados_conf_set", i, [vp, cp, cp]),
            (rados, "rados_conf_get", i, [vp, cp, cp, sz]),
            (rados, "rados_connect", i, [vp]),
            (rados, "rados_shutdown", None, [vp]),
            (rados, "rados_ioctx_create", i, [vp, cp, ctypes.POINTER(vp)]),
            (rados, "rados_ioctx_destroy", None, [vp]),
            (rbd, "rbd_version", None, [ctypes.POINTER(i)] * 3),
            (rbd, "rbd_create", i, [vp, cp, u64, ctypes.POINTER(i)]),
            (rbd, "rbd_remove", i, [vp, cp]),
            (rbd, "rbd_open", i, [vp, cp, ctypes.POINTER(vp), cp]),
            (rbd, "rbd_close", i, [vp]),
            (rbd, "rbd_stat", i, [vp, ctypes.POINTER(_ImageInfo), sz]),
            (rbd, "rbd_get_size", i, [vp, ctypes.POINTER(u64)]),
            (rbd, "rbd_get_features", i, [vp, ctypes.POINTER(u64)]),
            (rbd, "rbd_get_stripe_unit", i, [vp, ctypes.POINTER(u64)]),
            (rbd, "rbd_aio_create_completion", i, [vp, _completion_cb, ctypes.POINTER(vp)]),
            (rbd, "rbd_aio_get_return_value", ctypes.c_ssize_t, [vp]),
            (rbd, "rbd_aio_release", None, [vp]),
            (rbd, "rbd_aio_read", i, [vp, u64, sz, vp, vp]),
            (rbd, "rbd_aio_write", i, [vp, u64, sz, vp, vp]),
            (rbd, "rbd_aio_flush", i, [vp, vp]),
            (rbd, "rbd_aio_discard", i, [vp, u64, u64, vp]),
            (rbd, "rbd_aio_write_zeroes", i, [vp, u64, sz, vp, i, i]),
            (rbd, "rbd_aio_writesame", i, [vp, u64, sz, vp, sz, vp, i]),
            (rbd, "rbd_aio_compare_and_write", ctypes.c_ssize_t,
             [vp, u64, sz, vp, vp, vp, ctypes.POINTER(u64), i]),
            (rbd, "rbd_diff_iterate2", i, [vp, cp, u64, u64, ctypes.c_uint8, ctypes.c_uint8,
                                           _diff_cb, vp]),
            (rbd, "rbd_snap_create", i, [vp, cp]),
            (rbd, "rbd_snap_remove", i, [vp, cp]),
            (rbd, "rbd_snap_list", i, [vp, ctypes.POINTER(_SnapInfo), ctypes.POINTER(i)]),
            (rbd, "rbd_snap_list_end", None, [ctypes.POINTER(_SnapInfo)]),
        ]
        for lib, name, restype, argtypes in prototypes:
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
            setattr(self, name, function)
        self.on_complete = _completion_cb(_on_complete)

    def __getattr__(self, name: str) -> Any:
        """The C functions set in __init__, by name (declared here for the type checker)."""
        raise AttributeError(name)

    @classmethod
    def get(cls) -> _Lib:
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Lib()
            return cls._instance


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int]
    keep: tuple[Any, ...]


_pending: dict[int, _Pending] = {}
_ids = itertools.count(1)


def _settle(future: asyncio.Future[int], ret: int) -> None:
    if not future.done():
        future.set_result(ret)


def _on_complete(completion: int | None, arg: int | None) -> None:
    """librbd's completion callback, on a librbd thread: hand the result to the loop."""
    lib = _Lib._instance
    assert lib is not None
    ret = int(lib.rbd_aio_get_return_value(completion))
    lib.rbd_aio_release(completion)
    pending = _pending.pop(arg or 0, None)
    if pending is None:
        return
    try:
        pending.loop.call_soon_threadsafe(_settle, pending.future, ret)
    except RuntimeError:
        pass


def _address(buffer: Any) -> tuple[int, Any]:
    """The address of a contiguous buffer (read-only or not) and the object keeping it alive."""
    array = np.frombuffer(buffer, dtype=np.uint8)
    return int(array.ctypes.data), array


@dataclass
class RbdImage:
    """One open RBD image. Create with `await RbdImage.open(...)`; end with `await close()`."""

    pool: str
    name: str
    size: int
    caps: dict[str, Any]
    _lib: _Lib
    _cluster: ctypes.c_void_p
    _ioctx: ctypes.c_void_p
    _image: ctypes.c_void_p
    _in_flight: set[asyncio.Future[int]] = field(default_factory=set)
    _closed: bool = False

    @classmethod
    async def open(cls, pool: str, name: str, *, conf: str = DEFAULT_CONF,
                   keyring: str | None = None, client_id: str = "admin",
                   size: int | None = None, options: dict[str, str] | None = None
                   ) -> RbdImage:
        """Connect as client.`client_id` with `conf` (and `keyring` if given) and open
        `pool`/`name`, creating it with `size` bytes if it does not exist and `size` is given.
        `options` are librados/librbd configuration values over TARGET_OPTIONS."""
        settings = dict(TARGET_OPTIONS)
        if keyring is not None:
            settings["keyring"] = keyring
        settings.update(options or {})
        return await asyncio.to_thread(cls._open_sync, pool, name, conf, client_id, size,
                                       settings)

    @classmethod
    def _open_sync(cls, pool: str, name: str, conf: str, client_id: str, size: int | None,
                   settings: dict[str, str]) -> RbdImage:
        lib = _Lib.get()
        cluster = ctypes.c_void_p()
        _check(lib.rados_create(ctypes.byref(cluster), client_id.encode()), "rados_create")
        ioctx = ctypes.c_void_p()
        image = ctypes.c_void_p()
        try:
            _check(lib.rados_conf_read_file(cluster, conf.encode()), f"reading {conf}")
            for key, value in settings.items():
                _check(lib.rados_conf_set(cluster, key.encode(), value.encode()),
                       f"setting {key}")
            _check(lib.rados_connect(cluster), f"connecting to the cluster of {conf}")
            _check(lib.rados_ioctx_create(cluster, pool.encode(), ctypes.byref(ioctx)),
                   f"opening pool {pool}")
            ret = lib.rbd_open(ioctx, name.encode(), ctypes.byref(image), None)
            if ret == -errno.ENOENT and size is not None:
                order = ctypes.c_int(0)
                ret = lib.rbd_create(ioctx, name.encode(), size, ctypes.byref(order))
                if ret not in (0, -errno.EEXIST):
                    _check(ret, f"creating image {pool}/{name}")
                ret = lib.rbd_open(ioctx, name.encode(), ctypes.byref(image), None)
            _check(ret, f"opening image {pool}/{name}")
            info = _ImageInfo()
            _check(lib.rbd_stat(image, ctypes.byref(info), ctypes.sizeof(info)), "rbd_stat")
            features = ctypes.c_uint64()
            _check(lib.rbd_get_features(image, ctypes.byref(features)), "rbd_get_features")
            stripe_unit = ctypes.c_uint64()
            _check(lib.rbd_get_stripe_unit(image, ctypes.byref(stripe_unit)),
                   "rbd_get_stripe_unit")
            caps = {
                "object_size": int(info.obj_size),
                "discard_granularity": _conf_int(lib, cluster, "rbd_discard_granularity_bytes"),
                "skip_partial_discard": _conf_get(lib, cluster, "rbd_skip_partial_discard")
                == "true",
                "stripe_unit": int(stripe_unit.value),
                "caw_atomic_max": min(CAW_SECTOR, int(stripe_unit.value) or CAW_SECTOR),
                "features": int(features.value),
            }
        except BaseException:
            if image.value:
                lib.rbd_close(image)
            if ioctx.value:
                lib.rados_ioctx_destroy(ioctx)
            lib.rados_shutdown(cluster)
            raise
        return cls(pool, name, int(info.size), caps, lib, cluster, ioctx, image)

    def _submit(self, start: Callable[[ctypes.c_void_p], int], what: str,
                *keep: Any) -> asyncio.Future[int]:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.pool}/{self.name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        key = next(_ids)
        completion = ctypes.c_void_p()
        _check(self._lib.rbd_aio_create_completion(key, self._lib.on_complete,
                                                   ctypes.byref(completion)),
               "rbd_aio_create_completion")
        _pending[key] = _Pending(loop, future, keep)
        ret = start(completion)
        if ret < 0:
            _pending.pop(key, None)
            self._lib.rbd_aio_release(completion)
            raise _errno_error(ret, what)
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        return future

    async def _run(self, start: Callable[[ctypes.c_void_p], int], what: str,
                   *keep: Any) -> int:
        return _check(await asyncio.shield(self._submit(start, what, *keep)), what)

    async def read(self, buf: Any, offset: int) -> int:
        """Fill the writable buffer `buf` from `offset`; returns the byte count."""
        address, keep = _address(buf)
        length = len(keep)
        return await self._run(
            lambda c: self._lib.rbd_aio_read(self._image, offset, length, address, c),
            f"read of {length} at {offset}", keep)

    async def write(self, data: Any, offset: int) -> int:
        """Write the buffer `data` at `offset`; returns the byte count."""
        address, keep = _address(data)
        length = len(keep)
        await self._run(
            lambda c: self._lib.rbd_aio_write(self._image, offset, length, address, c),
            f"write of {length} at {offset}", keep)
        return length

    async def flush(self) -> None:
        await self._run(lambda c: self._lib.rbd_aio_flush(self._image, c), "flush")

    async def deallocate(self, offset: int, length: int) -> None:
        """Discard: librbd frees whole `discard_granularity` units inside the range and
        leaves the rest as it was (caps["discard_granularity"]; see docs/ceph.md)."""
        await self._run(
            lambda c: self._lib.rbd_aio_discard(self._image, offset, length, c),
            f"discard of {length} at {offset}")

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._run(
            lambda c: self._lib.rbd_aio_write_zeroes(self._image, offset, length, c, 0, 0),
            f"write-zeroes of {length} at {offset}")

    async def write_same(self, offset: int, length: int, data: Any) -> None:
        """Repeat `data` over `length` bytes from `offset`; `length` must be a multiple of
        len(data)."""
        address, keep = _address(data)
        pattern = len(keep)
        if pattern == 0 or length % pattern:
            raise ValueError(f"write-same length {length} is not a multiple of {pattern}")
        await self._run(
            lambda c: self._lib.rbd_aio_writesame(self._image, offset, length, address,
                                                  pattern, c, 0),
            f"write-same of {length} at {offset}", keep)

    async def compare_and_write(self, offset: int, expected: Any, data: Any) -> int | None:
        """Atomically write `data` at `offset` if the image holds `expected` there, across
        every client of the image. Returns None when written, else the offset of the first
        differing byte relative to `offset`. The range must lie inside one aligned
        caps["caw_atomic_max"]-byte unit, or CompareAndWriteRefused is raised."""
        cmp_address, cmp_keep = _address(expected)
        address, keep = _address(data)
        length = len(cmp_keep)
        if len(keep) != length:
            raise ValueError(f"compare-and-write buffers differ in length: {length} "
                             f"and {len(keep)}")
        mismatch = ctypes.c_uint64(0)
        ret = await asyncio.shield(self._submit(
            lambda c: self._lib.rbd_aio_compare_and_write(
                self._image, offset, length, cmp_address, address, c,
                ctypes.byref(mismatch), 0),
            f"compare-and-write of {length} at {offset}", cmp_keep, keep, mismatch))
        if ret == -errno.EILSEQ:
            return self._miscompare_index(int(mismatch.value), offset, length)
        unit = self.caps["caw_atomic_max"]
        if ret == -errno.EINVAL and (length == 0
                                     or offset // unit != (offset + length - 1) // unit):
            raise CompareAndWriteRefused(offset, length, unit)
        _check(ret, f"compare-and-write of {length} at {offset}")
        return None

    def _miscompare_index(self, reported: int, offset: int, length: int) -> int:
        """librbd 16.2 maps the OSD's index into the compared buffer back to the image as if
        it were an offset inside the object: it reports the object's first byte plus the
        index, not `offset` plus the index (measured; see docs/ceph.md). A librbd that
        reports `offset` plus the index is recognised too."""
        object_start = offset - offset % self.caps["object_size"]
        index = reported - object_start
        if 0 <= index < length:
            return index
        return reported - offset

    async def extents(self, offset: int = 0, length: int | None = None
                      ) -> list[tuple[int, int]]:
        """Ranges that may hold data inside the range, sorted and merged; everything else
        reads as zeroes. From `rbd_diff_iterate2` since the beginning of time, not whole
        objects: librbd reports each existing object from its start to its length, so a
        hole inside an object (never written, or discarded short of the object's end) counts
        as allocated; objects never written, removed, or truncated by a discard are holes.
        Never a hole where there is data: what GET LBA STATUS may call mapped or unknown."""
        if length is None:
            length = self.size - offset
        return await asyncio.to_thread(self._extents_sync, offset, length)

    def _extents_sync(self, offset: int, length: int) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []

        def collect(start: int, count: int, exists: int, _arg: Any) -> int:
            if exists:
                if found and found[-1][0] + found[-1][1] == start:
                    found[-1] = (found[-1][0], found[-1][1] + count)
                else:
                    found.append((start, count))
            return 0

        callback = _diff_cb(collect)
        _check(self._lib.rbd_diff_iterate2(self._image, None, offset, length, 0, 0, callback,
                                           None), "rbd_diff_iterate2")
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, count in found:
            if merged and merged[-1][0] + merged[-1][1] >= start:
                end = max(merged[-1][0] + merged[-1][1], start + count)
                merged[-1] = (merged[-1][0], end - merged[-1][0])
            else:
                merged.append((start, count))
        return merged

    async def allocated_bytes(self) -> int:
        return sum(count for _, count in await self.extents())

    async def snapshot_create(self, name: str) -> None:
        await asyncio.to_thread(lambda: _check(
            self._lib.rbd_snap_create(self._image, name.encode()), f"creating snapshot {name}"))

    async def snapshot_remove(self, name: str) -> None:
        await asyncio.to_thread(lambda: _check(
            self._lib.rbd_snap_remove(self._image, name.encode()), f"removing snapshot {name}"))

    async def snapshots(self) -> list[tuple[str, int, int]]:
        """(name, id, size) of each snapshot of the image."""
        return await asyncio.to_thread(self._snapshots_sync)

    def _snapshots_sync(self) -> list[tuple[str, int, int]]:
        capacity = 16
        while True:
            count = ctypes.c_int(capacity)
            snaps = (_SnapInfo * capacity)()
            ret = self._lib.rbd_snap_list(self._image, snaps, ctypes.byref(count))
            if ret == -errno.ERANGE:
                capacity = max(count.value, capacity * 2)
                continue
            _check(ret, "rbd_snap_list")
            try:
                return [(snaps[n].name.decode(), int(snaps[n].id), int(snaps[n].size))
                        for n in range(ret)]
            finally:
                self._lib.rbd_snap_list_end(snaps)

    async def close(self) -> None:
        """Wait for the requests in flight, then close the image and the cluster handle."""
        if self._closed:
            return
        self._closed = True
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self._lib.rbd_close(self._image)
        self._lib.rados_ioctx_destroy(self._ioctx)
        self._lib.rados_shutdown(self._cluster)


def _conf_get(lib: _Lib, cluster: ctypes.c_void_p, key: str) -> str:
    value = ctypes.create_string_buffer(256)
    _check(lib.rados_conf_get(cluster, key.encode(), value, len(value)), f"reading {key}")
    return value.value.decode()


def _conf_int(lib: _Lib, cluster: ctypes.c_void_p, key: str) -> int:
    return int(_conf_get(lib, cluster, key))


async def remove_image(pool: str, name: str, *, conf: str = DEFAULT_CONF,
                       keyring: str | None = None, client_id: str = "admin") -> None:
    """Delete `pool`/`name` (its snapshots must be gone first)."""
    def remove() -> None:
        lib = _Lib.get()
        cluster = ctypes.c_void_p()
        _check(lib.rados_create(ctypes.byref(cluster), client_id.encode()), "rados_create")
        ioctx = ctypes.c_void_p()
        try:
            _check(lib.rados_conf_read_file(cluster, conf.encode()), f"reading {conf}")
            if keyring is not None:
                _check(lib.rados_conf_set(cluster, b"keyring", keyring.encode()), "keyring")
            _check(lib.rados_connect(cluster), "connecting")
            _check(lib.rados_ioctx_create(cluster, pool.encode(), ctypes.byref(ioctx)),
                   f"opening pool {pool}")
            _check(lib.rbd_remove(ioctx, name.encode()), f"removing image {pool}/{name}")
        finally:
            if ioctx.value:
                lib.rados_ioctx_destroy(ioctx)
            lib.rados_shutdown(cluster)
    await asyncio.to_thread(remove)
