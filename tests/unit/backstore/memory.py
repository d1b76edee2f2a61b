"""A backstore in memory, for tests: the device server on a medium that is not a file.

It has no fast path (no cache read without waiting, no inline writes, no lent views), so every
read and write goes through its awaitable calls, which it completes the way a medium with its
own asynchronous I/O would: the request is queued and a later event-loop callback runs it and
resolves the caller's future (no I/O thread). Allocation is tracked per granule, so it can be
thin; the clone offer works between two memory backstores; atomic compare-and-write and atomic
writes are offered.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pytarget.backstore.base import Backstore, Capabilities, Extent, ReadHook

T = TypeVar("T")
GRANULE = 4096
UNSPECIFIED = b"\xdb"  # what deallocated bytes read as when they do not read as zeros


class MemoryBackstore(Backstore):
    kind = "memory"
    PARAMS = ("name",)
    OPTIONAL_PARAMS = ("granule",)
    media: dict[str, MemoryBackstore] = {}  # name -> medium, for open/provision by parameters

    def __init__(self, size: int, *, granule: int = GRANULE, readonly: bool = False,
                 reads_zero: bool = True, name: str = "") -> None:
        self.size = size
        self.readonly = readonly
        self.location = f"memory:{name}"
        self.granule = granule
        self.data = bytearray(size)
        self.allocated = bytearray(-(-size // granule))  # 1 per allocated granule
        self.lock = threading.Lock()
        self.flushes = 0
        self.pending = 0  # awaitable calls queued and not completed yet
        self._closed = False
        self.caps = Capabilities(
            thin=True, deallocated_reads_zero=reads_zero, deallocate_granularity=granule,
            deallocate_alignment=0, clone=True, clone_alignment=granule,
            compare_and_write_max=1 << 20, atomic_write_unit_min=512,
            atomic_write_unit_max=65536)

    # -- building by parameters
    @classmethod
    def open(cls, params: Mapping[str, Any], *, readonly: bool = False) -> MemoryBackstore:
        medium = cls.media.get(str(params["name"]))
        if medium is None:
            raise FileNotFoundError(params["name"])
        medium.readonly = readonly
        return medium

    @classmethod
    def exists(cls, params: Mapping[str, Any]) -> bool:
        return str(params["name"]) in cls.media

    @classmethod
    def provision(cls, params: Mapping[str, Any], size: int) -> None:
        name = str(params["name"])
        if name in cls.media:
            raise FileExistsError(name)
        cls.media[name] = cls(size, granule=int(params.get("granule", GRANULE)), name=name)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- blocking calls
    def read_into(self, buf: memoryview, offset: int) -> None:
        end = min(offset + len(buf), self.size)
        n = max(0, end - offset)
        with self.lock:
            buf[:n] = self.data[offset:end]
        buf[n:] = bytes(len(buf) - n)

    def write(self, data: memoryview, offset: int) -> None:
        with self.lock:
            self.data[offset:offset + len(data)] = data
            first, last = offset // self.granule, -(-(offset + len(data)) // self.granule)
            self.allocated[first:last] = b"\1" * (last - first)

    def flush(self) -> None:
        self.flushes += 1

    def deallocate(self, offset: int, length: int) -> None:
        fill = bytes(length) if self.caps.deallocated_reads_zero else UNSPECIFIED * length
        with self.lock:
            self.data[offset:offset + length] = fill
            first = -(-offset // self.granule)
            last = (offset + length) // self.granule
            if last > first:
                self.allocated[first:last] = bytes(last - first)

    def zero(self, offset: int, length: int) -> None:
        self.write(memoryview(bytes(length)), offset)

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            mapped = bool(self.allocated[pos // self.granule])
            g = pos // self.granule + 1
            while g * self.granule < end and bool(self.allocated[g]) == mapped:
                g += 1
            stop = min(g * self.granule, end)
            out.append(Extent(pos, stop - pos, mapped))
            pos = stop
        return out

    def allocated_bytes(self) -> int:
        return self.allocated.count(1) * self.granule

    def clone_from(self, src: Backstore, src_offset: int, dst_offset: int, length: int) -> bool:
        if not self.caps.clone or not isinstance(src, MemoryBackstore):
            return False
        buf = memoryview(bytearray(length))
        src.read_into(buf, src_offset)
        self.write(buf, dst_offset)
        return True

    def medium_size(self) -> int:
        return len(self.data)

    def resize(self, size: int) -> None:
        with self.lock:
            if size > len(self.data):
                self.data += bytes(size - len(self.data))
            else:
                del self.data[size:]
            granules = -(-size // self.granule)
            self.allocated = self.allocated[:granules].ljust(granules, b"\0")
            self.size = size

    def close(self) -> None:
        self._closed = True

    # -- awaitable calls: completed by a later event-loop callback, no I/O thread
    def _complete_later(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self.pending += 1

        def complete() -> None:
            self.pending -= 1
            try:
                result = fn(*args)
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        loop.call_soon(complete)
        return fut

    def aread(self, buf: memoryview, offset: int, then: ReadHook | None = None
              ) -> Awaitable[None]:
        return self._complete_later(self._read_then, buf, offset, then)

    def awrite(self, data: memoryview, offset: int) -> Awaitable[None]:
        return self._complete_later(self.write, data, offset)

    def aflush(self) -> Awaitable[None]:
        return self._complete_later(self.flush)

    def adeallocate(self, offset: int, length: int) -> Awaitable[None]:
        return self._complete_later(self.deallocate, offset, length)

    def azero(self, offset: int, length: int) -> Awaitable[None]:
        return self._complete_later(self.zero, offset, length)

    def aextents(self, offset: int, length: int) -> Awaitable[list[Extent]]:
        return self._complete_later(self.extents, offset, length)

    async def acompare_and_write(self, compare: memoryview, data: memoryview,
                                 offset: int) -> int | None:
        return await self._complete_later(self._compare_and_write, compare, data, offset)

    def _compare_and_write(self, compare: memoryview, data: memoryview, offset: int
                           ) -> int | None:
        with self.lock:
            current = self.data[offset:offset + len(compare)]
            if current != compare:
                return next(i for i, (a, b) in enumerate(zip(current, compare, strict=True))
                            if a != b)
            self.data[offset:offset + len(data)] = data
            first, last = offset // self.granule, -(-(offset + len(data)) // self.granule)
            self.allocated[first:last] = b"\1" * (last - first)
            return None

    async def awrite_atomic(self, data: memoryview, offset: int) -> None:
        n = len(data)
        caps = self.caps
        if n & (n - 1) or not caps.atomic_write_unit_min <= n <= caps.atomic_write_unit_max \
                or offset % n:
            raise OSError(22, "not an atomic write unit")
        await self._complete_later(self.write, data, offset)
