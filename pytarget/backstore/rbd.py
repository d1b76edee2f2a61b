"""A logical unit's blocks in one Ceph RBD image, reached through librbd's C API: `RbdImage`
(librbd's calls) and `RbdBackstore` (`backstore: rbd`, the backstore interface on it).

Everything goes through ctypes on librados.so.2 and librbd.so.1, over ONE image handle per
open: Debian's Python binding hides the C `rbd_image_t`, and COMPARE AND WRITE and WRITE SAME
(`rbd_aio_compare_and_write`, `rbd_aio_writesame`) exist only in C; a second handle opened
beside the binding's would be a second exclusive-lock owner in the same process and make the
lock move at every write. The C API also reads straight into the caller's buffer.

I/O is asynchronous: each call submits an `rbd_aio_*` request with a completion whose callback
librbd runs on its own thread; the callback only hands the return value to the event loop
(`call_soon_threadsafe`), which resolves the request's future, and is counted as work in
flight for the event loop's polling (`threads.io_started`). A caller that is cancelled still
waits for librbd to finish with its buffers, and so does `close`.
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
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import rados_copy, threads
from .base import Backstore, Capabilities, Extent, ReadHook
from .lazy import Lazy
from .librados import DEFAULT_CONF, LIBRADOS, check, connect, declare, errno_error, load

# librbd options a SCSI target needs: no client cache, so that a completed WRITE is on the
# OSDs (what SYNCHRONIZE CACHE and FUA promise) and another gateway reading after it sees it.
TARGET_OPTIONS = {"rbd_cache": "false"}

_completion_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_diff_cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p)

_NO_CALLBACK = _completion_cb()  # NULL: a completion that is waited for


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


# Image features (librbd.h RBD_FEATURE_*) a gateway turns off: see
# RbdImage.allow_concurrent_writers_blocking.
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2
RBD_FEATURE_OBJECT_MAP = 1 << 3
RBD_FEATURE_FAST_DIFF = 1 << 4
RBD_FEATURE_JOURNALING = 1 << 6

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


class _Lib:
    """librbd with the prototypes used here, loaded once per process, over the process's one
    librados (`librados.LIBRADOS`), whose functions it also answers for."""

    def __init__(self) -> None:
        vp, u64, sz, i, cp = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                              ctypes.c_int, ctypes.c_char_p)
        self.rados = LIBRADOS.get()
        declare(self, load("librbd.so.1"), [
            ("rbd_version", None, [ctypes.POINTER(i)] * 3),
            ("rbd_create", i, [vp, cp, u64, ctypes.POINTER(i)]),
            ("rbd_remove", i, [vp, cp]),
            ("rbd_open", i, [vp, cp, ctypes.POINTER(vp), cp]),
            ("rbd_close", i, [vp]),
            ("rbd_stat", i, [vp, ctypes.POINTER(_ImageInfo), sz]),
            ("rbd_get_size", i, [vp, ctypes.POINTER(u64)]),
            ("rbd_get_features", i, [vp, ctypes.POINTER(u64)]),
            ("rbd_get_stripe_unit", i, [vp, ctypes.POINTER(u64)]),
            ("rbd_get_stripe_count", i, [vp, ctypes.POINTER(u64)]),
            ("rbd_get_block_name_prefix", i, [vp, cp, sz]),
            ("rbd_get_data_pool_id", ctypes.c_int64, [vp]),
            ("rbd_aio_wait_for_complete", i, [vp]),
            ("rbd_aio_create_completion", i, [vp, _completion_cb, ctypes.POINTER(vp)]),
            ("rbd_aio_get_return_value", ctypes.c_ssize_t, [vp]),
            ("rbd_aio_release", None, [vp]),
            ("rbd_aio_read", i, [vp, u64, sz, vp, vp]),
            ("rbd_aio_write", i, [vp, u64, sz, vp, vp]),
            ("rbd_aio_flush", i, [vp, vp]),
            ("rbd_aio_discard", i, [vp, u64, u64, vp]),
            ("rbd_aio_write_zeroes", i, [vp, u64, sz, vp, i, i]),
            ("rbd_aio_writesame", i, [vp, u64, sz, vp, sz, vp, i]),
            ("rbd_aio_compare_and_write", ctypes.c_ssize_t,
             [vp, u64, sz, vp, vp, vp, ctypes.POINTER(u64), i]),
            ("rbd_diff_iterate2", i, [vp, cp, u64, u64, ctypes.c_uint8, ctypes.c_uint8,
                                      _diff_cb, vp]),
            ("rbd_snap_create", i, [vp, cp]),
            ("rbd_snap_remove", i, [vp, cp]),
            ("rbd_snap_list", i, [vp, ctypes.POINTER(_SnapInfo), ctypes.POINTER(i)]),
            ("rbd_snap_list_end", None, [ctypes.POINTER(_SnapInfo)]),
            ("rbd_snap_rollback", i, [vp, cp]),
            ("rbd_snap_protect", i, [vp, cp]),
            ("rbd_snap_unprotect", i, [vp, cp]),
            ("rbd_snap_is_protected", i, [vp, cp, ctypes.POINTER(i)]),
            ("rbd_clone", i, [vp, cp, cp, vp, cp, u64, ctypes.POINTER(i)]),
            ("rbd_open_read_only", i, [vp, cp, ctypes.POINTER(vp), cp]),
            ("rbd_read", ctypes.c_ssize_t, [vp, u64, sz, vp]),
            ("rbd_write", ctypes.c_ssize_t, [vp, u64, sz, vp]),
            ("rbd_flush", i, [vp]),
            ("rbd_discard", i, [vp, u64, u64]),
            ("rbd_write_zeroes", ctypes.c_ssize_t, [vp, u64, sz, i, i]),
            ("rbd_resize", i, [vp, u64]),
            ("rbd_update_features", i, [vp, u64, ctypes.c_uint8]),
        ])
        self.on_complete = _completion_cb(_on_complete)

    def __getattr__(self, name: str) -> Any:
        """librados's C functions (librbd's are set in __init__)."""
        if name == "rados":
            raise AttributeError(name)
        return getattr(self.rados, name)


_LIB = Lazy(_Lib)


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
    lib = _LIB.get()
    ret = int(lib.rbd_aio_get_return_value(completion))
    lib.rbd_aio_release(completion)
    pending = _pending.pop(arg or 0, None)
    if pending is None:
        return
    try:
        pending.loop.call_soon_threadsafe(_settle, pending.future, ret)
    except RuntimeError:
        pass


async def _until_complete(future: asyncio.Future[int]) -> int:
    """The request's result; a caller cancelled meanwhile still waits for librbd to finish
    with its buffers before the cancellation goes on."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


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
    _objects: tuple[ctypes.c_void_p, rados_copy.IoCtx] | None = None  # see _data_ioctx
    _objects_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    async def open(cls, pool: str, name: str, *, conf: str = DEFAULT_CONF,
                   keyring: str | None = None, client_id: str = "admin",
                   size: int | None = None, options: dict[str, str] | None = None
                   ) -> RbdImage:
        """Connect as client.`client_id` with `conf` (and `keyring` if given) and open
        `pool`/`name`, creating it with `size` bytes if it does not exist and `size` is given.
        `options` are librados/librbd configuration values over TARGET_OPTIONS."""
        return await asyncio.to_thread(cls.open_blocking, pool, name, conf=conf,
                                       keyring=keyring, client_id=client_id, size=size,
                                       options=options)

    @classmethod
    def open_blocking(cls, pool: str, name: str, *, conf: str = DEFAULT_CONF,
                      keyring: str | None = None, client_id: str = "admin",
                      size: int | None = None, options: dict[str, str] | None = None,
                      object_size: int = 0, snapshot: str | None = None) -> RbdImage:
        """`open`, on the calling thread; a created image has objects of `object_size`
        bytes (a power of two from 4 KiB; 0: librbd's default, 4 MiB). With `snapshot`, the
        image as that snapshot holds it, read-only (no exclusive lock taken)."""
        lib = _LIB.get()
        cluster, ioctx = _connect(lib, pool, conf, keyring, client_id, options)
        image = ctypes.c_void_p()
        try:
            if snapshot is not None:
                ret = lib.rbd_open_read_only(ioctx, name.encode(), ctypes.byref(image),
                                             snapshot.encode())
                check(ret, f"opening snapshot {pool}/{name}@{snapshot}")
            else:
                ret = lib.rbd_open(ioctx, name.encode(), ctypes.byref(image), None)
            if ret == -errno.ENOENT and size is not None:
                ret = _create(lib, ioctx, name, size, object_size)
                if ret not in (0, -errno.EEXIST):
                    check(ret, f"creating image {pool}/{name}")
                ret = lib.rbd_open(ioctx, name.encode(), ctypes.byref(image), None)
            check(ret, f"opening image {pool}/{name}")
            info = _ImageInfo()
            check(lib.rbd_stat(image, ctypes.byref(info), ctypes.sizeof(info)), "rbd_stat")
            features = ctypes.c_uint64()
            check(lib.rbd_get_features(image, ctypes.byref(features)), "rbd_get_features")
            stripe_unit = ctypes.c_uint64()
            check(lib.rbd_get_stripe_unit(image, ctypes.byref(stripe_unit)),
                  "rbd_get_stripe_unit")
            stripe_count = ctypes.c_uint64()
            check(lib.rbd_get_stripe_count(image, ctypes.byref(stripe_count)),
                  "rbd_get_stripe_count")
            prefix = ctypes.create_string_buffer(128)
            check(lib.rbd_get_block_name_prefix(image, prefix, len(prefix)),
                  "rbd_get_block_name_prefix")
            fsid = ctypes.create_string_buffer(64)
            check(lib.rados_cluster_fsid(cluster, fsid, len(fsid)), "rados_cluster_fsid")
            caps = {
                "object_size": int(info.obj_size),
                "discard_granularity": _conf_int(lib, cluster, "rbd_discard_granularity_bytes"),
                "skip_partial_discard": _conf_get(lib, cluster, "rbd_skip_partial_discard")
                == "true",
                "stripe_unit": int(stripe_unit.value),
                "caw_atomic_max": min(CAW_SECTOR, int(stripe_unit.value) or CAW_SECTOR),
                "features": int(features.value),
                "stripe_count": int(stripe_count.value),
                "block_name_prefix": prefix.value.decode(),
                "data_pool_id": int(check(lib.rbd_get_data_pool_id(image),
                                          "rbd_get_data_pool_id")),
                "fsid": fsid.value.decode(),
            }
        except BaseException:
            if image.value:
                lib.rbd_close(image)
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
        check(self._lib.rbd_aio_create_completion(key, self._lib.on_complete,
                                                  ctypes.byref(completion)),
              "rbd_aio_create_completion")
        _pending[key] = _Pending(loop, future, keep)
        ret = start(completion)
        if ret < 0:
            _pending.pop(key, None)
            self._lib.rbd_aio_release(completion)
            raise errno_error(ret, what)
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        threads.io_started()
        future.add_done_callback(threads.io_finished)
        return future

    async def _run(self, start: Callable[[ctypes.c_void_p], int], what: str,
                   *keep: Any) -> int:
        return check(await _until_complete(self._submit(start, what, *keep)), what)

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
        ret = await _until_complete(self._submit(
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
        check(ret, f"compare-and-write of {length} at {offset}")
        return None

    def _miscompare_index(self, reported: int, offset: int, length: int) -> int:
        """librbd 16.2 maps the OSD's index into the compared buffer back to the image as if
        it were an offset inside the object: it reports the object's first byte plus the
        index, not `offset` plus the index (measured; see docs/ceph.md). A librbd that
        reports `offset` plus the index is recognised too."""
        object_start = offset - offset % int(self.caps["object_size"])
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
        # include_parent = 1: a clone's data still in its parent is data, not a hole
        check(self._lib.rbd_diff_iterate2(self._image, None, offset, length, 1, 0, callback,
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
        await asyncio.to_thread(lambda: check(
            self._lib.rbd_snap_create(self._image, name.encode()), f"creating snapshot {name}"))

    async def snapshot_remove(self, name: str) -> None:
        await asyncio.to_thread(lambda: check(
            self._lib.rbd_snap_remove(self._image, name.encode()), f"removing snapshot {name}"))

    def snapshot_create_blocking(self, name: str) -> None:
        check(self._lib.rbd_snap_create(self._handle(), name.encode()),
              f"creating snapshot {self.pool}/{self.name}@{name}")

    def snapshot_remove_blocking(self, name: str) -> None:
        """Remove a snapshot, unprotecting it first; EBUSY while clones depend on it."""
        image = self._handle()
        if self._protected(name):
            check(self._lib.rbd_snap_unprotect(image, name.encode()),
                  f"unprotecting snapshot {self.pool}/{self.name}@{name} (does a clone "
                  "still depend on it? flatten or remove the clone first)")
        check(self._lib.rbd_snap_remove(image, name.encode()),
              f"removing snapshot {self.pool}/{self.name}@{name}")

    def _protected(self, name: str) -> bool:
        flag = ctypes.c_int()
        check(self._lib.rbd_snap_is_protected(self._handle(), name.encode(),
                                              ctypes.byref(flag)),
              f"snapshot {self.pool}/{self.name}@{name}")
        return bool(flag.value)

    def snapshot_rollback_blocking(self, name: str) -> None:
        check(self._lib.rbd_snap_rollback(self._handle(), name.encode()),
              f"rolling {self.pool}/{self.name} back to {name}")
        self.size = self.size_now()

    def snapshot_clone_blocking(self, name: str, pool: str, image: str) -> None:
        """A copy-on-write child `pool`/`image` of snapshot `name` (protected first, as
        clone format 1 requires; FileExistsError when the child exists)."""
        handle = self._handle()
        if not self._protected(name):
            check(self._lib.rbd_snap_protect(handle, name.encode()),
                  f"protecting snapshot {self.pool}/{self.name}@{name}")
        ioctx = self._ioctx
        child = ctypes.c_void_p()
        if pool != self.pool:
            check(self._lib.rados_ioctx_create(self._cluster, pool.encode(),
                                               ctypes.byref(child)), f"opening pool {pool}")
            ioctx = child
        try:
            features = ctypes.c_uint64()
            check(self._lib.rbd_get_features(handle, ctypes.byref(features)),
                  "rbd_get_features")
            order = ctypes.c_int(0)
            check(self._lib.rbd_clone(self._ioctx, self.name.encode(), name.encode(), ioctx,
                                      image.encode(), features.value, ctypes.byref(order)),
                  f"cloning {self.pool}/{self.name}@{name} to {pool}/{image}")
        finally:
            if child.value:
                self._lib.rados_ioctx_destroy(child)

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
            check(ret, "rbd_snap_list")
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

    def close_blocking(self) -> None:
        """Close on the calling thread; librbd finishes the requests in flight first."""
        if self._closed:
            return
        self._closed = True
        self._close_sync()

    @property
    def closed(self) -> bool:
        return self._closed

    def _close_sync(self) -> None:
        self._lib.rbd_close(self._image)
        if self._objects is not None:
            self._objects[1].close()
            self._lib.rados_ioctx_destroy(self._objects[0])
            self._objects = None
        self._lib.rados_ioctx_destroy(self._ioctx)
        self._lib.rados_shutdown(self._cluster)

    # -- blocking calls, for worker threads (librbd waits for its own completion)
    def _handle(self) -> ctypes.c_void_p:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.pool}/{self.name} is closed")
        return self._image

    def read_blocking(self, buf: Any, offset: int) -> None:
        address, keep = _address(buf)
        what = f"read of {len(keep)} at {offset}"
        got = check(self._lib.rbd_read(self._handle(), offset, len(keep), address), what)
        if got != len(keep):
            raise OSError(errno.EIO, f"{what}: {got} bytes")

    def write_blocking(self, data: Any, offset: int) -> None:
        address, keep = _address(data)
        what = f"write of {len(keep)} at {offset}"
        done = check(self._lib.rbd_write(self._handle(), offset, len(keep), address), what)
        if done != len(keep):
            raise OSError(errno.EIO, f"{what}: {done} bytes")

    def flush_blocking(self) -> None:
        check(self._lib.rbd_flush(self._handle()), "flush")

    def discard_blocking(self, offset: int, length: int) -> None:
        check(self._lib.rbd_discard(self._handle(), offset, length),
              f"discard of {length} at {offset}")

    def write_zeroes_blocking(self, offset: int, length: int) -> None:
        check(self._lib.rbd_write_zeroes(self._handle(), offset, length, 0, 0),
              f"write-zeroes of {length} at {offset}")

    def extents_blocking(self, offset: int, length: int) -> list[tuple[int, int]]:
        """`extents`, on the calling thread."""
        self._handle()
        return self._extents_sync(offset, length)

    def object_name(self, number: int) -> str:
        """The RADOS name of the image's data object `number` (rbd_data.<id>.<16 hex>)."""
        return f"{self.caps['block_name_prefix']}.{number:016x}"

    def _data_ioctx(self) -> rados_copy.IoCtx:
        """A C++ IoCtx on the pool holding the image's data objects, made at first use and
        closed with the image."""
        with self._objects_lock:
            self._handle()
            if self._objects is None:
                c_ioctx = ctypes.c_void_p()
                check(self._lib.rados_ioctx_create2(self._cluster, self.caps["data_pool_id"],
                                                    ctypes.byref(c_ioctx)),
                      f"opening the data pool of {self.pool}/{self.name}")
                try:
                    self._objects = (c_ioctx, rados_copy.IoCtx(c_ioctx))
                except BaseException:
                    self._lib.rados_ioctx_destroy(c_ioctx)
                    raise
            return self._objects[1]

    def copy_objects_from_blocking(self, src: RbdImage, src_first: int, dst_first: int,
                                   count: int) -> list[int]:
        """Make this image's data objects dst_first... copies of `src`'s objects
        src_first... inside the cluster (RADOS copy-from, OSD to OSD); per object 0 or
        -errno (-ENOENT: the source object does not exist, as a clone's data still in its
        parent). Both images are plainly striped with objects of one size in one cluster
        (`copy_offer_refusal`).

        Each destination object is first written through librbd (512 zero bytes at its start),
        and only then replaced whole by the copy. That write is what keeps librbd's view true:
        it records the object in the object map (fast-diff reads it as changed), takes the
        exclusive lock, copies a clone's parent data up, and reaches the OSD with the image's
        snapshot context, so the object's old content is kept for every snapshot; the copy
        that follows carries no snapshot context and the OSD writes it under the newer one the
        object now has. A snapshot taken between the two writes sees the copied data: the copy
        was in flight then, as a write in flight at a crash."""
        dst_io = self._data_ioctx()
        src_io = src._data_ioctx()
        zeros = ctypes.create_string_buffer(CAW_SECTOR)
        osz = int(self.caps["object_size"])
        pending: list[ctypes.c_void_p] = []
        failed: list[int] = []

        def reap() -> None:
            completion = pending.pop(0)
            self._lib.rbd_aio_wait_for_complete(completion)
            ret = int(self._lib.rbd_aio_get_return_value(completion))
            self._lib.rbd_aio_release(completion)
            if ret < 0:
                failed.append(ret)

        try:
            for number in range(dst_first, dst_first + count):
                completion = ctypes.c_void_p()
                check(self._lib.rbd_aio_create_completion(None, _NO_CALLBACK,
                                                          ctypes.byref(completion)),
                      "rbd_aio_create_completion")
                ret = self._lib.rbd_aio_write(self._handle(), number * osz, CAW_SECTOR,
                                              ctypes.addressof(zeros), completion)
                if ret < 0:
                    self._lib.rbd_aio_release(completion)
                    failed.append(ret)
                    break
                pending.append(completion)
                if len(pending) >= rados_copy.DEPTH:
                    reap()
        finally:
            while pending:
                reap()
        if failed:
            raise errno_error(failed[0], f"write to object {dst_first} of "
                              f"{self.pool}/{self.name}")
        pairs = [(src.object_name(src_first + n), self.object_name(dst_first + n))
                 for n in range(count)]
        return rados_copy.copy_objects(dst_io, src_io, pairs)

    def size_now(self) -> int:
        """The image's size as the cluster has it now (another client may have resized it)."""
        size = ctypes.c_uint64()
        check(self._lib.rbd_get_size(self._handle(), ctypes.byref(size)), "rbd_get_size")
        return int(size.value)

    def rados_handles(self) -> tuple[int, int]:
        """The addresses of this image's librados cluster and pool handles, for state kept
        beside the image on the same client (cluster/ownership.py): fencing that client's
        address then fences this image's I/O too."""
        self._handle()
        return int(self._cluster.value or 0), int(self._ioctx.value or 0)

    def allow_concurrent_writers_blocking(self) -> bool:
        """Turn off the exclusive-lock feature (and the features that need it: object map,
        fast diff, journaling), so that several gateways write the image at once without the
        lock moving at every write; True when features were turned off."""
        features = ctypes.c_uint64()
        check(self._lib.rbd_get_features(self._handle(), ctypes.byref(features)),
              "rbd_get_features")
        changed = False
        for feature in (RBD_FEATURE_JOURNALING, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_OBJECT_MAP,
                        RBD_FEATURE_EXCLUSIVE_LOCK):
            if features.value & feature:
                ret = self._lib.rbd_update_features(self._image, feature, 0)
                if ret != -errno.EINVAL:  # EINVAL: another gateway turned it off first
                    check(ret, f"turning off feature {feature:#x} of {self.pool}/{self.name}")
                changed = True
        check(self._lib.rbd_get_features(self._image, ctypes.byref(features)),
              "rbd_get_features")
        self.caps["features"] = int(features.value)
        return changed

    def resize_blocking(self, size: int) -> None:
        check(self._lib.rbd_resize(self._handle(), size),
              f"resizing {self.pool}/{self.name} to {size}")
        self.size = size


RBD_FEATURE_JOURNALING = 1 << 6
# Answers of a copy-from that mean "not here" rather than a failure of the medium: the OSD or
# the client's caps refuse it (EPERM: no read access to the source pool for the OSD's copy).
COPY_REFUSED = frozenset((errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.EXDEV,
                          errno.EINVAL))


def copy_offer_refusal(dst: Mapping[str, Any], src: Mapping[str, Any] | None = None
                       ) -> str | None:
    """Why data cannot be copied into the image whose `RbdImage.caps` are `dst` (from the
    image `src`, when given) inside the cluster, object by object; None when it can.

    Object-by-object copying needs image offsets that map to objects one to one (no fancy
    striping: one stripe of one object), objects of one size on both sides, both images in
    one cluster (a copy-from names a pool of the OSDs' own cluster), and no journaling (a
    journaled image's writes must go through its journal, which rbd-mirror replays)."""
    sides = [("destination", dst)] + ([] if src is None else [("source", src)])
    for side, caps in sides:
        if caps["stripe_count"] != 1 or caps["stripe_unit"] != caps["object_size"]:
            return (f"the {side} image is striped ({caps['stripe_count']} x "
                    f"{caps['stripe_unit']} bytes over {caps['object_size']}-byte objects)")
        if caps["features"] & RBD_FEATURE_JOURNALING:
            return f"the {side} image is journaled"
    if src is not None:
        if src["fsid"] != dst["fsid"]:
            return "the images are in different clusters"
        if src["object_size"] != dst["object_size"]:
            return (f"the object sizes differ ({src['object_size']} and "
                    f"{dst['object_size']} bytes)")
    return None


class RbdBackstore(Backstore):
    """`backstore: rbd`: a logical unit in one RBD image, every I/O through librbd's aio.

    Parameters: `pool` and `image`; optional `conf` (ceph.conf, default /etc/ceph/ceph.conf),
    `keyring` (default: what the conf names), `client_id` (default `admin`, for
    client.admin) and `object_size` (bytes per RADOS object of an image `provision` creates;
    default librbd's 4 MiB). The awaitable calls are librbd aio completed on the event loop;
    the blocking calls (the copy engine's, `close`) are librbd's synchronous calls on the
    calling thread. No cache of its own, so no fast path on the loop (`read_nowait`,
    `write_inline`, `lend` are off).
    """

    kind = "rbd"
    PARAMS = ("pool", "image")
    OPTIONAL_PARAMS = ("conf", "keyring", "client_id", "object_size", "snapshot")
    ALLOCATED_REFRESH = 1.0  # seconds a figure given on the event loop may be old

    def __init__(self, image: RbdImage, readonly: bool = False) -> None:
        self.image = image
        self.readonly = readonly
        self.size = image.size
        self.location = f"{image.pool}/{image.name}"
        granule = image.caps["discard_granularity"] if image.caps["skip_partial_discard"] else 0
        self.granule = granule  # discards keep partial granules: zeroed here instead
        caw = image.caps["caw_atomic_max"]
        self.caps = Capabilities(
            thin=True, deallocated_reads_zero=True,
            deallocate_granularity=granule or 512, deallocate_alignment=0,
            compare_and_write_max=caw, compare_and_write_boundary=caw,
            copy_range=not readonly and rados_copy.available()
            and copy_offer_refusal(image.caps) is None,
            copy_range_alignment=image.caps["object_size"])
        self._allocated = 0
        self._allocated_at = -1.0
        self._refreshing = False
        self._measure_allocated()

    @staticmethod
    def _connection(params: Mapping[str, Any]) -> dict[str, Any]:
        keyring = params.get("keyring")
        return {"conf": str(params.get("conf", DEFAULT_CONF)),
                "keyring": None if keyring is None else str(keyring),
                "client_id": str(params.get("client_id", "admin"))}

    @classmethod
    def open(cls, params: Mapping[str, Any], *, readonly: bool = False) -> RbdBackstore:
        try:
            snapshot = params.get("snapshot")
            image = RbdImage.open_blocking(str(params["pool"]), str(params["image"]),
                                           snapshot=None if snapshot is None else str(snapshot),
                                           **cls._connection(params))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise FileNotFoundError(exc.errno, exc.strerror) from None
            raise
        return cls(image, readonly or snapshot is not None)

    @classmethod
    def exists(cls, params: Mapping[str, Any]) -> bool:
        if "snapshot" in params:
            try:
                cls.open(params, readonly=True).close()
            except FileNotFoundError:
                return False
            return True
        return image_exists(str(params["pool"]), str(params["image"]),
                            **cls._connection(params))

    @classmethod
    def provision(cls, params: Mapping[str, Any], size: int) -> None:
        create_image(str(params["pool"]), str(params["image"]), size,
                     object_size=int(params.get("object_size", 0)), **cls._connection(params))

    @property
    def closed(self) -> bool:
        return self.image.closed

    def close(self) -> None:
        self.image.close_blocking()

    def _writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.location} is read-only")

    def _granules(self, offset: int, length: int) -> tuple[int, int]:
        """[start, end) of the whole discard granules inside the range (start >= end: none)."""
        g = self.granule
        if not g:
            return offset, offset + length
        return -(-offset // g) * g, (offset + length) // g * g

    # -- allocation
    def allocated_bytes(self) -> int:
        """Exact off the event loop; on it, the last figure, refreshed on an I/O thread when
        older than ALLOCATED_REFRESH (rbd_diff_iterate2 blocks)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._measure_allocated()
        stale = time.monotonic() - self._allocated_at > self.ALLOCATED_REFRESH
        if stale and not self._refreshing and not self.closed:
            self._refreshing = True
            threads.io_executor().submit(self._measure_allocated)
        return self._allocated

    def _measure_allocated(self) -> int:
        try:
            if not self.closed:
                self._allocated = sum(n for _, n in self.image.extents_blocking(0, self.size))
                self._allocated_at = time.monotonic()
        except OSError:
            pass
        finally:
            self._refreshing = False
        return self._allocated

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The range to ask librbd about: [offset, offset + length) within the image, widened
        to whole discard granules."""
        g = self.caps.deallocate_granularity
        end = min(offset + length, self.size)
        return offset - offset % g, min(-(-end // g) * g, self.size)

    def _extents(self, found: list[tuple[int, int]], span: tuple[int, int], offset: int,
                 length: int) -> list[Extent]:
        """Runs over [offset, end) from librbd's extents over `span`: holes are shrunk to the
        whole granules they hold (a truncated object's tail inside a granule counts as mapped),
        as deallocation is advertised (UNMAP GRANULARITY); never a hole where data is."""
        g = self.caps.deallocate_granularity
        end = min(offset + length, self.size)
        holes: list[tuple[int, int]] = []
        pos = span[0]
        for start, count in [*found, (span[1], 0)]:
            if start > pos:
                a, b = -(-pos // g) * g, start if start == self.size else start // g * g
                if b > a:
                    holes.append((a, b))
            pos = max(pos, start + count)
        out: list[Extent] = []
        pos = offset
        for a, b in holes:
            a, b = max(a, offset), min(b, end)
            if b <= a:
                continue
            if a > pos:
                out.append(Extent(pos, a - pos, True))
            out.append(Extent(a, b - a, False))
            pos = b
        if pos < end:
            out.append(Extent(pos, end - pos, True))
        return out

    # -- blocking calls
    def read_into(self, buf: memoryview, offset: int) -> None:
        self.image.read_blocking(buf, offset)

    def write(self, data: memoryview, offset: int) -> None:
        self._writable()
        self.image.write_blocking(data, offset)

    def flush(self) -> None:
        self.image.flush_blocking()

    def deallocate(self, offset: int, length: int) -> None:
        self._writable()
        start, end = self._granules(offset, length)
        if start >= end:
            self.image.write_zeroes_blocking(offset, length)
            return
        if start > offset:
            self.image.write_zeroes_blocking(offset, start - offset)
        self.image.discard_blocking(start, end - start)
        if offset + length > end:
            self.image.write_zeroes_blocking(end, offset + length - end)

    def zero(self, offset: int, length: int) -> None:
        self._writable()
        self.image.write_zeroes_blocking(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        if min(offset + length, self.size) <= offset:
            return []
        span = self._span(offset, length)
        found = self.image.extents_blocking(span[0], span[1] - span[0])
        return self._extents(found, span, offset, length)

    def copy_range_from(self, src: Backstore, src_offset: int, dst_offset: int,
                        length: int) -> bool:
        """Copy whole objects inside the cluster, OSD to OSD (RADOS copy-from, see
        `RbdImage.copy_objects_from_blocking`), when both images allow it
        (`copy_offer_refusal`) and the ranges are whole objects on both sides; False, with
        nothing changed, otherwise. A source object that does not exist in RADOS (a clone's
        data still in its parent) is read and written instead; so are the objects of a copy
        the cluster refuses (COPY_REFUSED), and the offer is then withdrawn."""
        if not self.caps.copy_range or not isinstance(src, RbdBackstore) or src.closed:
            return False
        osz = int(self.image.caps["object_size"])
        if src_offset % osz or dst_offset % osz or length % osz or length <= 0 \
                or copy_offer_refusal(self.image.caps, src.image.caps) is not None:
            return False
        self._writable()
        results = self.image.copy_objects_from_blocking(src.image, src_offset // osz,
                                                        dst_offset // osz, length // osz)
        for n, ret in enumerate(results):
            if ret == 0:
                continue
            if -ret in COPY_REFUSED:
                self.caps.copy_range = False
            elif ret != -errno.ENOENT:
                raise errno_error(ret, f"copy of object {src_offset // osz + n} of "
                                  f"{src.location} into {self.location}")
            self._copy_through(src, src_offset + n * osz, dst_offset + n * osz, osz)
        return True

    def _copy_through(self, src: RbdBackstore, src_offset: int, dst_offset: int,
                      length: int) -> None:
        buf = memoryview(bytearray(length))
        src.read_into(buf, src_offset)
        self.write(buf, dst_offset)

    def medium_size(self) -> int:
        return self.image.size_now()

    def resize(self, size: int) -> None:
        self._writable()
        self.image.resize_blocking(size)
        self.size = size

    # -- snapshots: RBD snapshots of the image
    @classmethod
    def snapshot_params(cls, params: Mapping[str, Any], name: str) -> dict[str, Any]:
        return {**params, "snapshot": name}

    def create_snapshot(self, name: str) -> str:
        self._writable()
        self.image.snapshot_create_blocking(name)
        return "rbd"

    def delete_snapshot(self, name: str) -> None:
        self.image.snapshot_remove_blocking(name)

    def clone_snapshot(self, name: str, params: Mapping[str, Any]) -> None:
        self.image.snapshot_clone_blocking(name, str(params["pool"]), str(params["image"]))

    def rollback_snapshot(self, name: str) -> None:
        self._writable()
        self.image.snapshot_rollback_blocking(name)

    # -- awaitable calls: librbd aio, completed on the event loop
    async def aread(self, buf: memoryview, offset: int,
                    then: ReadHook | None = None) -> None:
        await self.image.read(buf, offset)
        if then is not None:
            then(buf)

    async def awrite(self, data: memoryview, offset: int) -> None:
        self._writable()
        await self.image.write(data, offset)

    async def aflush(self) -> None:
        await self.image.flush()

    async def adeallocate(self, offset: int, length: int) -> None:
        self._writable()
        start, end = self._granules(offset, length)
        if start >= end:
            await self.image.write_zeroes(offset, length)
            return
        if start > offset:
            await self.image.write_zeroes(offset, start - offset)
        await self.image.deallocate(start, end - start)
        if offset + length > end:
            await self.image.write_zeroes(end, offset + length - end)

    async def azero(self, offset: int, length: int) -> None:
        self._writable()
        await self.image.write_zeroes(offset, length)

    async def aextents(self, offset: int, length: int
                       ) -> list[Extent]:
        if min(offset + length, self.size) <= offset:
            return []
        span = self._span(offset, length)
        found = await threads.run_blocking(self.image.extents_blocking, span[0],
                                           span[1] - span[0])
        return self._extents(found, span, offset, length)

    async def acompare_and_write(self, compare: memoryview, data: memoryview,
                                 offset: int) -> int | None:
        self._writable()
        return await self.image.compare_and_write(offset, compare, data)


def _connect(lib: _Lib, pool: str, conf: str, keyring: str | None, client_id: str,
             options: dict[str, str] | None) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
    """A cluster handle connected as client.`client_id` and an I/O context on `pool`."""
    settings = dict(TARGET_OPTIONS)
    if keyring is not None:
        settings["keyring"] = keyring
    settings.update(options or {})
    return connect(lib.rados, pool, conf, client_id, settings)


def _create(lib: _Lib, ioctx: ctypes.c_void_p, name: str, size: int, object_size: int) -> int:
    """rbd_create with the image's default format and features; objects of `object_size`."""
    if object_size and (object_size < 4096 or object_size & (object_size - 1)):
        raise ValueError(f"object size {object_size} is not a power of two from 4096")
    order = ctypes.c_int(object_size.bit_length() - 1 if object_size else 0)
    return int(lib.rbd_create(ioctx, name.encode(), size, ctypes.byref(order)))


def image_exists(pool: str, name: str, *, conf: str = DEFAULT_CONF, keyring: str | None = None,
                 client_id: str = "admin") -> bool:
    """Whether `pool`/`name` exists (connects, opens and closes it; blocking)."""
    lib = _LIB.get()
    cluster, ioctx = _connect(lib, pool, conf, keyring, client_id, None)
    try:
        image = ctypes.c_void_p()
        ret = lib.rbd_open(ioctx, name.encode(), ctypes.byref(image), None)
        if ret == -errno.ENOENT:
            return False
        check(ret, f"opening image {pool}/{name}")
        lib.rbd_close(image)
        return True
    finally:
        lib.rados_ioctx_destroy(ioctx)
        lib.rados_shutdown(cluster)


def create_image(pool: str, name: str, size: int, *, conf: str = DEFAULT_CONF,
                 keyring: str | None = None, client_id: str = "admin",
                 object_size: int = 0) -> None:
    """Create `pool`/`name` with `size` bytes (thin, as every RBD image); FileExistsError when
    it exists (blocking)."""
    lib = _LIB.get()
    cluster, ioctx = _connect(lib, pool, conf, keyring, client_id, None)
    try:
        ret = _create(lib, ioctx, name, size, object_size)
        if ret == -errno.EEXIST:
            raise FileExistsError(errno.EEXIST, f"image {pool}/{name} exists")
        check(ret, f"creating image {pool}/{name}")
    finally:
        lib.rados_ioctx_destroy(ioctx)
        lib.rados_shutdown(cluster)


def _conf_get(lib: _Lib, cluster: ctypes.c_void_p, key: str) -> str:
    value = ctypes.create_string_buffer(256)
    check(lib.rados_conf_get(cluster, key.encode(), value, len(value)), f"reading {key}")
    return value.value.decode()


def _conf_int(lib: _Lib, cluster: ctypes.c_void_p, key: str) -> int:
    return int(_conf_get(lib, cluster, key))


async def remove_image(pool: str, name: str, *, conf: str = DEFAULT_CONF,
                       keyring: str | None = None, client_id: str = "admin") -> None:
    """Delete `pool`/`name` (its snapshots must be gone first)."""
    def remove() -> None:
        lib = _LIB.get()
        cluster, ioctx = _connect(lib, pool, conf, keyring, client_id, None)
        try:
            check(lib.rbd_remove(ioctx, name.encode()), f"removing image {pool}/{name}")
        finally:
            lib.rados_ioctx_destroy(ioctx)
            lib.rados_shutdown(cluster)
    await asyncio.to_thread(remove)
