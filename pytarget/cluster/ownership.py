"""Which gateway owns a logical unit on a shared RBD image, following the gateways' liveness
through Ceph: `OwnershipMachine` decides (sans-I/O, time passed in) and `RadosOwnership` runs
it over one RADOS object per LU, on the RBD image's own librados client.

The record is the object `pytarget.owner.<image>` in the image's pool, in xattrs:

- `owner`: `{"epoch": E, "owner": NAME, "fenced": [ADDR...]}`, replaced only by one write
  operation that compares it first (`cmpxattr`), so of two gateways claiming from epoch E only
  one commits E + 1; the other re-reads and follows.
- `gw.NAME`: each gateway's heartbeat, `{"addrs": [ADDR...], "beat": N}`, rewritten every
  `heartbeat` seconds by that gateway through the client that also carries its data I/O;
  ADDR is that client's address, which fencing blocklists.

Every gateway reads the record after each heartbeat. A gateway whose heartbeat has not
changed for `timeout` seconds, by the reader's own clock, is dead. When the owner is dead,
every survivor makes its own port group transitioning (no gateway admits medium access while
a dead owner's writes might still land), and the first live gateway after the owner in the
configured order — only that one — blocklists the owner's client addresses, waits for the
OSD map that carries the blocklist, and claims epoch E + 1. Everyone then follows the record:
`LogicalUnit.set_owner` gives the new access states and their unit attention.

There is no automatic return to the configured owner: a gateway that restarts follows the
record (active/non-optimized where another gateway took over); an operator moves ownership by
changing `owner:` and reloading, and the new preferred gateway then claims without fencing.
A gateway whose own client has been blocklisted stays transitioning until it is restarted.
Design and figures: docs/scale-out-consistency.md.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backstore.librados import CMPXATTR_EQ, CREATE_EXCLUSIVE, LIBRADOS, Librados, check

log = logging.getLogger("pytarget.cluster")

OWNER_XATTR = "owner"
MEMBER_PREFIX = "gw."
BLOCKLIST_SECONDS = 3600  # the monitors' default expiry of a blocklist entry
DEFAULT_TIMEOUT = 8.0  # seconds without a heartbeat before a gateway is dead
DEFAULT_HEARTBEAT = 1.0  # seconds between heartbeats
EBLOCKLISTED = errno.ESHUTDOWN  # what librados returns to a blocklisted client


def object_name(image: str) -> str:
    """The ownership record of the LU on RBD image `image` (in the image's pool)."""
    return f"pytarget.owner.{image}"


# ------------------------------------------------------------------ the record
@dataclass(frozen=True)
class Member:
    """A gateway's heartbeat as last written."""

    addrs: tuple[str, ...]
    beat: int


@dataclass(frozen=True)
class Record:
    """The ownership record as read: the owner's epoch and name (epoch 0: nobody claimed yet),
    the client addresses fenced by the claim that made this epoch, every gateway's heartbeat,
    and the `owner` xattr's bytes (what a claim compares)."""

    epoch: int = 0
    owner: str | None = None
    fenced: tuple[str, ...] = ()
    members: dict[str, Member] = field(default_factory=dict)
    raw: bytes = b""


def encode_owner(epoch: int, owner: str | None, fenced: Sequence[str] = ()) -> bytes:
    return json.dumps({"epoch": epoch, "owner": owner, "fenced": list(fenced)},
                      sort_keys=True).encode()


def encode_member(addrs: Sequence[str], beat: int) -> bytes:
    return json.dumps({"addrs": list(addrs), "beat": beat}, sort_keys=True).encode()


def decode(xattrs: dict[str, bytes]) -> Record:
    """A record from the object's xattrs; entries that do not parse are ignored (a record with
    no readable `owner` is at epoch 0)."""
    raw = xattrs.get(OWNER_XATTR, b"")
    epoch, owner = 0, None
    fenced: tuple[str, ...] = ()
    try:
        doc = json.loads(raw) if raw else {}
        epoch = int(doc.get("epoch", 0))
        owner = doc.get("owner") if isinstance(doc.get("owner"), str) else None
        fenced = tuple(str(a) for a in doc.get("fenced", ()))
    except (ValueError, TypeError, AttributeError):
        epoch, owner = 0, None
    members: dict[str, Member] = {}
    for key, value in xattrs.items():
        if not key.startswith(MEMBER_PREFIX):
            continue
        try:
            doc = json.loads(value)
            members[key[len(MEMBER_PREFIX):]] = Member(tuple(str(a) for a in doc["addrs"]),
                                                       int(doc["beat"]))
        except (ValueError, TypeError, KeyError):
            continue
    return Record(epoch, owner, fenced, members, raw)


# ------------------------------------------------------------------ what the machine asks for
@dataclass(frozen=True)
class Follow:
    """Report `owner` as the active/optimized gateway (ends a transition here)."""

    owner: str


@dataclass(frozen=True)
class Transition:
    """The local port group is transitioning: no medium access until the next Follow."""

    reason: str


@dataclass(frozen=True)
class Claim:
    """Replace the record's owner, if it is still `expected` (bytes of the `owner` xattr), by
    this gateway at `epoch`, after fencing `fence` (the dead owner's addresses, if any)."""

    expected: bytes
    epoch: int
    previous: str | None
    fence: tuple[str, ...] = ()


Action = Follow | Transition | Claim


class OwnershipMachine:
    """One gateway's view of one LU's ownership. Feed it `start` once and `observe` after each
    read of the record, with the time; it returns what to do. Gateways are named; `gateways`
    is the configured order (which survivor takes over), `preferred` the configured owner."""

    def __init__(self, local: str, gateways: Sequence[str], preferred: str, timeout: float,
                 now: float) -> None:
        if local not in gateways or preferred not in gateways:
            raise ValueError(f"{local!r} and {preferred!r} must be among {list(gateways)}")
        self.local = local
        self.gateways = tuple(gateways)
        self.preferred = preferred
        self.timeout = timeout
        self.started = now
        self.addrs: tuple[str, ...] = ()  # this incarnation's client addresses
        self.view = preferred  # the owner the LU reports
        self.transitioning = False
        self.fenced_self = False
        self.record = Record()
        self.seen: dict[str, tuple[tuple[tuple[str, ...], int], float]] = {}
        self._claim_preferred = False

    # -------------------------------------------------------------- inputs
    def start(self, now: float, record: Record, addrs: Sequence[str]) -> list[Action]:
        """The first read, with this incarnation's client addresses. A previous incarnation
        of this gateway is not fenced: it is dead (nothing of it resends), or it is the
        logical unit a reload replaces, still finishing its commands."""
        self.addrs = tuple(addrs)
        return self.observe(now, record)

    def observe(self, now: float, record: Record) -> list[Action]:
        self.record = record
        for name, member in record.members.items():
            value = (member.addrs, member.beat)
            if name not in self.seen or self.seen[name][0] != value:
                self.seen[name] = (value, now)
        if self.fenced_self:
            return []
        owner = record.owner if record.epoch > 0 and record.owner in self.gateways \
            else self.preferred
        claim_preferred, self._claim_preferred = self._claim_preferred, False
        unclaimed = record.epoch == 0 or record.owner not in self.gateways
        if unclaimed and owner == self.local:
            return [Claim(record.raw, record.epoch + 1, record.owner)]
        if claim_preferred and owner != self.local:
            return [Claim(record.raw, record.epoch + 1, owner)]
        if owner == self.local or self.alive(owner, now):
            return self._follow(owner)
        actions: list[Action] = []
        if not self.transitioning:
            self.transitioning = True
            actions.append(Transition(f"owner {owner} silent for "
                                      f"{self.silence(owner, now):.1f} s"))
        if self.successor(owner, now) == self.local:
            dead = record.members.get(owner)
            fence = tuple(a for a in dead.addrs if a not in record.fenced) if dead else ()
            actions.append(Claim(record.raw, record.epoch + 1, owner, fence))
        return actions

    def fenced(self) -> list[Action]:
        """This gateway's own client was blocklisted: it may not touch the medium again."""
        if self.fenced_self:
            return []
        self.fenced_self = True
        self.transitioning = True
        return [Transition("this gateway was fenced (its client is blocklisted)")]

    def set_preferred(self, preferred: str) -> None:
        """An operator changed the configured owner (a reload): the new preferred gateway
        claims at the next observation, without fencing (the old owner is alive)."""
        if preferred not in self.gateways or preferred == self.preferred:
            return
        self.preferred = preferred
        self._claim_preferred = preferred == self.local

    # -------------------------------------------------------------- views
    def silence(self, name: str, now: float) -> float:
        """Seconds since `name`'s heartbeat last changed (or since this machine started, for a
        gateway not seen since)."""
        if name == self.local:
            return 0.0
        seen = self.seen.get(name)
        return now - (seen[1] if seen is not None else self.started)

    def alive(self, name: str, now: float) -> bool:
        return name == self.local or self.silence(name, now) < self.timeout

    def successor(self, owner: str, now: float) -> str:
        """The first live gateway after `owner` in the configured order (cyclic)."""
        i = self.gateways.index(owner) if owner in self.gateways else -1
        for k in range(1, len(self.gateways) + 1):
            name = self.gateways[(i + k) % len(self.gateways)]
            if name != owner and self.alive(name, now):
                return name
        return self.local

    def _follow(self, owner: str) -> list[Action]:
        if owner == self.view and not self.transitioning:
            return []
        self.view = owner
        self.transitioning = False
        return [Follow(owner)]


def parse_addrs(text: str) -> tuple[str, ...]:
    """Entity addresses from `rados_getaddrs` ("127.0.0.1:0/123" or "[v2:...,v1:...]"), in
    the form the blocklist takes (without the v1:/v2: type)."""
    out: list[str] = []
    for part in text.strip().strip("[]").split(","):
        part = part.strip()
        for prefix in ("v1:", "v2:", "any:"):
            part = part.removeprefix(prefix)
        if part and part not in out:
            out.append(part)
    return tuple(out)


class RadosOwnership:
    """Runs an `OwnershipMachine` for one LU: heartbeats, reads and claims on the record, the
    fencing it asks for, and the LU's hooks (`set_owner`, `begin_transition`) on the event
    loop. `handles` are the image's librados cluster and pool handles (addresses), so the
    heartbeat and the data share one client: fencing the address in a heartbeat fences the
    data path, and a gateway that cannot write its data cannot heartbeat either."""

    def __init__(self, handles: tuple[int, int], name: str, *, local: str,
                 gateways: Sequence[str], preferred: str, set_owner: Callable[[str], Any],
                 begin_transition: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT,
                 heartbeat: float = DEFAULT_HEARTBEAT, label: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cluster = ctypes.c_void_p(handles[0])
        self._ioctx = ctypes.c_void_p(handles[1])
        self.name = name
        self._oid = name.encode()
        self.label = label or name
        self.heartbeat = heartbeat
        self.clock = clock
        self.machine = OwnershipMachine(local, gateways, preferred, timeout, clock())
        self._set_owner = set_owner
        self._begin_transition = begin_transition
        self._lib: Librados | None = None
        self._beat = 0
        self._task: asyncio.Task[None] | None = None
        self._io = threading.Lock()  # held around every librados call; close waits on it
        self._closed = False
        self.events: list[tuple[float, str]] = []  # (clock, what): owners followed, fences

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        """Stop; returns once no librados call of this object is running (the image's client
        may be shut down after that)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        with self._io:
            self._lib = None

    def set_preferred(self, preferred: str) -> None:
        self.machine.set_preferred(preferred)

    def describe(self) -> dict[str, Any]:
        """For `pytarget status`: the record's epoch and owner, and how long ago each gateway's
        heartbeat changed, as seen here."""
        m = self.machine
        now = self.clock()
        return {"epoch": m.record.epoch, "record_owner": m.record.owner,
                "fenced": m.fenced_self, "timeout": m.timeout, "heartbeat": self.heartbeat,
                "heartbeats": {g: (round(m.silence(g, now), 1) if g in m.seen or g == m.local
                                   else None) for g in m.gateways},
                "events": [{"seconds_ago": round(now - when, 1), "event": what}
                           for when, what in self.events[-8:]]}

    # -------------------------------------------------------------- the loop
    async def _run(self) -> None:
        try:
            addrs, record = await self._first_read()
            await self._act(self.machine.start(self.clock(), record, addrs))
            while not self._closed:
                if not await self._tick():
                    return
                await asyncio.sleep(self.heartbeat)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: ownership stopped; the LU keeps its current access states",
                          self.label)

    async def _first_read(self) -> tuple[tuple[str, ...], Record]:
        """This client's addresses and the record, once the record can be reached."""
        while True:
            try:
                addrs = await asyncio.to_thread(self._prepare)
                return addrs, await asyncio.to_thread(self._read)
            except OSError as exc:
                log.warning("%s: cannot reach the ownership record yet (%s); the LU keeps its "
                            "configured owner meanwhile", self.label, exc)
                await asyncio.sleep(self.heartbeat)

    async def _tick(self) -> bool:
        """One heartbeat and one read of the record, and what the machine makes of it; False
        once this gateway is fenced."""
        try:
            await asyncio.to_thread(self._write_beat)
        except OSError as exc:
            if exc.errno == EBLOCKLISTED:
                log.error("%s: this gateway's client is blocklisted (another gateway took the "
                          "LU over); restart it to serve the LU again", self.label)
                await self._act(self.machine.fenced())
                return False
            log.warning("%s: heartbeat failed: %s", self.label, exc)
        try:
            record = await asyncio.to_thread(self._read)
            await self._act(self.machine.observe(self.clock(), record))
        except OSError as exc:
            if exc.errno == EBLOCKLISTED:
                await self._act(self.machine.fenced())
                return False
            log.warning("%s: ownership record: %s", self.label, exc)
        return True

    async def _act(self, actions: list[Action]) -> None:
        try:
            for action in actions:
                await self._do(action)
        except OSError as exc:
            log.error("%s: %s; trying again at the next heartbeat", self.label, exc)

    async def _do(self, action: Action) -> None:
        if isinstance(action, Follow):
            self._note(f"owner {action.owner} (epoch {self.machine.record.epoch})")
            self._set_owner(action.owner)
        elif isinstance(action, Transition):
            self._note(f"transitioning: {action.reason}")
            log.warning("%s: %s; transitioning", self.label, action.reason)
            self._begin_transition()
        else:
            await self._claim(action)

    async def _claim(self, claim: Claim) -> None:
        if claim.fence and claim.previous is not None:
            await asyncio.to_thread(self._fence, claim.previous, claim.fence)
        local = self.machine.local
        new = encode_owner(claim.epoch, local, claim.fence)
        won = await asyncio.to_thread(self._compare_and_set, claim.expected, new)
        if won:
            self._note(f"claimed epoch {claim.epoch} (was {claim.previous})")
            log.info("%s: %s owns the LU from epoch %d (was %s)", self.label, local,
                     claim.epoch, claim.previous or "unclaimed",
                     extra={"event": "ownership", "owner": local, "epoch": claim.epoch})
        else:
            log.info("%s: claim of epoch %d lost to another gateway; following the record",
                     self.label, claim.epoch)
        record = await asyncio.to_thread(self._read)
        await self._act(self.machine.observe(self.clock(), record))

    def _note(self, what: str) -> None:
        self.events.append((self.clock(), what))
        del self.events[:-32]

    # -------------------------------------------------------------- librados calls
    def _call(self, fn: Callable[[Librados], Any]) -> Any:
        with self._io:
            lib = self._lib
            if lib is None or self._closed:
                raise asyncio.CancelledError
            return fn(lib)

    def _prepare(self) -> tuple[str, ...]:
        """The record exists (created at epoch 0 unless it does) and this client's
        addresses."""
        with self._io:
            if self._closed:
                raise asyncio.CancelledError
            self._lib = LIBRADOS.get()

        def prepare(lib: Librados) -> tuple[str, ...]:
            op = lib.rados_create_write_op()
            try:
                lib.rados_write_op_create(op, CREATE_EXCLUSIVE, None)
                initial = encode_owner(0, None)
                lib.rados_write_op_setxattr(op, OWNER_XATTR.encode(), initial, len(initial))
                ret = lib.rados_write_op_operate(op, self._ioctx, self._oid, None, 0)
            finally:
                lib.rados_release_write_op(op)
            if ret != -errno.EEXIST:
                check(ret, f"creating {self.name}")
            text = ctypes.c_void_p()
            check(lib.rados_getaddrs(self._cluster, ctypes.byref(text)), "rados_getaddrs")
            try:
                return parse_addrs(ctypes.string_at(text.value or 0).decode())
            finally:
                lib.rados_buffer_free(text)

        return tuple(self._call(prepare))

    def _write_beat(self) -> None:
        self._beat += 1
        value = encode_member(self.machine.addrs, self._beat)
        key = (MEMBER_PREFIX + self.machine.local).encode()
        self._call(lambda lib: check(lib.rados_setxattr(self._ioctx, self._oid, key, value,
                                                        len(value)), "heartbeat"))

    def _read(self) -> Record:
        def read(lib: Librados) -> Record:
            it = ctypes.c_void_p()
            check(lib.rados_getxattrs(self._ioctx, self._oid, ctypes.byref(it)),
                  f"reading {self.name}")
            xattrs: dict[str, bytes] = {}
            try:
                while True:
                    key = ctypes.c_char_p()
                    value = ctypes.c_void_p()
                    length = ctypes.c_size_t()
                    check(lib.rados_getxattrs_next(it, ctypes.byref(key), ctypes.byref(value),
                                                   ctypes.byref(length)), "getxattrs")
                    if key.value is None:
                        break
                    xattrs[key.value.decode(errors="replace")] = ctypes.string_at(
                        value.value or 0, length.value) if length.value else b""
            finally:
                lib.rados_getxattrs_end(it)
            return decode(xattrs)
        return self._call(read)

    def _fence(self, gateway: str, addrs: Sequence[str]) -> None:
        started = self.clock()

        def fence(lib: Librados) -> None:
            for addr in addrs:
                check(lib.rados_blocklist_add(self._cluster, addr.encode(), BLOCKLIST_SECONDS),
                      f"blocklisting {addr}")
            check(lib.rados_wait_for_latest_osdmap(self._cluster), "waiting for the OSD map")
        self._call(fence)
        self._note(f"fenced {gateway} ({', '.join(addrs)})")
        log.warning("%s: fenced %s: client %s blocklisted in %.2f s", self.label, gateway,
                    ", ".join(addrs), self.clock() - started,
                    extra={"event": "fence", "gateway": gateway})

    def _compare_and_set(self, expected: bytes, new: bytes) -> bool:
        def operate(lib: Librados) -> bool:
            op = lib.rados_create_write_op()
            try:
                lib.rados_write_op_cmpxattr(op, OWNER_XATTR.encode(), CMPXATTR_EQ, expected,
                                            len(expected))
                lib.rados_write_op_setxattr(op, OWNER_XATTR.encode(), new, len(new))
                ret = lib.rados_write_op_operate(op, self._ioctx, self._oid, None, 0)
            finally:
                lib.rados_release_write_op(op)
            if ret in (-errno.ECANCELED, -errno.ENODATA):
                return False
            check(ret, f"claiming {self.name}")
            return True
        return bool(self._call(operate))
