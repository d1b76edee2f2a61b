"""ROD tokens (SPC-4 5.17.6, 8.3; SBC-3 4.29): creation by POPULATE TOKEN, validation for WRITE
USING TOKEN, inactivity expiry, deletion, and invalidation when the data they represent changes.

Point in time: a token is invalidated as soon as any write is granted an LBA range lock that
overlaps the ranges it represents (`LogicalUnit.write_observers`); a later WRITE USING TOKEN
then fails with INVALID TOKEN OPERATION, TOKEN CANCELLED, never copying a mix of old and new
data. A WRITE USING TOKEN holds shared locks on the source chunk it copies, so a write waits
for that chunk and invalidates the token before the next one.

Tokens of a logical unit whose gateways share state (`LogicalUnit.token_store`) are also in the
unit's token document (copy/sharedtokens.py), so any gateway can use them: POPULATE TOKEN
completes once every gateway has taken the new token in; a write that would invalidate one
waits until every gateway knows it is cancelled (and has finished the chunk it was copying
from it); uses, deletions and expiry are counted cluster-wide (docs/scale-out-consistency.md).

A token is 512 bytes: an 8-byte identifier, the creator's CSCD descriptor, the byte count, the
block device data, the target's name, and random bytes from `secrets`. Lookup is by identifier
and the whole token must match (compared in constant time), so a token cannot be forged; the
initiator that uses it must be able to access the logical unit the token was made from.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..core import limits
from ..core import sense as S
from ..core.designators import lu_designators, scsi_name
from ..core.sense import Asc, SenseError
from . import sharedtokens as shared
from .sharedtokens import SharedRecord, SharedTokens

if TYPE_CHECKING:
    from ..core.reservations import SharedDocument
    from ..core.task import Nexus
    from .unit import LogicalUnit

log = logging.getLogger("pytarget.copy")

Clock = Callable[[], float]

ROD_TYPE_AUR = 0x00010000  # access upon reference (SPC-4 table 119)
ROD_TYPE_BLOCK_ZERO = 0xFFFF0001  # block device zero ROD token (SBC-3 4.29.5)
TOKEN_LENGTH = 512
TOKEN_BODY_LENGTH = 0x01F8
MANAGEMENT_TOKEN_LENGTH = 96  # what REPORT ALL ROD TOKENS shows: no secret part
TARGET_DESCRIPTOR_AT = 128
MAX_TOMBSTONES = 4096
REMOTE_CREATOR = ("another gateway",)  # never an I_T nexus key of this gateway
NAA_DESIGNATOR = 0x3


@dataclass
class RodToken:
    ident: bytes
    raw: bytes  # b"" for a token another gateway made: only its digest and head are known
    lu: LogicalUnit
    ranges: tuple[tuple[int, int], ...]  # (LBA, blocks) on `lu`
    nbytes: int
    created: float
    last_used: float
    inactivity: int
    creator: tuple[Any, ...]
    users: int = 0  # WRITE USING TOKEN commands using it on this gateway
    invalid: Asc | None = None
    digest: bytes = b""  # SHA-256 of the whole token
    head: bytes = b""  # the ROD management token (REPORT ALL ROD TOKENS)
    shared: SharedTokens | None = None  # the unit's token document, once the token is in it
    cluster_users: int = 0  # users on every gateway, as the document counts them
    reading: int = 0  # chunks being copied from it on this gateway
    cancelling: asyncio.Future[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.raw:
            self.digest = self.digest or hashlib.sha256(self.raw).digest()
            self.head = self.head or self.raw[:MANAGEMENT_TOKEN_LENGTH]

    def expired(self, now: float) -> bool:
        if self.users or self.cluster_users:
            return False
        return (now >= self.last_used + self.inactivity
                or now >= self.created + limits.MAX_TOKEN_LIFETIME)

    def overlaps(self, lba: int, count: int) -> bool:
        return any(lba < start + n and start < lba + count for start, n in self.ranges)


class TokenAuthority(Protocol):
    """Who may use a token: the copy manager's view of its targets and their access control."""

    def is_local_target(self, name: str) -> bool: ...
    def accessible(self, nexus: Nexus, lu: LogicalUnit) -> bool: ...
    def resolve_designator(self, nexus: Nexus, designator_type: int,
                           designator: bytes) -> LogicalUnit | None: ...


