"""LBA range locks: shared for reads, exclusive for anything that changes blocks.

COMPARE AND WRITE, WRITE, WRITE SAME, UNMAP and the copy manager's writes all take an exclusive
lock on the blocks they touch, so a compare-and-write is atomic against every other writer
(SBC-3 5.2), not only against other compare-and-writes. Grants are first come, first served: a
request waits for every earlier holder or waiter it overlaps, so a whole-LU barrier (used by
RESERVE) waits for the commands queued before it and holds back those queued after.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from types import TracebackType


class _Request:
    __slots__ = ("start", "end", "exclusive", "future")

    def __init__(self, start: int, end: int, exclusive: bool) -> None:
        self.start = start
        self.end = end
        self.exclusive = exclusive
        self.future: asyncio.Future[None] | None = None

    def conflicts(self, other: _Request) -> bool:
        return ((self.exclusive or other.exclusive)
                and self.start < other.end and other.start < self.end)


class RangeLock:
    def __init__(self) -> None:
        self._held: dict[_Request, None] = {}  # insertion-ordered; removal is O(1)
        self._exclusive_held = 0  # shared holders never block a shared request
        self._waiting: deque[_Request] = deque()
        # Called with each exclusive lock once it is released, when set (changed-block
        # tracking marks the blocks it covered); None costs `release` one attribute test.
        self.on_exclusive_release: Callable[[_Request], None] | None = None

    def _blocked(self, req: _Request, waiters_before: list[_Request] | deque[_Request]) -> bool:
        if req.exclusive or self._exclusive_held:
            for other in self._held:
                if req.conflicts(other):
                    return True
        for other in waiters_before:
            if req.conflicts(other):
                return True
        return False

    def try_acquire(self, start: int, count: int, exclusive: bool) -> _Request | None:
        """Grant at once when nothing holds or waits for an overlapping range (the common
        case); None means `acquire` must queue the request."""
        end = start + (count if count > 0 else 1)
        if self._waiting:
            req = _Request(start, end, exclusive)
            if self._blocked(req, self._waiting):
                return None
            self._grant(req)
            return req
        # Nobody waits: only holders can block, and the overlap test is written out here
        # (it runs against every holder for each write).
        if exclusive:
            for other in self._held:
                if other.start < end and start < other.end:
                    return None
            self._exclusive_held += 1
        elif self._exclusive_held:
            for other in self._held:
                if other.exclusive and other.start < end and start < other.end:
                    return None
        req = _Request(start, end, exclusive)
        self._held[req] = None
        return req

    async def acquire(self, start: int, count: int, exclusive: bool) -> _Request:
        req = _Request(start, start + max(count, 1), exclusive)
        if not self._blocked(req, self._waiting):
            self._grant(req)
            return req
        req.future = asyncio.get_running_loop().create_future()
        self._waiting.append(req)
        try:
            await req.future
        except asyncio.CancelledError:
            if req.future.done() and not req.future.cancelled():
                self.release(req)  # granted just as we were cancelled
            else:
                if req in self._waiting:
                    self._waiting.remove(req)
                self._wake()
            raise
        return req

    def _grant(self, req: _Request) -> None:
        self._held[req] = None
        if req.exclusive:
            self._exclusive_held += 1

    def release(self, req: _Request) -> None:
        del self._held[req]
        if req.exclusive:
            self._exclusive_held -= 1
            if self._waiting:
                self._wake()
            if self.on_exclusive_release is not None:
                self.on_exclusive_release(req)
        elif self._waiting:
            self._wake()

    def _wake(self) -> None:
        if not self._waiting:
            return
        before: list[_Request] = []
        remaining: deque[_Request] = deque()
        for req in self._waiting:
            assert req.future is not None
            if req.future.cancelled():
                # its task was cancelled and has not run its handler yet: it waits no more
                continue
            if not self._blocked(req, before):
                self._grant(req)
                req.future.set_result(None)
            else:
                remaining.append(req)
                before.append(req)
        self._waiting = remaining

    def shared(self, start: int, count: int) -> _Guard:
        return _Guard(self, start, count, False)

    def exclusive(self, start: int, count: int) -> _Guard:
        return _Guard(self, start, count, True)

    def exclusive_holds(self) -> list[tuple[int, int]]:
        """(start, end) of every exclusive lock held now."""
        return [(r.start, r.end) for r in self._held if r.exclusive]

    def unchanged(self, req: _Request) -> None:
        """The holder of exclusive lock `req` changed nothing under it after all (a COMPARE AND
        WRITE that miscompared); a lock that tracks changes uses it."""

    @property
    def busy(self) -> bool:
        return bool(self._held or self._waiting)

    @property
    def waiting(self) -> int:
        """Requests queued behind conflicting ones."""
        return len(self._waiting)


class _Guard:
    __slots__ = ("lock", "start", "count", "exclusive_", "req")

    def __init__(self, lock: RangeLock, start: int, count: int, exclusive: bool) -> None:
        self.lock = lock
        self.start = start
        self.count = count
        self.exclusive_ = exclusive
        self.req: _Request | None = None

    async def __aenter__(self) -> _Request:
        self.req = await self.lock.acquire(self.start, self.count, self.exclusive_)
        return self.req

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self.req is not None
        self.lock.release(self.req)


WHOLE_UNIT = (0, 1 << 64)
