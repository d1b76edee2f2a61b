"""One logical unit's ROD tokens as every gateway serving it sees them: a versioned document in a
`SharedDocument` store (core/reservations.py), changed only by compare-and-update, whose change
notices each gateway adopts before it acknowledges them (docs/scale-out-consistency.md, *ROD
tokens*).

The document lists the unit's live tokens — for each the SHA-256 of the whole token (never the
token: the secret stays with the initiator), its first 96 bytes (the ROD management token that
REPORT ALL ROD TOKENS shows), the ranges and byte count it represents, its creation and last
use in wall-clock seconds, its inactivity timeout, and how many WRITE USING TOKEN commands use it
on any gateway — and the tokens that died last, with why. This module reads, decodes, expires
and commits; `TokenStore` (copy/tokens.py) decides the changes and mirrors the document in its
own tokens when it is adopted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..core import limits
from ..core import sense as S
from ..core.reservations import SharedDocument, Snapshot, StaleVersion
from ..core.sense import Asc

if TYPE_CHECKING:
    from .unit import LogicalUnit

log = logging.getLogger("pytarget.copy")

MAX_DEAD = 256  # dead tokens remembered, so that a late user learns why
MAX_TRIES = 32  # compare-and-update attempts of one change while other gateways keep winning
FORMAT = 1


@dataclass(frozen=True)
class SharedRecord:
    """A live token as the document holds it (times in wall-clock seconds)."""

    digest: bytes
    head: bytes
    ranges: tuple[tuple[int, int], ...]
    nbytes: int
    created: float
    last_used: float
    inactivity: int
    users: int = 0

    def expired(self, now: float) -> bool:
        if self.users:
            return False
        return (now >= self.last_used + self.inactivity
                or now >= self.created + limits.MAX_TOKEN_LIFETIME)


Records = dict[bytes, SharedRecord]
Dead = OrderedDict[bytes, tuple[bytes, Asc]]  # identifier -> (digest, why it died)
Edit = Callable[[Records, Dead], bool]  # changes the copies it is given; True if it did


def bury(dead: Dead, ident: bytes, digest: bytes, reason: Asc) -> None:
    dead.pop(ident, None)
    dead[ident] = (digest, reason)
    while len(dead) > MAX_DEAD:
        dead.popitem(last=False)


def kill(ident: bytes, reason: Asc) -> Edit:
    """An edit that ends token `ident` for `reason`."""
    def edit(records: Records, dead: Dead) -> bool:
        record = records.pop(ident, None)
        if record is None:
            return False
        bury(dead, ident, record.digest, reason)
        return True
    return edit


def use(ident: bytes, delta: int, now: float) -> Edit:
    """An edit that counts a WRITE USING TOKEN starting (+1) or ending (-1) at `now`."""
    def edit(records: Records, dead: Dead) -> bool:
        record = records.get(ident)
        if record is None:
            return False
        records[ident] = replace(record, users=max(0, record.users + delta), last_used=now)
        return True
    return edit


def encode(records: Records, dead: Dead) -> bytes:
    return json.dumps({
        "format": FORMAT,
        "tokens": [{"id": ident.hex(), "digest": r.digest.hex(), "head": r.head.hex(),
                    "ranges": [list(x) for x in r.ranges], "bytes": r.nbytes,
                    "created": r.created, "last_used": r.last_used,
                    "inactivity": r.inactivity, "users": r.users}
                   for ident, r in records.items()],
        "dead": [[ident.hex(), digest.hex(), int(reason)]
                 for ident, (digest, reason) in dead.items()],
    }, separators=(",", ":")).encode()


def decode(document: bytes | None) -> tuple[Records, Dead]:
    """The records of a document (none for an empty one); ValueError if it is not one."""
    records: Records = {}
    dead: Dead = OrderedDict()
    if not document:
        return records, dead
    try:
        doc = json.loads(document)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        for t in doc["tokens"]:
            records[bytes.fromhex(t["id"])] = SharedRecord(
                bytes.fromhex(t["digest"]), bytes.fromhex(t["head"]),
                tuple((int(a), int(n)) for a, n in t["ranges"]), int(t["bytes"]),
                float(t["created"]), float(t["last_used"]), int(t["inactivity"]),
                int(t["users"]))
        for ident, digest, reason in doc["dead"]:
            dead[bytes.fromhex(ident)] = (bytes.fromhex(digest), Asc(reason))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a ROD token document: {exc}") from exc
    return records, dead


def retrieved(future: asyncio.Future[None]) -> None:
    """A shared future's failure is its waiters' (each gets it); none may be left to be logged
    as never retrieved when nobody waited."""
    if not future.cancelled():
        future.exception()


OnAdopt = Callable[["SharedTokens", bool], Awaitable[None]]


class SharedTokens:
    """The token document of `lu` for this gateway: the version it last saw, its records, and
    the compare-and-update loop that changes it. `on_adopt(self, drain)` runs after every new
    version is installed (`drain`: it came from another gateway's change notice)."""

    def __init__(self, lu: LogicalUnit, store: SharedDocument, on_adopt: OnAdopt,
                 wall: Callable[[], float] = time.time) -> None:
        self.lu = lu
        self.store = store
        self.on_adopt = on_adopt
        self.wall = wall
        self.version = -1  # nothing read yet
        self.records: Records = {}
        self.dead: Dead = OrderedDict()
        self._stale = False  # an update of ours lost a race: read before acting again
        self._lock: asyncio.Lock | None = None
        self._refreshing: asyncio.Future[None] | None = None
        store.subscribe(self._changed)

    @property
    def name(self) -> str:
        return self.store.name

    def trusted(self) -> bool:
        """Whether `records` are the latest: read, not lost a race since, and the store vouches
        that no change notice has arrived since."""
        return self.version >= 0 and not self._stale and self.store.trusted()

    def refreshing(self) -> asyncio.Future[None]:
        """One re-read of the document shared by everyone who needs it now (not draining: the
        caller may hold range locks)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh(drain=False))
            self._refreshing.add_done_callback(retrieved)
        return self._refreshing

    async def current(self) -> None:
        """Make `records` the latest (NOT READY, TARGET PORT IN UNAVAILABLE STATE when the store
        cannot be read)."""
        if not self.trusted():
            await asyncio.shield(self.refreshing())

    async def refresh(self, drain: bool) -> None:
        self._stale = False
        try:
            snapshot = await self.store.load()
        except OSError as exc:
            log.warning("%s: cannot read the ROD tokens: %s", self.name, exc)
            raise S.port_unavailable() from exc
        await self._install(snapshot, drain)

    async def change(self, edit: Edit) -> None:
        """Apply `edit` (and expire what has expired) to the latest document and commit it by
        compare-and-update, recomputing from the newer document whenever another gateway got
        there first."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            for _ in range(MAX_TRIES):
                await self.current()
                records, dead = dict(self.records), OrderedDict(self.dead)
                changed = self._expire(records, dead)
                if not edit(records, dead) and not changed:
                    return
                try:
                    version = await self.store.update(self.version, encode(records, dead))
                except StaleVersion:
                    self._stale = True
                    continue
                except OSError as exc:
                    self._stale = True
                    log.warning("%s: cannot change the ROD tokens: %s", self.name, exc)
                    raise S.port_unavailable() from exc
                await self._install(Snapshot(version, None), False, (records, dead))
                return
        log.warning("%s: gave up changing the ROD tokens after %d conflicts", self.name,
                    MAX_TRIES)
        raise S.port_unavailable()

    def _expire(self, records: Records, dead: Dead) -> bool:
        now = self.wall()
        expired = [ident for ident, r in records.items() if r.expired(now)]
        for ident in expired:
            bury(dead, ident, records.pop(ident).digest,
                 Asc.INVALID_TOKEN_OPERATION_TOKEN_EXPIRED)
        return bool(expired)

    async def _install(self, snapshot: Snapshot, drain: bool,
                       decoded: tuple[Records, Dead] | None = None) -> None:
        if snapshot.version < self.version:
            return  # a read that a newer change overtook
        if decoded is None:
            try:
                decoded = decode(snapshot.document)
            except ValueError as exc:
                self.version = -1
                log.error("%s: version %d: %s; no ROD token of this unit is usable until it "
                          "is repaired", self.name, snapshot.version, exc)
                raise S.port_unavailable() from exc
        self.version = snapshot.version
        self.records, self.dead = decoded
        await self.on_adopt(self, drain)

    async def _changed(self) -> None:
        await self.refresh(drain=True)