class TokenStore:
    """Every live ROD token of one copy manager (its own and, for units whose gateways share
    them, the other gateways'), and why recent ones died."""

    def __init__(self, manager: TokenAuthority, clock: Clock, wall: Clock = time.time) -> None:
        self.manager = manager
        self.clock = clock
        self.wall = wall  # for the token documents, which gateways with their own clocks read
        self.tokens: dict[bytes, RodToken] = {}
        self.tombstones: OrderedDict[bytes, tuple[bytes, Asc]] = OrderedDict()
        self.ledgers: dict[int, SharedTokens] = {}  # by id() of the logical unit
        self._quiet: asyncio.Condition | None = None

    def share(self, lu: LogicalUnit, store: SharedDocument) -> SharedTokens:
        """Keep `lu`'s tokens in `store` too, where every gateway of the unit finds them."""
        ledger = SharedTokens(lu, store, self.adopt, self.wall)
        self.ledgers[id(lu)] = ledger
        return ledger

    # ------------------------------------------------------------------ life cycle
    def create(self, lu: LogicalUnit, nexus: Nexus, ranges: list[tuple[int, int]],
               inactivity: int) -> RodToken:
        self.purge()
        if len(self.tokens) >= limits.MAX_ROD_TOKENS:
            raise S.insufficient_resources()
        mine = sum(1 for t in self.tokens.values() if t.creator == nexus.key)
        if mine >= limits.MAX_ROD_TOKENS_PER_NEXUS:
            raise S.insufficient_resources()  # one initiator cannot take every token slot
        ident = secrets.token_bytes(8)
        while ident in self.tokens or ident in self.tombstones:
            ident = secrets.token_bytes(8)
        nbytes = sum(n for _, n in ranges) * lu.block_size
        raw = _build(ident, lu, nexus, nbytes)
        now = self.clock()
        token = RodToken(ident, raw, lu, tuple(ranges), nbytes, now, now, inactivity, nexus.key)
        self.tokens[ident] = token
        return token

    def purge(self) -> None:
        now = self.clock()
        for token in [t for t in self.tokens.values() if t.expired(now)]:
            self._bury(token, Asc.INVALID_TOKEN_OPERATION_TOKEN_EXPIRED)

    def _bury(self, token: RodToken, reason: Asc) -> None:
        self.tokens.pop(token.ident, None)
        self.tombstones[token.ident] = (token.digest, reason)
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    async def publish(self, token: RodToken) -> None:
        """Put a new token of a unit with shared tokens in the unit's document; returns once
        every gateway has it (the caller holds shared locks on its ranges)."""
        ledger = self.ledgers.get(id(token.lu))
        if ledger is None:
            return
        wall, now = ledger.wall(), self.clock()
        record = SharedRecord(token.digest, token.head, token.ranges, token.nbytes,
                              wall - (now - token.created), wall - (now - token.last_used),
                              token.inactivity)

        def add(records: shared.Records, dead: shared.Dead) -> bool:
            if token.ident not in self.tokens:
                return False  # already dead
            records[token.ident] = record
            return True
        try:
            await ledger.change(add)
        except BaseException:
            self._bury(token, Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED)
            raise
        token.shared = ledger

    async def delete(self, token: RodToken) -> None:
        """DEL_TKN: the token dies once the WRITE USING TOKEN that named it is done."""
        reason = Asc.INVALID_TOKEN_OPERATION_TOKEN_DELETED
        if token.shared is not None:
            try:
                await token.shared.change(shared.kill(token.ident, reason))
            except SenseError:
                log.warning("%s: ROD token %s deleted here only: it lives on elsewhere until "
                            "it expires", token.shared.name, token.ident.hex())
        self._bury(token, reason)

    def blocks_written(self, lu: LogicalUnit, lba: int, count: int
                       ) -> asyncio.Future[None] | None:
        """A write to [lba, lba+count) of `lu` is about to happen: tokens of that data die.
        For a unit with shared tokens, what the write must wait for first: the current token
        document, and the cancellation of overlapping tokens on every gateway."""
        ledger = self.ledgers.get(id(lu)) if self.ledgers else None
        if ledger is not None and not ledger.trusted():
            return ledger.refreshing()
        if not self.tokens:
            return None  # every write asks: most of the time no token lives
        waits: list[asyncio.Future[None]] = []
        for token in list(self.tokens.values()):
            if token.lu is not lu or not token.overlaps(lba, count):
                continue
            if token.invalid is None:
                token.invalid = Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED
            if token.shared is not None and token.ident in token.shared.records:
                if token.cancelling is None:
                    token.cancelling = asyncio.ensure_future(self._cancel(token))
                    token.cancelling.add_done_callback(shared.retrieved)
                waits.append(token.cancelling)
            elif not token.users:
                self._bury(token, token.invalid)
        if not waits:
            return None
        return waits[0] if len(waits) == 1 else _together(waits)

    async def _cancel(self, token: RodToken) -> None:
        assert token.shared is not None
        try:
            await token.shared.change(
                shared.kill(token.ident, Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED))
        finally:
            token.cancelling = None

    def forget(self, lu: LogicalUnit) -> None:
        """`lu` is no longer served here: every token of its data dies here (other gateways
        that serve it keep theirs)."""
        self.ledgers.pop(id(lu), None)
        for token in [t for t in self.tokens.values() if t.lu is lu]:
            token.invalid = Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED
            token.shared = None
            if not token.users:
                self._bury(token, token.invalid)

    async def acquire(self, token: RodToken) -> None:
        token.users += 1
        token.last_used = self.clock()
        if token.shared is not None:
            try:
                await token.shared.change(shared.use(token.ident, 1, token.shared.wall()))
            except BaseException:
                token.users -= 1
                raise

    async def release(self, token: RodToken) -> None:
        token.users -= 1
        token.last_used = self.clock()
        ledger = token.shared
        if ledger is not None and token.ident in ledger.records:
            try:
                await ledger.change(shared.use(token.ident, -1, ledger.wall()))
            except SenseError:
                log.warning("%s: the end of a use of ROD token %s is not recorded: it expires "
                            "by its lifetime only", ledger.name, token.ident.hex())
        if token.invalid is not None and not token.users and token.ident in self.tokens:
            self._bury(token, token.invalid)

    def check(self, token: RodToken) -> None:
        """TOKEN CANCELLED (or EXPIRED) if the token died while in use."""
        if token.invalid is not None:
            raise S.copy_aborted(token.invalid, 0)

    @contextlib.asynccontextmanager
    async def reading(self, token: RodToken) -> AsyncIterator[None]:
        """Copy a chunk of the token's data: checked first, and a gateway that learns the token
        was cancelled elsewhere waits for the chunk before it acknowledges."""
        self.check(token)
        token.reading += 1
        try:
            yield
        finally:
            token.reading -= 1
            if not token.reading and self._quiet is not None:
                async with self._quiet:
                    self._quiet.notify_all()

    # ------------------------------------------------------------------ shared documents
    async def adopt(self, ledger: SharedTokens, drain: bool) -> None:
        """Mirror a newly installed version of `ledger`'s document in the tokens here. With
        `drain` (another gateway's change), new tokens are known before the writes already
        granted on their ranges have finished, and ended tokens are no longer read from."""
        lu = ledger.lu
        now, wall = self.clock(), ledger.wall()
        fresh: list[RodToken] = []
        for ident, record in ledger.records.items():
            last_used = now - max(0.0, wall - record.last_used)
            token = self.tokens.get(ident)
            if token is None:
                if ident in self.tombstones:
                    continue
                token = RodToken(ident, b"", lu, record.ranges, record.nbytes,
                                 now - max(0.0, wall - record.created), last_used,
                                 record.inactivity, REMOTE_CREATOR, digest=record.digest,
                                 head=record.head, shared=ledger)
                self.tokens[ident] = token
                fresh.append(token)
            else:
                token.last_used = max(token.last_used, last_used)
            token.cluster_users = record.users
        ended = [t for t in self.tokens.values()
                 if t.shared is ledger and t.ident not in ledger.records]
        for token in ended:
            if token.invalid is None:
                dead = ledger.dead.get(token.ident)
                token.invalid = (dead[1] if dead is not None
                                 else Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED)
            if not token.users:
                self._bury(token, token.invalid)
        if not drain:
            return
        for token in fresh:
            for lba, count in sorted(token.ranges):
                async with lu.ranges.shared(lba, count):
                    pass
        for token in ended:
            if token.reading:
                if self._quiet is None:
                    self._quiet = asyncio.Condition()
                async with self._quiet:
                    await self._quiet.wait_for(lambda t=token: not t.reading)  # type: ignore[misc]

    # ------------------------------------------------------------------ WRITE USING TOKEN
    async def lookup(self, raw: bytes, nexus: Nexus, at: int) -> RodToken:
        """The live token `raw` names, usable by `nexus`; otherwise the INVALID TOKEN OPERATION
        that says why (the field pointer `at` is where the token starts). A token of a unit
        with shared tokens is looked up in the unit's current document, wherever it was made."""
        rod_type, length = struct.unpack_from(">I2xH", raw, 0)
        if rod_type != ROD_TYPE_AUR:
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE, at)
        if length != TOKEN_BODY_LENGTH:
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_INVALID_TOKEN_LENGTH, at + 6)
        if not self.manager.is_local_target(_target_name(raw)):
            raise S.invalid_token(
                Asc.INVALID_TOKEN_OPERATION_REMOTE_TOKEN_USAGE_NOT_SUPPORTED, at)
        ident = raw[8:16]
        token = self.tokens.get(ident)
        ledger = token.shared if token is not None else self._ledger_of(raw, nexus)
        if ledger is not None:
            await ledger.current()
        self.purge()
        token = self.tokens.get(ident)
        digest = hashlib.sha256(raw).digest()
        if token is None:
            buried = self.tombstones.get(ident)
            if buried is None and ledger is not None:
                buried = ledger.dead.get(ident)
            if buried is not None and hmac.compare_digest(buried[0], digest):
                raise S.invalid_token(buried[1], at)
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN, at)
        if not hmac.compare_digest(token.digest, digest):
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_TOKEN_CORRUPT, at)
        if not self.manager.accessible(nexus, token.lu):
            # the initiator may not access the data: to it, the token does not exist
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN, at)
        if token.invalid is not None:
            raise S.invalid_token(token.invalid, at)
        return token

    def _ledger_of(self, raw: bytes, nexus: Nexus) -> SharedTokens | None:
        """The token document of the unit a token names as its creator (CREATOR LOGICAL UNIT
        DESCRIPTOR: an E4h descriptor with the unit's NAA designator), if `nexus` may access
        that unit and it shares its tokens."""
        if not self.ledgers or raw[16] != 0xE4 or raw[21] & 0x0F != NAA_DESIGNATOR:
            return None
        length = raw[23]
        if 24 + length > 48:
            return None
        lu = self.manager.resolve_designator(nexus, NAA_DESIGNATOR, raw[24:24 + length])
        return None if lu is None else self.ledgers.get(id(lu))

    def report(self, nexus: Nexus) -> list[bytes]:
        """REPORT ALL ROD TOKENS: the tokens of data this initiator may access, without their
        secret part."""
        self.purge()
        return [t.head for t in self.tokens.values()
                if t.invalid is None and self.manager.accessible(nexus, t.lu)]


