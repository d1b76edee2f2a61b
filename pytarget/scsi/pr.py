"""Persistent reservations (SPC-4 5.13, 6.15, 6.16) of one logical unit: registrations, the
reservation, the access check every command passes (SPC-4 5.13.1, SBC-3 4.17), the unit
attentions PERSISTENT RESERVE OUT establishes, and the APTPL state kept across restarts.

I_T nexus identity. A registration belongs to an I_T nexus: the iSCSI initiator port
"<initiator name>,i,0x<ISID>" together with the target port "<target name>,t,0x<TPGT>", which
is `Nexus.key` (iSCSI names compare without regard to case). A login with a new ISID is a new
I_T nexus and is not registered, even while the same initiator name holds a registration through
another ISID; a re-login with the same ISID (open-iscsi keeps the ISID of an interface) is the
same I_T nexus and finds its registration again. Logout, connection loss, session reinstatement,
LOGICAL UNIT RESET and target resets leave registrations and the reservation as they are.

A TransportID of format 00b (iSCSI name only) in SPEC_I_PT or REGISTER AND MOVE registers the
initiator node: the registration covers every ISID of that name. ALL_TG_PT=1 registers every
target port. No two registrations ever cover the same I_T nexus: a SPEC_I_PT TransportID that
names an I_T nexus already covered is skipped, that nexus being registered already.

Commands are applied to a copy of the state, which replaces the state only once it has been made
persistent (APTPL), so no command ever sees a state that could still be rolled back.

APTPL. While the last valid APTPL bit (REGISTER, REGISTER AND IGNORE EXISTING KEY, REGISTER AND
MOVE) is one, each change is written to `LuConfig.pr_state_path` before the command completes:
JSON into a temporary file, fsync, rename over the state file, fsync of the directory. If that
fails the command fails and the state stays as it was; if the failure comes after the rename, the
previous file is put back. An APTPL bit of zero removes the file. The file is read when the
logical unit is created; PRGENERATION starts at zero after every restart (SPC-4 6.15.2).

Shared state. A logical unit served by several gateways keeps the same state, and the SPC-2
reservation with it, in a `ReservationStore` (core/reservations.py) instead: one versioned
document that every change replaces by compare-and-update, retried on the latest version when
another gateway got there first. Each change also records what it owes to other gateways'
I_T nexuses (unit attentions, PREEMPT AND ABORT, a LOGICAL UNIT RESET); a gateway applies those
when it loads a newer version. Before a command that reservations can affect, the device
server makes sure the cached copy is the latest (`current`); docs/scale-out-consistency.md
has the argument. APTPL is then recorded and reported but the state is kept whatever its
value, and PRGENERATION is the cluster's: a gateway's restart is not the logical unit's.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..core import limits
from ..core import sense as S
from ..core.cdb import be16, be32, be64
from ..core.policy import Pr
from ..core.reservations import ReservationStore, Snapshot, StaleVersion
from ..core.sense import Asc
from ..core.table import ProutAction

if TYPE_CHECKING:
    from ..core.table import Cdb
    from ..core.task import Nexus, ScsiTask

log = logging.getLogger("pytarget.scsi.pr")

NexusKey = tuple[Any, ...]

# Registrations one logical unit holds; one more gives INSUFFICIENT REGISTRATION RESOURCES.
MAX_REGISTRATIONS = 256
PROTOCOL_ISCSI = 0x5  # PROTOCOL IDENTIFIER of iSCSI (SPC-4 7.6.1)
MAX_ISCSI_NAME = 223  # bytes (RFC 7143 4.2.7.1)
BASIC_PARAMETER_LIST = 24  # SPC-4 6.16.3
STATE_FORMAT = "pytarget-persistent-reservations"
_CACHE_LIMIT = 4096  # I_T nexuses whose registration lookup is remembered
STATE_VERSION = 1
SHARED_FORMAT = "pytarget-shared-reservations"
EVENTS_KEPT = 64  # changes whose unit attentions a gateway that fell behind can still catch up
MAX_ATTEMPTS = 100  # compare-and-update rounds lost to other gateways before giving up
_HEX_ISID = re.compile(r"^[0-9a-fA-F]{12}$")


T = TypeVar("T")


class PrConfig(Protocol):
    @property
    def pr_state_path(self) -> str | None: ...


class LogicalUnit(Protocol):
    """What persistent reservations and their commands need from the logical unit."""

    @property
    def lun(self) -> int: ...
    @property
    def naa(self) -> bytes: ...
    @property
    def config(self) -> PrConfig: ...
    @property
    def pr(self) -> PersistentReservations: ...
    @property
    def reservation(self) -> tuple[Any, ...] | None: ...
    @property
    def ua(self) -> Mapping[tuple[Any, ...], Any]: ...
    @property
    def tasks(self) -> Mapping[tuple[tuple[Any, ...], int], Any]: ...

    def establish_ua(self, asc: Asc, keys: Iterable[tuple[Any, ...]] | None = None,
                     skip: Nexus | None = None) -> None: ...
    async def abort_tasks_of(self, keys: set[tuple[Any, ...]]) -> None: ...
    async def reset(self, issuer: Nexus | None, power_on: bool = False,
                    publish: bool = True) -> None: ...
    def in_thread(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


class PrType(IntEnum):
    """Persistent reservation types (SPC-4 6.16.2)."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def write_exclusive(self) -> bool:
        return self in (PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                        PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)

    @property
    def registrants_only(self) -> bool:
        return self in (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                        PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)

    @property
    def all_registrants(self) -> bool:
        return self in (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)

    @property
    def mask_bit(self) -> int:
        """This type's bit in the PERSISTENT RESERVATION TYPE MASK (SPC-4 6.15.4)."""
        return 0x0001 if self is PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS else 1 << (8 + self)


_PR_TYPES = frozenset(int(t) for t in PrType)
TYPE_MASK = sum(t.mask_bit for t in PrType)
LU_SCOPE = 0x0
# REPORT CAPABILITIES byte 3: TMV, and ALLOW COMMANDS 011b: TEST UNIT READY passes every type,
# and the commands of Pr.READ's comment pass Write Exclusive types (SPC-4 6.15.4).
_TMV = 0x80
_ALLOW_COMMANDS = 0x3 << 4


