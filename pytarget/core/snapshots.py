"""The hook through which other services act at the instant a snapshot is taken.

While the device server holds a set of logical units quiesced for a snapshot (no write in
flight, new writes held back, docs/snapshots.md), it calls every `QuiescedObserver` registered
on each member (`LogicalUnit.snapshot_observers`), after the member's snapshot exists and before
any write is let through. Changed-block tracking registers one to start a checkpoint at exactly
that instant, so "what changed since snapshot A" is well defined. An observer that raises
makes the whole set fail: the snapshots already taken are deleted and nothing is recorded.
Observers run on the event loop and must not block.
"""

from __future__ import annotations

from typing import Protocol

from .unit import UnitGeometry


class QuiescedUnit(UnitGeometry, Protocol):
    """What an observer learns of the logical unit."""


class QuiescedObserver(Protocol):
    def __call__(self, unit: QuiescedUnit, snapshot: str) -> None:
        """Snapshot `snapshot` of `unit` has just been taken; no write reaches the unit until
        this returns."""
        ...