def _together(waits: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """One future for several: done when all are, failed with the first failure."""
    together = cast("asyncio.Future[None]", asyncio.gather(*waits))
    together.add_done_callback(shared.retrieved)
    return together


def _build(ident: bytes, lu: LogicalUnit, nexus: Nexus, nbytes: int) -> bytes:
    raw = bytearray(TOKEN_LENGTH)
    struct.pack_into(">I2xH", raw, 0, ROD_TYPE_AUR, TOKEN_BODY_LENGTH)
    raw[8:16] = ident
    naa = lu_designators(lu.naa, lu.vendor, lu.serial)[0]
    creator = bytearray(32)  # CREATOR LOGICAL UNIT DESCRIPTOR: an E4h CSCD descriptor
    creator[0] = 0xE4
    creator[4:8 + naa[3]] = naa[:4 + naa[3]]
    creator[4] &= 0x0F
    creator[5] &= 0x3F
    creator[29:32] = lu.block_size.to_bytes(3, "big")
    raw[16:48] = creator
    raw[48:64] = nbytes.to_bytes(16, "big")
    struct.pack_into(">I", raw, 96, lu.block_size)  # READ CAPACITY(16) data from byte 8 on
    name = scsi_name(nexus.target_name)
    target = bytes((0x03, 0x28, 0, len(name))) + name  # SCSI name, association: target
    end = TARGET_DESCRIPTOR_AT + len(target)
    if end > TOKEN_LENGTH - 64:
        raise S.insufficient_resources()
    raw[TARGET_DESCRIPTOR_AT:end] = target
    raw[end:] = secrets.token_bytes(TOKEN_LENGTH - end)
    return bytes(raw)


def _target_name(raw: bytes) -> str:
    at = TARGET_DESCRIPTOR_AT
    length = raw[at + 3]
    if raw[at + 1] & 0x0F != 0x08 or at + 4 + length > TOKEN_LENGTH:
        return ""
    return raw[at + 4:at + 4 + length].split(b"\0", 1)[0].decode("utf-8", "replace")
