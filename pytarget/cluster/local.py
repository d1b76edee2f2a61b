"""A shared document between the worker processes of one machine: `LocalDocument` implements
core/reservations.py's `SharedDocument` over a file, with change notices carried by a `Relay`
(the worker's channel to its parent, `pytarget/workers.py`).

The file holds the version (8 bytes, big-endian) followed by the document. Readers take a
shared `flock` on a lock file beside it, writers an exclusive one; an update checks the
version under the lock and replaces the file by rename (after fsync), so a crash leaves the
old or the new document, never a mix. The lock is on a descriptor this object opened itself,
so two documents over one file in one process exclude each other as two processes do.

After a successful update the author announces the new version through the relay, which
returns once every other worker has run its `on_change` (the parent collects their
acknowledgements): the contract of core/reservations.py, as `cluster/rados.py` keeps it with
watch/notify. A worker whose relay is gone (the parent died) trusts nothing.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from ..core.reservations import OnChange, Snapshot, StaleVersion

HEADER = 8


class Relay(Protocol):
    """How a document's changes reach the other processes sharing it."""

    def connected(self) -> bool:
        """Whether notices from the others can still arrive."""
        ...

    def watch(self, key: str, on_notice: Callable[[], Awaitable[None]]) -> None:
        """Run `on_notice` on the event loop when another process announces a change of
        `key`; the announcement is acknowledged once it returns."""
        ...

    async def announce(self, key: str, version: int) -> None:
        """Tell every other process that `key` is now at `version`; returns once each has
        handled it (or is gone)."""
        ...


class LocalDocument:
    """A versioned document in a file, shared by the processes of one machine."""

    def __init__(self, path: str | os.PathLike[str], relay: Relay | None = None) -> None:
        self.path = Path(path)
        self.relay = relay
        self._lock_fd = -1
        self._loaded = False
        self._dirty = False
        self._on_change: OnChange | None = None
        self._watching = False

    @property
    def name(self) -> str:
        return str(self.path)

    def subscribe(self, on_change: OnChange) -> None:
        self._on_change = on_change
        self._watch()

    def trusted(self) -> bool:
        relay = self.relay
        return self._loaded and not self._dirty and (relay is None or relay.connected())

    async def load(self) -> Snapshot:
        self._watch()
        self._dirty = False  # a notice arriving from now on makes the read below suspect
        snapshot = await asyncio.to_thread(self._read)
        self._loaded = True
        return snapshot

    async def update(self, version: int, document: bytes) -> int:
        self._watch()
        await asyncio.to_thread(self._write, version, document)
        if self.relay is not None:
            await self.relay.announce(self.name, version + 1)
        return version + 1

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ---------------------------------------------------------------- notices
    def _watch(self) -> None:
        if not self._watching and self.relay is not None:
            self.relay.watch(self.name, self._notice)
            self._watching = True

    async def _notice(self) -> None:
        self._dirty = True
        if self._on_change is not None:
            await self._on_change()

    # ---------------------------------------------------------------- the file (I/O threads)
    def _lock(self, kind: int) -> int:
        if self._lock_fd < 0:
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        fcntl.flock(self._lock_fd, kind)
        return self._lock_fd

    def _read_unlocked(self) -> Snapshot:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Snapshot(0, None)
        if len(raw) < HEADER:
            raise OSError(errno.EIO, f"{self.path}: truncated shared document")
        return Snapshot(int.from_bytes(raw[:HEADER], "big"), raw[HEADER:])

    def _read(self) -> Snapshot:
        fd = self._lock(fcntl.LOCK_SH)
        try:
            return self._read_unlocked()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _write(self, version: int, document: bytes) -> None:
        fd = self._lock(fcntl.LOCK_EX)
        try:
            current = self._read_unlocked().version
            if current != version:
                raise StaleVersion(f"{self.path}: at {current}, not {version}")
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(out, (version + 1).to_bytes(HEADER, "big") + document)
                os.fsync(out)
            finally:
                os.close(out)
            os.replace(tmp, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def remove_document(path: str | os.PathLike[str]) -> None:
    """Forget a document and its lock file (while no process serves it)."""
    for name in (str(path), f"{path}.lock"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
