"""Changed-block tracking: a LUN's named checkpoints and the dirty bitmaps that say which of its
granules changed since each (docs/cbt.md).

Checkpoints form a chain, oldest first. Each owns one bitmap (a byte per granule of
`granularity` bytes) that records the writes made while it was the newest checkpoint; creating
the next one freezes it. What changed since checkpoint N is therefore the union of the bitmaps
of N and every checkpoint after it, and what changed between N and a later checkpoint M (two
snapshots) is the union from N up to, not including, M: a write sets one bitmap, however many
checkpoints exist. Deleting a checkpoint merges its bitmap into the one before it, so every other
checkpoint's answer stays the same (libvirt's checkpoint chains work the same way).

The device server marks whole ranges when an exclusive range lock over them is released (every
command that changes blocks holds one, scsi/device.py); a checkpoint created while such locks are
held marks their ranges in the bitmap it freezes too, since the data may land on either side of
the instant. Answers are therefore never short; they may be long by whole granules.

Persistence: the bitmaps are kept in one file next to the LUN's other state. While the LUN is
open the file says "in use"; a clean close rewrites it with the final bitmaps and without that
mark. A file found "in use" at open is what a crash left: the newest bitmap may have missed
writes, so every answer that includes it is inexact (QEMU's "inconsistent" bitmaps) and is never
served as exact; the older, frozen bitmaps stay exact (what changed between two earlier
checkpoints is still known).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("pytarget.scsi.cbt")

GRANULARITY = 64 << 10  # bytes per bit of a dirty bitmap, unless a LUN configures another
MAX_GRANULARITY = 1 << 30
MAX_CHECKPOINTS = 64
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,127}")
MAGIC = b"pytarget-cbt 1\n"
MAX_EXTENTS = 2048  # extents in one block-status answer
STATE_DIRTY = 1  # NBD_STATE_DIRTY of a qemu:dirty-bitmap: context (QEMU docs/interop/nbd.txt)


class CheckpointError(Exception):
    """A checkpoint operation that cannot be done (unknown or duplicate name...)."""


@dataclass
class Checkpoint:
    name: str
    created: float  # seconds since the epoch
    bitmap: bytearray  # one byte per granule: nonzero when it changed while this was newest
    exact: bool = True  # false when `bitmap` may have missed writes (a crash)


def check_granularity(granularity: int, block_size: int) -> None:
    """ValueError unless `granularity` is a power of two from the block size to 1 GiB."""
    if granularity & (granularity - 1) or not block_size <= granularity <= MAX_GRANULARITY:
        raise ValueError(f"must be a power of two from the block size ({block_size}) to 1GiB")


class ChangeTracker:
    """The checkpoints of one medium. Logical units that serve the same medium at once (the old
    and the new one across a reload) share one tracker: see `open`."""

    _open: dict[str, ChangeTracker] = {}

    def __init__(self, path: str | None, size: int, granularity: int = GRANULARITY) -> None:
        self.path = path
        self.size = size
        self.granularity = granularity  # of the bitmaps; a new value applies to an empty chain
        self.wanted_granularity = granularity
        self.checkpoints: list[Checkpoint] = []
        # The newest checkpoint's bitmap, which writes mark; None without checkpoints.
        self.active: bytearray | None = None
        self.shift = granularity.bit_length() - 1
        self._users = 0
        self._locks: list[Any] = []  # the range locks of the units using it (see `create`)

    # ------------------------------------------------------------------ opening, closing
    @classmethod
    def open(cls, path: str | None, size: int, granularity: int = GRANULARITY
             ) -> ChangeTracker:
        """The tracker of the medium whose state file is `path`: the one already open (a reload
        building a unit for a medium still served), else loaded from the file and marked in use.
        `path` None: kept in memory only."""
        tracker = cls._open.get(path) if path is not None else None
        if tracker is None:
            tracker = cls(path, size, granularity)
            tracker._load()
            if path is not None:
                cls._open[path] = tracker
        tracker.wanted_granularity = granularity
        if not tracker.checkpoints:
            tracker._set_granularity(granularity)
        tracker._users += 1
        return tracker

    def close(self, clean: bool = True) -> None:
        """One user is done; the last one writes the bitmaps back, as exact when `clean` (the
        medium was flushed), else leaving the file in use (the next start trusts only the
        frozen bitmaps)."""
        self._users -= 1
        if self._users > 0:
            return
        if self.path is not None:
            self._open.pop(self.path, None)
            if clean:
                self.save(in_use=False)

    def attach(self, lock: Any) -> None:
        """`lock` (a unit's range lock, with `held_writes()` and `track(on)`) marks this
        tracker's bitmaps while it has checkpoints."""
        self._locks.append(lock)
        lock.track(self.active is not None)

    def _set_active(self) -> None:
        self.active = self.checkpoints[-1].bitmap if self.checkpoints else None
        for lock in self._locks:
            lock.track(self.active is not None)

    def detach(self, lock: Any) -> None:
        with contextlib.suppress(ValueError):
            self._locks.remove(lock)

    def _set_granularity(self, granularity: int) -> None:
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1

    @property
    def granules(self) -> int:
        return -(-self.size // self.granularity)

    # ------------------------------------------------------------------ marking
    def mark(self, offset: int, end: int) -> None:
        """Bytes [offset, end) changed (or may have)."""
        bitmap = self.active
        if bitmap is None or end <= offset:
            return
        first = offset >> self.shift
        last = (end - 1) >> self.shift
        if first == last:
            bitmap[first] = 1
        else:
            bitmap[first:last + 1] = b"\x01" * (last + 1 - first)

    def mark_all(self) -> None:
        """Every block may have changed (a rollback to a snapshot, a restore)."""
        if self.active is not None:
            self.active[:] = b"\x01" * len(self.active)

    def resize(self, size: int) -> None:
        """The medium is now `size` bytes; granules it gained count as changed."""
        old_size, old = self.size, self.granules
        self.size = size
        new = self.granules
        for cp in self.checkpoints:
            if new > old:
                cp.bitmap += bytes(new - old)
            else:
                del cp.bitmap[new:]
        if size > old_size:
            self.mark(old_size, size)

    # ------------------------------------------------------------------ checkpoint operations
    def create(self, name: str) -> Checkpoint:
        """A new checkpoint, from this instant: the bitmap of the one before it freezes (with
        the ranges of writes in flight marked in it) and a new, empty one starts recording.
        Synchronous: on the event loop no write lands between the freeze and the start."""
        if not NAME_RE.fullmatch(name):
            raise CheckpointError(f"invalid checkpoint name {name!r} (1-128 of A-Z a-z 0-9 "
                                  "_ . : + -, not starting with . : + -)")
        if self.find(name) is not None:
            raise CheckpointError(f"checkpoint {name!r} exists")
        if len(self.checkpoints) >= MAX_CHECKPOINTS:
            raise CheckpointError(f"{MAX_CHECKPOINTS} checkpoints exist: delete one first")
        if not self.checkpoints:
            self._set_granularity(self.wanted_granularity)
        else:
            for lock in self._locks:
                for offset, end in lock.held_writes():
                    self.mark(offset, end)
        cp = Checkpoint(name, time.time(), bytearray(self.granules))
        self.checkpoints.append(cp)
        self._set_active()
        self.save(in_use=True)
        return cp

    def delete(self, name: str) -> None:
        """Remove a checkpoint; its bitmap is merged into the one before it."""
        cp = self.find(name)
        if cp is None:
            raise CheckpointError(f"no checkpoint {name!r}")
        i = self.checkpoints.index(cp)
        if i > 0:
            before = self.checkpoints[i - 1]
            merged = np.bitwise_or(np.frombuffer(before.bitmap, np.uint8),
                                   np.frombuffer(cp.bitmap, np.uint8))
            before.bitmap[:] = merged.tobytes()
            before.exact = before.exact and cp.exact
        del self.checkpoints[i]
        self._set_active()
        self.save(in_use=True)

    def find(self, name: str) -> Checkpoint | None:
        return next((cp for cp in self.checkpoints if cp.name == name), None)

    def _span(self, name: str, until: str | None) -> list[Checkpoint]:
        """The bitmaps whose union is what changed since `name` (until the checkpoint `until`,
        which must be later, or until now)."""
        cp = self.find(name)
        if cp is None:
            raise CheckpointError(f"no checkpoint {name!r}")
        start = self.checkpoints.index(cp)
        stop = len(self.checkpoints)
        if until is not None:
            later = self.find(until)
            if later is None:
                raise CheckpointError(f"no checkpoint {until!r}")
            stop = self.checkpoints.index(later)
            if stop <= start:
                raise CheckpointError(f"checkpoint {until!r} is not later than {name!r}")
        return self.checkpoints[start:stop]

    def exact(self, name: str, until: str | None = None) -> bool:
        """Whether what changed since `name` (until `until`) is known exactly."""
        return all(cp.exact for cp in self._span(name, until))

    def changed(self, name: str, until: str | None = None, first: int = 0,
                stop: int | None = None) -> np.ndarray:
        """Per granule [first, stop): whether it changed since `name` (until `until`)."""
        span = self._span(name, until)
        stop = self.granules if stop is None else stop
        out = np.zeros(max(stop - first, 0), dtype=bool)
        for cp in span:
            out |= np.frombuffer(cp.bitmap, np.uint8)[first:stop].astype(bool)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Each checkpoint as `checkpoint list` shows it, oldest first."""
        out = []
        for cp in self.checkpoints:
            changed = int(np.count_nonzero(self.changed(cp.name)))
            exact = self.exact(cp.name)
            out.append({"name": cp.name, "created": cp.created,
                        "state": "exact" if exact else "inconsistent",
                        "granularity": self.granularity,
                        "changed_bytes": min(changed * self.granularity, self.size)})
        return out

    def block_status(self, name: str, offset: int, length: int,
                     until: str | None = None) -> list[tuple[int, int]]:
        """(length, flags) extents of [offset, offset + length) clipped to the medium: flags
        STATE_DIRTY where a granule changed since `name` (until `until`); at most MAX_EXTENTS."""
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        g = self.granularity
        first = offset // g
        stop = min(-(-end // g), first + MAX_EXTENTS * 64)
        dirty = self.changed(name, until, first, stop)
        edges = (np.flatnonzero(np.diff(dirty.view(np.int8))) + 1).tolist()
        extents: list[tuple[int, int]] = []
        at = offset
        for a, b in zip([0, *edges], [*edges, len(dirty)], strict=True):
            run_end = min((first + b) * g, end)
            extents.append((run_end - at, STATE_DIRTY if dirty[a] else 0))
            at = run_end
            if len(extents) == MAX_EXTENTS:
                break
        return extents

    # ------------------------------------------------------------------ persistence
    def save(self, in_use: bool) -> None:
        """Write the checkpoints to the state file (removed when there are none)."""
        if self.path is None:
            return
        path = Path(self.path)
        if not self.checkpoints:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        header = {"granularity": self.granularity, "size": self.size, "in_use": in_use,
                  "checkpoints": [{"name": cp.name, "created": cp.created, "exact": cp.exact}
                                  for cp in self.checkpoints]}
        body = [MAGIC, json.dumps(header).encode() + b"\n"]
        body += [np.packbits(np.frombuffer(cp.bitmap, np.uint8).astype(bool)).tobytes()
                 for cp in self.checkpoints]
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(body))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _load(self) -> None:
        if self.path is None:
            return
        path = Path(self.path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            self._parse(raw)
        except (ValueError, KeyError, TypeError) as exc:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            self.checkpoints = []
            self.active = None
            log.error("checkpoint state %s is unreadable (%s): moved to %s; no checkpoints",
                      path, exc, aside)
            return
        if self.checkpoints:
            self.save(in_use=True)

    def _parse(self, raw: bytes) -> None:
        if not raw.startswith(MAGIC):
            raise ValueError("not a checkpoint state file")
        line_end = raw.index(b"\n", len(MAGIC))
        header = json.loads(raw[len(MAGIC):line_end])
        granularity = int(header["granularity"])
        if granularity & (granularity - 1) or not 512 <= granularity <= MAX_GRANULARITY:
            raise ValueError(f"granularity {granularity}")
        size = int(header["size"])
        self._set_granularity(granularity)
        saved_granules = -(-size // granularity)
        packed = (saved_granules + 7) // 8
        at = line_end + 1
        checkpoints = []
        for item in header["checkpoints"]:
            bits = np.frombuffer(raw, np.uint8, packed, at)
            at += packed
            bitmap = bytearray(np.unpackbits(bits)[:saved_granules].tobytes())
            checkpoints.append(Checkpoint(str(item["name"]), float(item["created"]), bitmap,
                                          bool(item["exact"])))
        if at != len(raw):
            raise ValueError("length does not match the header")
        self.checkpoints = checkpoints
        self.active = checkpoints[-1].bitmap if checkpoints else None
        if checkpoints and header["in_use"]:
            checkpoints[-1].exact = False
            log.warning("checkpoints of %s: not closed cleanly (a crash?); what changed since "
                        "%s is no longer known exactly", self.path,
                        ", ".join(cp.name for cp in checkpoints))
        if size != self.size:
            actual, self.size = self.size, size
            self.resize(actual)


class DirtyBitmap:
    """What changed since a checkpoint (until a later one), block status by block status: an
    NBD `qemu:dirty-bitmap:` context (nbd.exports.ContextSource)."""

    def __init__(self, tracker: ChangeTracker, name: str, until: str | None = None) -> None:
        self.tracker = tracker
        self.name = name
        self.until = until

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.tracker.block_status(self.name, offset, length, self.until)


def bitmaps(tracker: ChangeTracker, until: str | None = None) -> dict[str, DirtyBitmap]:
    """The checkpoints whose changes are known exactly, by name: since each until now, or,
    with `until` (a snapshot's checkpoint), since each earlier one until that one. An
    inconsistent bitmap is left out: never served as exact."""
    names = [cp.name for cp in tracker.checkpoints]
    if until is not None:
        if until not in names:
            return {}
        names = names[:names.index(until)]
    return {name: DirtyBitmap(tracker, name, until) for name in names
            if tracker.exact(name, until)}
