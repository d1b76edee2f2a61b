"""ROD tokens (SPC-4 5.17.6, 8.3; SBC-3 4.29): creation by POPULATE TOKEN, validation for WRITE
USING TOKEN, inactivity expiry, deletion, and invalidation when the data they represent changes.

Point in time: a token is invalidated as soon as any write is granted an LBA range lock that
overlaps the ranges it represents (`LogicalUnit.write_observers`); a later WRITE USING TOKEN
then fails with INVALID TOKEN OPERATION, TOKEN CANCELLED, never copying a mix of old and new
data. A WRITE USING TOKEN holds shared locks on the source chunk it copies, so a write waits
for that chunk and invalidates the token before the next one.

A token is 512 bytes: an 8-byte identifier, the creator's CSCD descriptor, the byte count, the
block device data, the target's name, and random bytes from `secrets`. Lookup is by identifier
and the whole token must match (compared in constant time), so a token cannot be forged; the
initiator that uses it must be able to access the logical unit the token was made from.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..core import limits
from ..core import sense as S
from ..core.designators import lu_designators, scsi_name
from ..core.sense import Asc

if TYPE_CHECKING:
    from ..core.task import Nexus
    from .unit import LogicalUnit

Clock = Callable[[], float]

ROD_TYPE_AUR = 0x00010000  # access upon reference (SPC-4 table 119)
ROD_TYPE_BLOCK_ZERO = 0xFFFF0001  # block device zero ROD token (SBC-3 4.29.5)
TOKEN_LENGTH = 512
TOKEN_BODY_LENGTH = 0x01F8
MANAGEMENT_TOKEN_LENGTH = 96  # what REPORT ALL ROD TOKENS shows: no secret part
TARGET_DESCRIPTOR_AT = 128
MAX_TOMBSTONES = 4096


@dataclass
class RodToken:
    ident: bytes
    raw: bytes
    lu: LogicalUnit
    ranges: tuple[tuple[int, int], ...]  # (LBA, blocks) on `lu`
    nbytes: int
    created: float
    last_used: float
    inactivity: int
    creator: tuple[Any, ...]
    users: int = 0
    invalid: Asc | None = None

    def expired(self, now: float) -> bool:
        if self.users:
            return False
        return (now >= self.last_used + self.inactivity
                or now >= self.created + limits.MAX_TOKEN_LIFETIME)

    def overlaps(self, lba: int, count: int) -> bool:
        return any(lba < start + n and start < lba + count for start, n in self.ranges)


class TokenAuthority(Protocol):
    """Who may use a token: the copy manager's view of its targets and their access control."""

    def is_local_target(self, name: str) -> bool: ...
    def accessible(self, nexus: Nexus, lu: LogicalUnit) -> bool: ...


class TokenStore:
    """Every live ROD token of one copy manager, and why recent ones died."""

    def __init__(self, manager: TokenAuthority, clock: Clock) -> None:
        self.manager = manager
        self.clock = clock
        self.tokens: dict[bytes, RodToken] = {}
        self.tombstones: OrderedDict[bytes, tuple[bytes, Asc]] = OrderedDict()

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
        self.tombstones[token.ident] = (hashlib.sha256(token.raw).digest(), reason)
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    def delete(self, token: RodToken) -> None:
        """DEL_TKN: the token dies once the WRITE USING TOKEN that named it is done."""
        self._bury(token, Asc.INVALID_TOKEN_OPERATION_TOKEN_DELETED)

    def blocks_written(self, lu: LogicalUnit, lba: int, count: int) -> None:
        """A write to [lba, lba+count) of `lu` is about to happen: tokens of that data die."""
        if not self.tokens:
            return  # every write asks: most of the time no token lives
        for token in list(self.tokens.values()):
            if token.lu is lu and token.invalid is None and token.overlaps(lba, count):
                token.invalid = Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED
                if not token.users:
                    self._bury(token, token.invalid)

    def forget(self, lu: LogicalUnit) -> None:
        """`lu` is gone: every token of its data dies."""
        for token in [t for t in self.tokens.values() if t.lu is lu]:
            token.invalid = Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED
            if not token.users:
                self._bury(token, token.invalid)

    def release(self, token: RodToken) -> None:
        token.users -= 1
        token.last_used = self.clock()
        if token.invalid is not None and not token.users and token.ident in self.tokens:
            self._bury(token, token.invalid)

    def check(self, token: RodToken) -> None:
        """TOKEN CANCELLED (or EXPIRED) if the token died while in use."""
        if token.invalid is not None:
            raise S.copy_aborted(token.invalid, 0)

    # ------------------------------------------------------------------ WRITE USING TOKEN
    def lookup(self, raw: bytes, nexus: Nexus, at: int) -> RodToken:
        """The live token `raw` names, usable by `nexus`; otherwise the INVALID TOKEN OPERATION
        that says why (the field pointer `at` is where the token starts)."""
        rod_type, length = struct.unpack_from(">I2xH", raw, 0)
        if rod_type != ROD_TYPE_AUR:
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE, at)
        if length != TOKEN_BODY_LENGTH:
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_INVALID_TOKEN_LENGTH, at + 6)
        if not self.manager.is_local_target(_target_name(raw)):
            raise S.invalid_token(
                Asc.INVALID_TOKEN_OPERATION_REMOTE_TOKEN_USAGE_NOT_SUPPORTED, at)
        self.purge()
        ident = raw[8:16]
        token = self.tokens.get(ident)
        if token is None:
            buried = self.tombstones.get(ident)
            if buried is not None and hmac.compare_digest(buried[0],
                                                          hashlib.sha256(raw).digest()):
                raise S.invalid_token(buried[1], at)
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN, at)
        if not hmac.compare_digest(token.raw, raw):
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_TOKEN_CORRUPT, at)
        if not self.manager.accessible(nexus, token.lu):
            # the initiator may not access the data: to it, the token does not exist
            raise S.invalid_token(Asc.INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN, at)
        if token.invalid is not None:
            raise S.invalid_token(token.invalid, at)
        return token

    def acquire(self, token: RodToken) -> None:
        token.users += 1
        token.last_used = self.clock()

    def report(self, nexus: Nexus) -> list[bytes]:
        """REPORT ALL ROD TOKENS: the tokens of data this initiator may access, without their
        secret part."""
        self.purge()
        return [t.raw[:MANAGEMENT_TOKEN_LENGTH] for t in self.tokens.values()
                if t.invalid is None and self.manager.accessible(nexus, t.lu)]


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
