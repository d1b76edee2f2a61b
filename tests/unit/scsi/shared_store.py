"""An in-memory `ReservationStore` for tests: one shared object that several handles (one per
gateway) read and compare-and-update, with versions, conflicts, change notices that the author
waits for, a watch that can be lost and a store that can become unreachable.

It keeps the contract of core/reservations.py the way the RADOS store does: `load` subscribes
before it reads, a notice makes the receiver untrusted at once (before its handler runs), and
`update` returns only after every other subscribed handle's handler has returned.
"""

from __future__ import annotations

import asyncio

from pytarget.core.reservations import OnChange, Snapshot, StaleVersion


class SharedObject:
    """The document every handle shares (what one RADOS object is)."""

    def __init__(self) -> None:
        self.version = 0
        self.document: bytes | None = None
        self.watchers: list[MemoryStore] = []
        self.updates = 0  # successful updates
        self.conflicts = 0  # updates refused as stale
        # When set, an update waits here after it is stored and its notices are out, before the
        # receivers' handlers run, so tests can hold a change in flight while a gateway acts.
        self.hold: asyncio.Event | None = None

    def handle(self, name: str) -> MemoryStore:
        return MemoryStore(self, name)


class MemoryStore:
    def __init__(self, shared: SharedObject, name: str) -> None:
        self.shared = shared
        self.name = name
        self.on_change: OnChange | None = None
        self.dirty = False
        self.watching = False
        self.reachable = True
        self.loads = 0
        self.closed = False

    def trusted(self) -> bool:
        return self.watching and not self.dirty

    async def load(self) -> Snapshot:
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        self._reach()
        if not self.watching:
            self.shared.watchers.append(self)
            self.watching = True
        self.dirty = False
        self.loads += 1
        return Snapshot(self.shared.version, self.shared.document)

    async def update(self, version: int, document: bytes) -> int:
        await asyncio.sleep(0)
        self._reach()
        shared = self.shared
        if version != shared.version:
            shared.conflicts += 1
            raise StaleVersion(f"{self.name}: at {shared.version}, not {version}")
        shared.version = version + 1
        shared.document = document
        shared.updates += 1
        others = [w for w in shared.watchers if w is not self]
        for other in others:
            other.dirty = True  # the notice has reached them; their handlers have yet to run
        if shared.hold is not None:
            await shared.hold.wait()
        for other in others:
            if other.on_change is not None:
                await other.on_change()
        return version + 1

    def subscribe(self, on_change: OnChange) -> None:
        self.on_change = on_change

    def close(self) -> None:
        self.lose_watch()
        self.closed = True

    def lose_watch(self) -> None:
        """The watch is gone (a timeout, a reconnection): no more notices until `load`."""
        if self in self.shared.watchers:
            self.shared.watchers.remove(self)
        self.watching = False

    def _reach(self) -> None:
        if not self.reachable:
            raise OSError(110, f"{self.name}: cluster unreachable")