# ---------------------------------------------------------------------------------- sense
class PrStateError(OSError):
    """The APTPL state file cannot be used; the logical unit is not brought up without it."""


# ---------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class InitiatorPort:
    """An initiator named by a TransportID: a port (with ISID) or a whole node (ISID None)."""

    name: str
    isid: bytes | None

    @property
    def text(self) -> str:
        if self.isid is None:
            return self.name
        return f"{self.name},i,0x{self.isid.hex()}"


@dataclass(eq=False)
class Registration:
    """One registered I_T nexus, or every I_T nexus a TransportID or ALL_TG_PT covers."""

    key: int
    initiator: str
    isid: bytes | None  # None: every ISID of the initiator (TransportID format 00b)
    target: str
    tpgt: int
    relative_port: int
    all_tg_pt: bool = False

    @classmethod
    def of(cls, nexus: Nexus, key: int, all_tg_pt: bool = False,
           port: InitiatorPort | None = None) -> Registration:
        name, isid = (port.name, port.isid) if port else (nexus.initiator_name, nexus.isid)
        return cls(key, name, isid, nexus.target_name, nexus.tpgt, nexus.relative_port, all_tg_pt)

    def matches(self, key: NexusKey) -> bool:
        """Does this registration cover the I_T nexus with this `Nexus.key`?"""
        return (key[0] == self.initiator.lower()
                and (self.isid is None or key[1] == self.isid)
                and (self.all_tg_pt or (key[2] == self.target.lower() and key[3] == self.tpgt)))

    def overlaps(self, other: Registration) -> bool:
        return (self.initiator.lower() == other.initiator.lower()
                and (self.isid is None or other.isid is None or self.isid == other.isid)
                and (self.all_tg_pt or other.all_tg_pt
                     or (self.target.lower() == other.target.lower()
                         and self.tpgt == other.tpgt)))

    @property
    def nexus_key(self) -> NexusKey | None:
        """The one I_T nexus this registration names, when it names exactly one."""
        if self.isid is None:
            return None
        return (self.initiator.lower(), self.isid, self.target.lower(), self.tpgt)

    @property
    def port(self) -> InitiatorPort:
        return InitiatorPort(self.initiator, self.isid)


@dataclass
class PrState:
    registrations: list[Registration] = field(default_factory=list)
    type: PrType | None = None
    holder: Registration | None = None  # for types other than All Registrants
    generation: int = 0
    aptpl: bool = False
    spc2: NexusKey | None = None  # the I_T nexus holding an SPC-2 RESERVE

    def copy(self) -> PrState:
        regs = [replace(r) for r in self.registrations]
        holder = None
        for old, new in zip(self.registrations, regs, strict=False):
            if old is self.holder:
                holder = new
        return PrState(regs, self.type, holder, self.generation, self.aptpl, self.spc2)

    def find(self, key: NexusKey) -> Registration | None:
        for reg in self.registrations:
            if reg.matches(key):
                return reg
        return None

    def holds(self, reg: Registration) -> bool:
        """Is `reg` a persistent reservation holder (SPC-4 5.13.10)?"""
        return self.type is not None and (self.type.all_registrants or reg is self.holder)

    def release(self) -> None:
        self.type = None
        self.holder = None

    def bump(self) -> None:
        self.generation = (self.generation + 1) & 0xFFFFFFFF


@dataclass
class ProutParameters:
    """The PERSISTENT RESERVE OUT parameter list, decoded (SPC-4 6.16.3, 6.16.4)."""

    key: int
    sa_key: int
    spec_i_pt: bool = False
    all_tg_pt: bool = False
    aptpl: bool = False
    unreg: bool = False
    relative_port: int = 0
    transport_ids: list[InitiatorPort] = field(default_factory=list)


@dataclass
class _Outcome:
    changed: bool = False
    uas: list[tuple[Asc, list[Registration]]] = field(default_factory=list)
    preempted: list[Registration] = field(default_factory=list)

    def ua(self, asc: Asc, regs: list[Registration]) -> None:
        if regs:
            self.uas.append((asc, regs))


@dataclass
class _Event:
    """What one change of shared state owes the I_T nexuses of the other gateways."""

    version: int
    ident: str
    issuer: NexusKey | None
    uas: list[tuple[Asc, list[Registration]]] = field(default_factory=list)
    aborted: list[Registration] = field(default_factory=list)
    reset: bool = False


# ---------------------------------------------------------------------------------- TransportIDs
def parse_transport_id(data: bytes, at: int, end: int) -> tuple[InitiatorPort, int]:
    """The iSCSI TransportID at data[at:end] (SPC-4 7.6.4.6) and its length.

    Errors point at the offending byte of the parameter list; a TransportID cut short by `end`
    is a PARAMETER LIST LENGTH ERROR (SPC-4 6.16.3).
    """
    if end - at < 4:
        raise S.parameter_list_length_error()
    b0 = data[at]
    if b0 & 0x0F != PROTOCOL_ISCSI:
        raise S.invalid_field_in_parameter_list(at, 3)
    fmt = b0 >> 6
    if fmt not in (0, 1):
        raise S.invalid_field_in_parameter_list(at, 7)
    if b0 & 0x30:
        raise S.invalid_field_in_parameter_list(at, 5)
    additional = be16(data, at + 2)
    if additional < 20 or additional % 4:
        raise S.invalid_field_in_parameter_list(at + 2, 7)
    length = 4 + additional
    if at + length > end:
        raise S.parameter_list_length_error()
    body = data[at + 4:at + length]
    text, nul, _ = body.partition(b"\0")
    if not nul:
        raise S.invalid_field_in_parameter_list(at + length - 1, 7)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise S.invalid_field_in_parameter_list(at + 4, 7) from None
    isid: bytes | None = None
    name = decoded
    if fmt == 1:
        sep = decoded.lower().find(",i,0x")
        if sep < 0:
            raise S.invalid_field_in_parameter_list(at + 4, 7)
        name = decoded[:sep]
        isid_text = decoded[sep + 5:]
        if not _HEX_ISID.match(isid_text):
            raise S.invalid_field_in_parameter_list(at + 4 + len(name.encode()) + 5, 7)
        isid = bytes.fromhex(isid_text)
    raw_name = name.encode()
    if (not raw_name or len(raw_name) > MAX_ISCSI_NAME or "," in name
            or any(c.isspace() for c in name)):
        raise S.invalid_field_in_parameter_list(at + 4, 7)
    return InitiatorPort(name, isid), length


