"""Point-in-time snapshots taken by the device server: a set of logical units quiesced at one
instant, and a logical unit rolled back to one of its snapshots.

Quiescing uses the units' LBA range locks (core/locks.py), which every command that changes
blocks already holds exclusively over those blocks (WRITE and its variants, WRITE SAME, UNMAP,
COMPARE AND WRITE, ORWRITE, SANITIZE, and the copy manager's writes for EXTENDED COPY and WRITE
USING TOKEN, NBD's writes, trims and zeroes). A shared lock over a unit's whole medium is
therefore granted once every write granted before it has ended, and holds back every write
asked for after it, while reads go on. The members are locked in the order the copy manager
locks several units in (by `id`), so a copy holding one member's lock while it waits for
another's cannot deadlock with a snapshot: that is the FSRVP shadow-copy set, no write to any
member lands between the members' snapshots. Then the members' backstores take their snapshots
(all at once, on the I/O threads, so a set holds writes back about as long as its slowest
member takes), the `snapshot_observers` of every member run (core/snapshots.py), and the locks
are released.

A rollback takes an exclusive lock over the whole medium instead (readers too are kept out),
so the unit's write observers see every block change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from time import perf_counter
from typing import TYPE_CHECKING

from ..core.sense import Asc

if TYPE_CHECKING:
    from .device import LogicalUnit

log = logging.getLogger("pytarget.scsi")


class SnapshotError(Exception):
    """A snapshot operation was refused or failed; the message says why, for the operator."""


@contextlib.asynccontextmanager
async def quiesced(units: Sequence[LogicalUnit]) -> AsyncIterator[None]:
    """Hold every write to `units` back and wait until none is in flight; reads go on."""
    async with contextlib.AsyncExitStack() as stack:
        for lu in sorted(units, key=id):
            await stack.enter_async_context(lu.ranges.shared(0, max(lu.nblocks, 1)))
        yield


async def take(members: Sequence[tuple[LogicalUnit, str]]) -> tuple[dict[int, str], float]:
    """Snapshot every (unit, snapshot name) at one instant. Returns how each was made (by
    position in `members`) and how long writes were held back, in seconds. All or nothing:
    on any failure the snapshots already taken are deleted and SnapshotError says why."""
    units = [lu for lu, _ in members]
    if len({id(lu) for lu in units}) != len(units):
        raise SnapshotError("a logical unit appears twice in the set")
    methods: dict[int, str] = {}
    async with quiesced(units):
        held = perf_counter()
        try:
            takes = []
            for lu, name in members:
                assert lu.backstore is not None
                takes.append(lu.in_thread(lu.backstore.create_snapshot, name))
            outcomes = await asyncio.gather(*takes, return_exceptions=True)
            methods = {i: o for i, o in enumerate(outcomes) if isinstance(o, str)}
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            for lu, name in members:
                for observer in lu.snapshot_observers:
                    observer(lu, name)
        except BaseException as exc:
            for index in methods:
                lu, name = members[index]
                assert lu.backstore is not None
                try:
                    await lu.in_thread(lu.backstore.delete_snapshot, name)
                except OSError:
                    log.exception("LUN %d: snapshot %s could not be deleted after the set "
                                  "failed", lu.lun, name)
            if isinstance(exc, OSError):
                raise SnapshotError(_reason(exc)) from exc
            raise
        finally:
            elapsed = perf_counter() - held
    return methods, elapsed


async def rollback(lu: LogicalUnit, name: str) -> bool:
    """Make the unit's medium what snapshot `name` holds, with every command of the unit kept
    out meanwhile; True when its capacity changed. Every I_T nexus then gets CAPACITY DATA HAS
    CHANGED (2Ah/09h) when it did, else NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED
    (28h/00h): the blocks changed under the initiators' caches without a command of theirs
    (SPC-4 annex D, ASC and ASCQ assignments; SAM-5 5.14 unit attention conditions)."""
    backstore = lu.backstore
    assert backstore is not None
    if lu.readonly:
        raise SnapshotError(f"LUN {lu.lun} is read-only")
    before = lu.nblocks
    async with lu.ranges.exclusive(0, max(lu.nblocks, 1)):
        try:
            await lu.in_thread(backstore.rollback_snapshot, name)
            backstore.size = await lu.in_thread(backstore.medium_size)
        except OSError as exc:
            raise SnapshotError(_reason(exc)) from exc
        lu.nblocks = backstore.size // lu.block_size
    changed = lu.nblocks != before
    lu.establish_ua(Asc.CAPACITY_DATA_HAS_CHANGED if changed
                    else Asc.NOT_READY_TO_READY_CHANGE)
    return changed


def _reason(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