def encode_transport_id(port: InitiatorPort) -> bytes:
    """iSCSI TransportID: format 01b for an initiator port, 00b for a node (SPC-4 7.6.4.6)."""
    text = port.text.encode() + b"\0"
    text += bytes(-len(text) % 4)
    if len(text) < 20:
        text += bytes(20 - len(text))
    fmt = 0x00 if port.isid is None else 0x40
    return bytes((fmt | PROTOCOL_ISCSI, 0)) + len(text).to_bytes(2, "big") + text


def parse_prout_parameters(sa: int, data: bytes, aptpl_capable: bool) -> ProutParameters:
    """Decode and check a PERSISTENT RESERVE OUT parameter list of exactly len(data) bytes."""
    length = len(data)
    if length < BASIC_PARAMETER_LIST:
        raise S.parameter_list_length_error()
    params = ProutParameters(be64(data, 0), be64(data, 8))
    if sa == ProutAction.REGISTER_AND_MOVE:
        # SPC-4 6.16.4: bytes 16 reserved, 17 UNREG/APTPL, 18-19 RTPI, 20-23 TransportID length
        if data[16]:
            raise S.invalid_field_in_parameter_list(16, 7)
        if data[17] & 0xFC:
            raise S.invalid_field_in_parameter_list(17, data[17].bit_length() - 1)
        params.unreg = bool(data[17] & 0x02)
        params.aptpl = bool(data[17] & 0x01)
        if params.aptpl and not aptpl_capable:
            raise S.invalid_field_in_parameter_list(17, 0)
        params.relative_port = be16(data, 18)
        tid_length = be32(data, 20)
        if BASIC_PARAMETER_LIST + tid_length > length:
            raise S.parameter_list_length_error()
        end = BASIC_PARAMETER_LIST + tid_length
        port, used = parse_transport_id(data, BASIC_PARAMETER_LIST, end)
        params.transport_ids = [port]
        return params
    flags = data[20]
    if flags & 0xF2:
        raise S.invalid_field_in_parameter_list(20, (flags & 0xF2).bit_length() - 1)
    if data[21]:
        raise S.invalid_field_in_parameter_list(21, 7)
    params.spec_i_pt = bool(flags & 0x08)
    if params.spec_i_pt and sa != ProutAction.REGISTER:
        raise S.invalid_field_in_parameter_list(20, 3)
    if not params.spec_i_pt and length != BASIC_PARAMETER_LIST:
        raise S.parameter_list_length_error()
    if sa in (ProutAction.REGISTER, ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
        # ALL_TG_PT and APTPL mean something for these two only; the others ignore them.
        params.all_tg_pt = bool(flags & 0x04)
        params.aptpl = bool(flags & 0x01)
        if params.aptpl and not aptpl_capable:
            raise S.invalid_field_in_parameter_list(20, 0)
    if params.spec_i_pt:
        if length < BASIC_PARAMETER_LIST + 4:
            raise S.parameter_list_length_error()
        tpdl = be32(data, 24)
        end = BASIC_PARAMETER_LIST + 4 + tpdl
        if end > length:
            raise S.parameter_list_length_error()
        at = BASIC_PARAMETER_LIST + 4
        while at < end:
            port, used = parse_transport_id(data, at, end)
            params.transport_ids.append(port)
            at += used
    return params


# ---------------------------------------------------------------------------------- state
class PersistentReservations:
    """Registrations and the persistent reservation of one logical unit."""

    def __init__(self, lu: LogicalUnit, store: ReservationStore | None = None) -> None:
        self.lu = lu
        self.store = store
        self.path = None if store is not None else lu.config.pr_state_path
        self.state = PrState()
        self.version = 0  # of the shared document the state was decoded from
        self._lock = asyncio.Lock()
        self._cache: dict[NexusKey, Registration | None] = {}
        self._loaded = False
        self._doubt = False  # an update lost a race: the cached state is not the latest
        self._refresh_lock = asyncio.Lock()
        self._commit_lock = asyncio.Lock()
        self._events: list[_Event] = []
        self._own: set[str] = set()  # identities of events this gateway is committing
        self._background: set[asyncio.Task[None]] = set()
        if store is not None:
            store.subscribe(self._changed)
        elif self.path:
            self.state = self._load(self.path)

    # -------------------------------------------------------------- queries
    @property
    def active(self) -> bool:
        """True while any registration or reservation exists, or a PERSISTENT RESERVE OUT is
        being processed: RESERVE and RELEASE then conflict (SPC-2 5.5.1, CRH=0)."""
        state = self.state
        return bool(state.registrations) or state.type is not None or self._lock.locked()

    @property
    def generation(self) -> int:
        return self.state.generation

    @property
    def aptpl_capable(self) -> bool:
        return bool(self.path) or self.store is not None

    @property
    def shared(self) -> bool:
        return self.store is not None

    def registration(self, nexus: Nexus) -> Registration | None:
        key = nexus.key
        try:
            return self._cache[key]
        except KeyError:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            reg = self._cache[key] = self.state.find(key)
            return reg

    def check(self, nexus: Nexus, access: Pr, cdb: bytes | bytearray | memoryview | None = None
              ) -> None:
        """RESERVATION CONFLICT unless the reservation lets `nexus` run a command of class
        `access` (SPC-4 5.13.1, SBC-3 4.17)."""
        state = self.state
        rtype = state.type
        if rtype is None or access is Pr.ALLOWED or access is Pr.PR:
            return
        access = access.resolve(cdb)
        if access is Pr.ALLOWED:
            return
        reg = self.registration(nexus)
        if reg is not None and (rtype.registrants_only or rtype.all_registrants
                                or reg is state.holder):
            return
        if access is Pr.READ and rtype.write_exclusive:
            return
        raise S.reservation_conflict()

    # -------------------------------------------------------------- PERSISTENT RESERVE IN
    def read_keys(self) -> bytes:
        """READ KEYS parameter data (SPC-4 6.15.2): one key per registered I_T nexus."""
        state = self.state
        keys = b"".join(r.key.to_bytes(8, "big") for r in state.registrations)
        return state.generation.to_bytes(4, "big") + len(keys).to_bytes(4, "big") + keys

    def read_reservation(self) -> bytes:
        """READ RESERVATION parameter data (SPC-4 6.15.3)."""
        state = self.state
        header = state.generation.to_bytes(4, "big")
        if state.type is None:
            return header + bytes(4)
        key = 0 if state.holder is None else state.holder.key  # zero for All Registrants
        body = key.to_bytes(8, "big") + bytes(5) + bytes(((LU_SCOPE << 4) | state.type,)) + bytes(2)
        return header + len(body).to_bytes(4, "big") + body

    def report_capabilities(self) -> bytes:
        """REPORT CAPABILITIES parameter data (SPC-4 6.15.4): CRH=0 (RESERVE and RELEASE
        conflict while registrations exist), SIP_C, ATP_C, PTPL_C when APTPL can be stored."""
        b2 = 0x08 | 0x04 | (0x01 if self.aptpl_capable else 0)
        b3 = _TMV | _ALLOW_COMMANDS | (0x01 if self.state.aptpl else 0)
        return bytes((0, 8, b2, b3)) + TYPE_MASK.to_bytes(2, "big") + bytes(2)

    def read_full_status(self) -> bytes:
        """READ FULL STATUS parameter data (SPC-4 6.15.5) with iSCSI TransportIDs."""
        state = self.state
        body = bytearray()
        for reg in state.registrations:
            holder = state.holds(reg)
            tid = encode_transport_id(reg.port)
            body += reg.key.to_bytes(8, "big") + bytes(4)
            body.append((0x02 if reg.all_tg_pt else 0) | (0x01 if holder else 0))
            body.append((LU_SCOPE << 4) | state.type if holder and state.type is not None else 0)
            body += bytes(4) + reg.relative_port.to_bytes(2, "big")
            body += len(tid).to_bytes(4, "big") + tid
        return state.generation.to_bytes(4, "big") + len(body).to_bytes(4, "big") + bytes(body)

    # -------------------------------------------------------------- PERSISTENT RESERVE OUT
    async def prout(self, task: ScsiTask, sa: int, type_code: int,
                    params: ProutParameters) -> None:
        """Apply one PERSISTENT RESERVE OUT service action atomically (SPC-4 5.13.7-5.13.11)."""
        nexus = task.nexus
        action = _ACTIONS[ProutAction(sa)]
        async with self._lock:
            if self.store is not None:
                def change(st: PrState, out: _Outcome) -> None:
                    if st.spc2 is not None:
                        raise S.reservation_conflict()  # SPC-2 5.5.1
                    action(self, st, nexus, type_code, params, out)

                new, outcome = await self._commit(
                    change, nexus, aborted=sa == ProutAction.PREEMPT_AND_ABORT)
                if not outcome.changed:
                    return
            else:
                if self.lu.reservation is not None:
                    raise S.reservation_conflict()  # SPC-2 5.5.1
                old = self.state
                new = old.copy()
                outcome = _Outcome()
                action(self, new, nexus, type_code, params, outcome)
                if not outcome.changed:
                    return
                await self._persist(old, new)
                self.state = new
                self._cache.clear()
            for asc, regs in outcome.uas:
                keys = self._ua_keys(regs, nexus)
                if keys:
                    self.lu.establish_ua(asc, keys=keys)
            log.info("LUN %d: %s by %s: %d registrations, reservation %s, generation %d",
                     self.lu.lun, ProutAction(sa).name, nexus.initiator_port_name,
                     len(new.registrations), new.type.name if new.type else "none",
                     new.generation,
                     extra={"event": "reservation", "operation": ProutAction(sa).name,
                            "initiator": nexus.initiator_port_name,
                            "target": nexus.target_name, "lun": self.lu.lun})
            if sa == ProutAction.PREEMPT_AND_ABORT and outcome.preempted:
                await self._abort(outcome.preempted, nexus.key)

    # -------------------------------------------------------------- shared state
    def current(self) -> bool:
        """Whether the cached state may be acted on without reading the shared document."""
        store = self.store
        return store is None or (self._loaded and not self._doubt and not self._background
                                 and store.trusted())

    async def refresh(self) -> None:
        """Make the cached state the latest version of the shared document, establishing what
        the changes made through other gateways since the last one owe this gateway's I_T
        nexuses. The releases of I_T nexuses lost here are committed first, so no command
        after a nexus loss finds its SPC-2 reservation. NOT READY (target port unavailable)
        when the store cannot be reached: a gateway that cannot know the reservations
        executes nothing they could forbid."""
        if self._background:
            await asyncio.wait(list(self._background))
        await self._latest()

    async def _latest(self) -> None:
        store = self.store
        assert store is not None
        async with self._refresh_lock:
            if self._loaded and not self._doubt and store.trusted():
                return
            await self._reload()

    async def _reload(self) -> None:
        store = self.store
        assert store is not None
        self._doubt = False
        try:
            snapshot = await store.load()
        except OSError as exc:
            self._doubt = True
            log.error("LUN %d: cannot read the reservation state in %s: %s", self.lu.lun,
                      store.name, exc)
            raise S.port_unavailable() from exc
        await self._adopt(snapshot)

    async def _adopt(self, snapshot: Snapshot) -> None:
        if self._loaded and snapshot.version <= self.version:
            return
        if snapshot.document is None:
            state, events = PrState(), list[_Event]()
        else:
            try:
                state, events = self._from_shared_document(json.loads(snapshot.document))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                self._doubt = True
                log.error("LUN %d: unusable reservation state in %s: %s", self.lu.lun,
                          self.store.name if self.store else "", exc)
                raise S.port_unavailable() from None
        first = not self._loaded
        seen = self.version
        self.state, self.version, self._events = state, snapshot.version, events
        self._cache.clear()
        self._loaded = True
        if first:
            return
        missed = [e for e in events if e.version > seen]
        if missed and missed[0].version > seen + 1:
            log.warning("LUN %d: %d changes of the reservation state passed unseen; their unit "
                        "attentions are lost", self.lu.lun, missed[0].version - seen - 1)
        for event in missed:
            if event.ident in self._own:
                continue
            await self._apply_event(event)

    async def _apply_event(self, event: _Event) -> None:
        """What another gateway's change owes this gateway's I_T nexuses: the unit attentions
        (SPC-4 5.13.11), PREEMPT AND ABORT's aborts, a LOGICAL UNIT RESET (SAM-5 7.7)."""
        known = list(self.lu.ua)
        for asc, regs in event.uas:
            keys = {k for k in known if k != event.issuer and any(r.matches(k) for r in regs)}
            if keys:
                self.lu.establish_ua(asc, keys=keys)
        if event.aborted:
            await self._abort(event.aborted, event.issuer)
        if event.reset:
            await self.lu.reset(None, publish=False)

    async def _changed(self) -> None:
        """Another gateway changed the shared state: adopt it before acknowledging."""
        try:
            await self._latest()
        except S.SenseError:
            pass  # logged; commands re-read before they act

    async def _commit(self, change: Callable[[PrState, _Outcome], None], issuer: Nexus | None,
                      aborted: bool = False, reset: bool = False) -> tuple[PrState, _Outcome]:
        """Apply `change` to the latest shared state by compare-and-update, recomputed on the
        newer state whenever another gateway changed it first."""
        store = self.store
        assert store is not None
        async with self._commit_lock:
            for _attempt in range(MAX_ATTEMPTS):
                await self._latest()
                old = self.state
                new = old.copy()
                out = _Outcome()
                change(new, out)
                if not out.changed:
                    return new, out
                event = _Event(self.version + 1, os.urandom(8).hex(),
                               None if issuer is None else issuer.key, out.uas,
                               out.preempted if aborted else [], reset)
                events = [*self._events, event][-EVENTS_KEPT:]
                document = self._shared_document(new, events)
                self._own.add(event.ident)
                try:
                    version = await store.update(self.version, document)
                except StaleVersion:
                    self._doubt = True
                    continue
                except OSError as exc:
                    self._doubt = True
                    log.error("LUN %d: cannot update the reservation state in %s: %s",
                              self.lu.lun, store.name, exc)
                    raise S.port_unavailable() from exc
                finally:
                    self._own.discard(event.ident)
                if version > self.version:
                    self.state, self.version, self._events = new, version, events
                    self._cache.clear()
                return new, out
        log.error("LUN %d: %d updates of the reservation state in %s lost to other gateways",
                  self.lu.lun, MAX_ATTEMPTS, store.name)
        raise S.port_unavailable()

    # -------------------------------------------------------------- SPC-2 reservation
    async def reserve_unit(self, nexus: Nexus) -> bool:
        """Make `nexus` the SPC-2 RESERVE holder (SPC-2 7.21); True when it was not already.
        RESERVATION CONFLICT while another I_T nexus holds it or persistent reservation state
        exists (SPC-2 5.5.1)."""
        if self.store is None:
            holder = self.state.spc2
            if (holder is not None and holder != nexus.key) or self.active:
                raise S.reservation_conflict()
            self.state.spc2 = nexus.key
            return holder is None

        def change(st: PrState, out: _Outcome) -> None:
            if (st.spc2 is not None and st.spc2 != nexus.key) or st.registrations \
                    or st.type is not None:
                raise S.reservation_conflict()
            out.changed = st.spc2 is None
            st.spc2 = nexus.key

        _, out = await self._commit(change, nexus)
        return out.changed

    async def release_unit(self, key: NexusKey | None, reset: bool = False) -> bool:
        """Release the SPC-2 reservation if `key` holds it (RELEASE, I_T nexus loss: SPC-2
        7.19, 5.5.1); with `reset`, whoever holds it (LOGICAL UNIT RESET, SAM-5 7.7), and the
        other gateways reset too. True when a reservation was released."""
        if self.store is None:
            held = self.state.spc2 is not None and (reset or self.state.spc2 == key)
            if held:
                self.state.spc2 = None
            return held
        released: list[bool] = []

        def change(st: PrState, out: _Outcome) -> None:
            out.changed = reset or (st.spc2 is not None and st.spc2 == key)
            released.append(st.spc2 is not None and out.changed)
            if out.changed:
                st.spc2 = None

        await self._commit(change, None, reset=reset)
        return released[-1]

    def nexus_lost(self, nexus: Nexus) -> None:
        """An I_T nexus is gone: it loses its SPC-2 reservation on every gateway; persistent
        reservations stay (SPC-4 5.13.1)."""
        if self.state.spc2 != nexus.key:
            return
        if self.store is None:
            self.state.spc2 = None
            return
        runner = asyncio.get_running_loop().create_task(self._release_lost(nexus.key))
        self._background.add(runner)
        runner.add_done_callback(self._background.discard)

    async def _release_lost(self, key: NexusKey) -> None:
        try:
            await self.release_unit(key)
        except S.SenseError:
            log.error("LUN %d: the SPC-2 reservation of a lost I_T nexus stays until the "
                      "reservation state can be reached, or a LOGICAL UNIT RESET", self.lu.lun)

    def close(self) -> None:
        """Stop following the shared state (the logical unit is closing)."""
        for runner in self._background:
            runner.cancel()
        if self.store is not None:
            self.store.close()

    def _ua_keys(self, regs: list[Registration], issuer: Nexus) -> set[NexusKey]:
        """The I_T nexuses the registrations cover, except the one the command came through."""
        keys: set[NexusKey] = set()
        for reg in regs:
            exact = reg.nexus_key
            if exact is not None and not reg.all_tg_pt:
                keys.add(exact)
            else:
                keys.update(k for k in self.lu.ua if reg.matches(k))
                if exact is not None:
                    keys.add(exact)
        keys.discard(issuer.key)
        return keys

    async def _abort(self, preempted: list[Registration], issuer: NexusKey | None) -> None:
        """PREEMPT AND ABORT: end every task of the other I_T nexuses whose registrations were
        removed (SPC-4 5.13.11.5); with TAS=0 they learn of it through COMMANDS CLEARED BY
        ANOTHER INITIATOR (SAM-5 5.6). The issuing I_T nexus keeps its tasks."""
        keys = {k for k, _ in self.lu.tasks
                if k != issuer and any(r.matches(k) for r in preempted)}
        if not keys:
            return
        await self.lu.abort_tasks_of(keys)
        self.lu.establish_ua(Asc.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, keys=keys)

    # ---- service actions: each mutates `st` (a copy) and records what follows on `out`
    def _register(self, st: PrState, nexus: Nexus, type_code: int, p: ProutParameters,
                  out: _Outcome, ignore_key: bool = False) -> None:
        """REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 5.13.7)."""
        reg = st.find(nexus.key)
        if reg is None:
            if not ignore_key and p.key != 0:
                raise S.reservation_conflict()
            if p.sa_key == 0:
                return  # nothing to register: GOOD, nothing changes
            mine = Registration.of(nexus, p.sa_key, p.all_tg_pt)
            added = [mine]
            for port in p.transport_ids:
                other = Registration.of(nexus, p.sa_key, p.all_tg_pt, port)
                if not any(other.overlaps(r) for r in (*st.registrations, *added)):
                    added.append(other)
            if len(st.registrations) + len(added) > MAX_REGISTRATIONS:
                raise S.insufficient_registration_resources()
            st.registrations.extend(added)
        else:
            if not ignore_key and p.key != reg.key:
                raise S.reservation_conflict()
            if p.spec_i_pt:
                raise S.invalid_field_in_parameter_list(20, 3)
            if p.sa_key == 0:
                self._unregister(st, reg, out)
            else:
                reg.key = p.sa_key
        st.aptpl = p.aptpl
        st.bump()
        out.changed = True

    def _register_ignore(self, st: PrState, nexus: Nexus, type_code: int, p: ProutParameters,
                         out: _Outcome) -> None:
        self._register(st, nexus, type_code, p, out, ignore_key=True)

    @staticmethod
    def _unregister(st: PrState, reg: Registration, out: _Outcome) -> None:
        """Remove a registration; a holder's reservation goes with it, except that an All
        Registrants reservation lasts until its last registrant goes (SPC-4 5.13.11.3)."""
        st.registrations.remove(reg)
        rtype = st.type
        if rtype is None:
            return
        if rtype.all_registrants:
            if not st.registrations:
                st.release()
        elif st.holder is reg:
            st.release()
            if rtype.registrants_only:
                out.ua(Asc.RESERVATIONS_RELEASED, list(st.registrations))

    def _registered(self, st: PrState, nexus: Nexus, key: int) -> Registration:
        """The nexus's registration, or RESERVATION CONFLICT when it has none or `key` is not
        its reservation key (SPC-4 6.16.3)."""
        reg = st.find(nexus.key)
        if reg is None or reg.key != key:
            raise S.reservation_conflict()
        return reg

    def _reserve(self, st: PrState, nexus: Nexus, type_code: int, p: ProutParameters,
                 out: _Outcome) -> None:
        """RESERVE (SPC-4 5.13.9). PRGENERATION does not change."""
        reg = self._registered(st, nexus, p.key)
        rtype = PrType(type_code)
        if st.type is None:
            st.type = rtype
            st.holder = None if rtype.all_registrants else reg
            out.changed = True
            return
        if st.holds(reg) and st.type == rtype:
            return
        raise S.reservation_conflict()

    def _release(self, st: PrState, nexus: Nexus, type_code: int, p: ProutParameters,
                 out: _Outcome) -> None:
        """RELEASE (SPC-4 5.13.11.2): only a holder's release has an effect."""
        reg = self._registered(st, nexus, p.key)
        rtype = st.type
        if rtype is None or not st.holds(reg):
            return
        if type_code != rtype:
            raise S.invalid_release()
        st.release()
        if rtype.registrants_only or rtype.all_registrants:
            out.ua(Asc.RESERVATIONS_RELEASED, [r for r in st.registrations if r is not reg])
        out.changed = True

    def _clear(self, st: PrState, nexus: Nexus, type_code: int, p: ProutParameters,
               out: _Outcome) -> None:
        """CLEAR (SPC-4 5.13.11.6): no reservation, no registrations."""
        reg = self._registered(st, nexus, p.key)
        out.ua(Asc.RESERVATIONS_PREEMPTED, [r for r in st.registrations if r is not reg])
        st.registrations.clear()
        st.release()
        st.bump()
        out.changed = True

    def _preempt(self, st: PrState, nexus: Nexus, type_code: int, p: ProutParameters,
                 out: _Outcome) -> None:
        """PREEMPT and PREEMPT AND ABORT (SPC-4 5.13.11.4, 5.13.11.5)."""
        reg = self._registered(st, nexus, p.key)
        new_type = PrType(type_code)
        rtype = st.type
        if rtype is not None and rtype.all_registrants and p.sa_key == 0:
            removed = [r for r in st.registrations if r is not reg]
            st.registrations[:] = [reg]
            st.type = new_type
            st.holder = None if new_type.all_registrants else reg
        elif (rtype is not None and not rtype.all_registrants and st.holder is not None
              and st.holder.key == p.sa_key):
            removed = [r for r in st.registrations if r.key == p.sa_key and r is not reg]
            st.registrations[:] = [r for r in st.registrations if r not in removed]
            st.type = new_type
            st.holder = None if new_type.all_registrants else reg
            if new_type != rtype:
                out.ua(Asc.RESERVATIONS_RELEASED, [r for r in st.registrations if r is not reg])
        else:
            # Only registrations go; the reservation, if any, stays (SPC-4 5.13.11.4.4).
            if p.sa_key == 0:
                raise S.invalid_field_in_parameter_list(8, 7)
            removed = [r for r in st.registrations if r.key == p.sa_key]
            if not removed:
                raise S.reservation_conflict()
            st.registrations[:] = [r for r in st.registrations if r not in removed]
            if rtype is not None and rtype.all_registrants and not st.registrations:
                st.release()
        out.ua(Asc.REGISTRATIONS_PREEMPTED, removed)
        out.preempted = removed
        st.bump()
        out.changed = True

    def _register_and_move(self, st: PrState, nexus: Nexus, type_code: int,
                           p: ProutParameters, out: _Outcome) -> None:
        """REGISTER AND MOVE (SPC-4 5.13.8)."""
        reg = self._registered(st, nexus, p.key)
        if p.sa_key == 0:
            raise S.invalid_field_in_parameter_list(8, 7)
        if st.type is None or st.type.all_registrants or st.holder is not reg:
            raise S.reservation_conflict()
        if p.relative_port != nexus.relative_port:
            raise S.invalid_field_in_parameter_list(18, 7)
        dest = Registration.of(nexus, p.sa_key, port=p.transport_ids[0])
        if dest.overlaps(reg):
            raise S.invalid_field_in_parameter_list(BASIC_PARAMETER_LIST, 7)
        existing = next((r for r in st.registrations if dest.overlaps(r)), None)
        if existing is None:
            if len(st.registrations) >= MAX_REGISTRATIONS:
                raise S.insufficient_registration_resources()
            st.registrations.append(dest)
        else:
            existing.key = p.sa_key
            dest = existing
        st.holder = dest
        if p.unreg:
            st.registrations.remove(reg)
        st.aptpl = p.aptpl
        st.bump()
        out.changed = True

    # -------------------------------------------------------------- APTPL
    async def _persist(self, old: PrState, new: PrState) -> None:
        """Make `new` what a restart finds, or fail leaving `old` in place."""
        if self.path is None or not (new.aptpl or old.aptpl):
            return
        data = self._document(new) if new.aptpl else None
        previous = self._document(old) if old.aptpl else None
        try:
            await self.lu.in_thread(store_state_file, self.path, data, previous)
        except OSError as exc:
            log.error("LUN %d: cannot store persistent reservations in %s: %s",
                      self.lu.lun, self.path, exc)
            # A full filesystem is a lack of resources to keep the registration (SPC-4 5.13.7:
            # INSUFFICIENT REGISTRATION RESOURCES, an ILLEGAL REQUEST that changed nothing);
            # any other failure of the nonvolatile store is the target's own hardware failing.
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise S.insufficient_registration_resources() from exc
            raise S.internal_target_failure() from exc

    def _document(self, st: PrState) -> bytes:
        reservation = None
        if st.type is not None:
            holder = None if st.holder is None else st.registrations.index(st.holder)
            reservation = {"type": int(st.type), "scope": LU_SCOPE, "holder": holder}
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "lun": self.lu.lun,
            "naa": self.lu.naa.hex(),
            "registrations": [_registration_document(r) for r in st.registrations],
            "reservation": reservation,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    def _shared_document(self, st: PrState, events: list[_Event]) -> bytes:
        """The shared document: the APTPL file's content, the generation, the APTPL bit, the
        SPC-2 holder, and the last changes' events."""
        doc = json.loads(self._document(st))
        doc["format"] = SHARED_FORMAT
        doc["generation"] = st.generation
        doc["aptpl"] = st.aptpl
        doc["spc2"] = None if st.spc2 is None else _key_document(st.spc2)
        doc["events"] = [
            {"version": e.version, "id": e.ident,
             "issuer": None if e.issuer is None else _key_document(e.issuer),
             "uas": [[int(asc), [_registration_document(r) for r in regs]]
                     for asc, regs in e.uas],
             "aborted": [_registration_document(r) for r in e.aborted], "reset": e.reset}
            for e in events]
        return json.dumps(doc, separators=(",", ":")).encode()

    def _from_shared_document(self, doc: Any) -> tuple[PrState, list[_Event]]:
        if not isinstance(doc, dict) or doc.get("format") != SHARED_FORMAT:
            raise ValueError("not pytarget's shared reservation state")
        doc = dict(doc, format=STATE_FORMAT)
        state = self._from_document(doc)
        generation = doc["generation"]
        if not isinstance(generation, int) or not 0 <= generation <= 0xFFFFFFFF:
            raise ValueError(f"bad generation {generation!r}")
        state.generation = generation
        state.aptpl = bool(doc["aptpl"])
        state.spc2 = None if doc["spc2"] is None else _key_from_document(doc["spc2"])
        events = [
            _Event(int(e["version"]), str(e["id"]),
                   None if e["issuer"] is None else _key_from_document(e["issuer"]),
                   [(Asc(asc), [_registration_from_document(r) for r in regs])
                    for asc, regs in e["uas"]],
                   [_registration_from_document(r) for r in e["aborted"]], bool(e["reset"]))
            for e in doc["events"]]
        return state, events

    def _load(self, path: str) -> PrState:
        try:
            os.unlink(path + ".tmp")  # an interrupted write never became the state
        except FileNotFoundError:
            pass
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return PrState()
        try:
            state = self._from_document(json.loads(raw))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise PrStateError(errno.EINVAL, f"unusable persistent reservation state ({exc}); "
                               "remove the file to start without it", path) from None
        log.info("LUN %d: restored %d registrations and %s from %s", self.lu.lun,
                 len(state.registrations),
                 f"a {state.type.name} reservation" if state.type else "no reservation", path)
        return state

    def _from_document(self, doc: Any) -> PrState:
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError("not a pytarget persistent reservation file")
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported version {doc.get('version')!r}")
        if doc.get("lun") != self.lu.lun or doc.get("naa") != self.lu.naa.hex():
            raise ValueError(f"written for LUN {doc.get('lun')} NAA {doc.get('naa')}, not for "
                             f"LUN {self.lu.lun} NAA {self.lu.naa.hex()}")
        regs: list[Registration] = []
        for item in doc["registrations"]:
            reg = _registration_from_document(item)
            if any(reg.overlaps(r) for r in regs):
                raise ValueError(f"two registrations for {reg.port.text}")
            regs.append(reg)
        state = PrState(regs, aptpl=True)
        res = doc["reservation"]
        if res is not None:
            rtype = PrType(res["type"])
            if res.get("scope", LU_SCOPE) != LU_SCOPE:
                raise ValueError("bad scope")
            holder = res["holder"]
            if rtype.all_registrants:
                if holder is not None or not regs:
                    raise ValueError("bad all-registrants reservation")
            else:
                if not isinstance(holder, int) or not 0 <= holder < len(regs):
                    raise ValueError("bad reservation holder")
                state.holder = regs[holder]
            state.type = rtype
        return state


def _registration_document(r: Registration) -> dict[str, Any]:
    return {"key": f"0x{r.key:016x}", "initiator": r.initiator,
            "isid": None if r.isid is None else r.isid.hex(), "target": r.target,
            "tpgt": r.tpgt, "relative_target_port": r.relative_port, "all_tg_pt": r.all_tg_pt}


def _registration_from_document(item: Any) -> Registration:
    key = int(item["key"], 16)
    isid = item["isid"]
    if not 0 < key < 1 << 64:
        raise ValueError(f"bad reservation key {item['key']!r}")
    if isid is not None and not _HEX_ISID.match(isid):
        raise ValueError(f"bad ISID {isid!r}")
    if not isinstance(item["initiator"], str) or not isinstance(item["target"], str):
        raise ValueError("bad name")
    return Registration(key, item["initiator"], None if isid is None else bytes.fromhex(isid),
                        item["target"], int(item["tpgt"]), int(item["relative_target_port"]),
                        bool(item["all_tg_pt"]))


def _key_document(key: NexusKey) -> list[Any]:
    initiator, isid, target, tpgt = key
    return [initiator, isid.hex(), target, tpgt]


def _key_from_document(item: Any) -> NexusKey:
    initiator, isid, target, tpgt = item
    if not isinstance(initiator, str) or not isinstance(target, str) \
            or not _HEX_ISID.match(isid) or not isinstance(tpgt, int):
        raise ValueError(f"bad I_T nexus {item!r}")
    return (initiator, bytes.fromhex(isid), target, tpgt)


_ACTIONS = {
    ProutAction.REGISTER: PersistentReservations._register,
    ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY: PersistentReservations._register_ignore,
    ProutAction.RESERVE: PersistentReservations._reserve,
    ProutAction.RELEASE: PersistentReservations._release,
    ProutAction.CLEAR: PersistentReservations._clear,
    ProutAction.PREEMPT: PersistentReservations._preempt,
    ProutAction.PREEMPT_AND_ABORT: PersistentReservations._preempt,
    ProutAction.REGISTER_AND_MOVE: PersistentReservations._register_and_move,
}


# ---------------------------------------------------------------------------------- state file
def store_state_file(path: str, data: bytes | None, previous: bytes | None) -> None:
    """Make `path` hold `data` durably (None: no file); on failure `previous` stays.

    Crash-safe: temporary file, fsync, rename, fsync of the directory. Runs on an I/O thread.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp"
    switched = False
    try:
        if data is None:
            try:
                os.unlink(path)
                switched = True
            except FileNotFoundError:
                pass
        else:
            _write_synced(tmp, data)
            os.replace(tmp, path)
            switched = True
        _fsync_directory(directory)
    except OSError:
        _unlink_quietly(tmp)
        if switched:
            _put_back(path, previous)
        raise


def _write_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _put_back(path: str, previous: bytes | None) -> None:
    try:
        if previous is None:
            _unlink_quietly(path)
        else:
            _write_synced(path + ".tmp", previous)
            os.replace(path + ".tmp", path)
        _fsync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        log.critical("cannot restore %s after a failed update: %s; a restart may find the "
                     "failed command's state", path, exc)


# ---------------------------------------------------------------------------------- handlers
def _spc2_reserved(lu: LogicalUnit) -> None:
    """While any RESERVE(6/10) reservation exists, every PERSISTENT RESERVE IN and OUT
    conflicts, whatever its initiator (SPC-2 5.5.1)."""
    if lu.reservation is not None:
        raise S.reservation_conflict()


async def _persistent_reserve_in(lu: LogicalUnit, task: ScsiTask, cdb: Cdb,
                                 data: Callable[[PersistentReservations], bytes]) -> None:
    """PERSISTENT RESERVE IN (SPC-4 6.15). ADDITIONAL LENGTH always reports the whole list."""
    _spc2_reserved(lu)
    task.set_data_in(data(lu.pr)[:cdb.allocation_length])


async def read_keys(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_in(lu, task, cdb, PersistentReservations.read_keys)


async def read_reservation(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_in(lu, task, cdb, PersistentReservations.read_reservation)


async def report_capabilities(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_in(lu, task, cdb, PersistentReservations.report_capabilities)


async def read_full_status(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_in(lu, task, cdb, PersistentReservations.read_full_status)


async def _persistent_reserve_out(lu: LogicalUnit, task: ScsiTask, cdb: Cdb,
                                  action: ProutAction, typed: bool) -> None:
    """PERSISTENT RESERVE OUT (SPC-4 6.16): CDB checks, the parameter list, then the action.
    SCOPE and TYPE are checked for the actions that use them (`typed`)."""
    _spc2_reserved(lu)
    scope = cdb[2] >> 4
    type_code = cdb[2] & 0x0F
    length = cdb.parameter_list_length
    if typed:
        if scope != LU_SCOPE:
            raise S.invalid_field_in_cdb(2, 7)
        if action != ProutAction.RELEASE and type_code not in _PR_TYPES:
            raise S.invalid_field_in_cdb(2, 3)
    if length > limits.MAX_PARAMETER_LIST:
        raise S.invalid_field_in_cdb(cdb.offset_of("parameter_list_length"), 7)
    if length < BASIC_PARAMETER_LIST:
        raise S.parameter_list_length_error()
    data = await task.receive_data_out(length)
    if len(data) < length:
        raise S.parameter_list_length_error()
    params = parse_prout_parameters(action, bytes(data[:length]), lu.pr.aptpl_capable)
    await lu.pr.prout(task, action, type_code, params)


async def register(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.REGISTER, typed=False)


async def reserve(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.RESERVE, typed=True)


async def release(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.RELEASE, typed=True)


async def clear(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.CLEAR, typed=False)


async def preempt(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.PREEMPT, typed=True)


async def preempt_and_abort(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.PREEMPT_AND_ABORT, typed=True)


async def register_and_ignore_existing_key(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
                                  typed=False)


async def register_and_move(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    await _persistent_reserve_out(lu, task, cdb, ProutAction.REGISTER_AND_MOVE, typed=False)
