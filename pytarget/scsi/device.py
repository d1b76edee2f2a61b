"""The device server of one logical unit: command dispatch, unit attentions, task set, resets.

`LogicalUnit._ended`, where every way of executing a command ends, is the only place a
`SenseError` becomes CHECK CONDITION (or another status) and the only place an unexpected
exception becomes HARDWARE ERROR / INTERNAL TARGET FAILURE. Dispatch, CDB validation and the
per-command policy (unit attentions, NOT READY, write protection, reservation conflicts) all
come from the logical unit's opcode table, which is given to it: the SPC/SBC rows of `opcodes`
joined with the rows of the services that serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from time import perf_counter, perf_counter_ns
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..backstore.base import Backstore, Capabilities, ReadHook
from ..backstore.threads import io_threads_busy as io_threads_busy
from ..backstore.threads import run_blocking
from ..core import limits, stats
from ..core import sense as S
from ..core.locks import RangeLock, _Request
from ..core.policy import Pr
from ..core.sense import Asc, SenseError, Status
from ..core.stats import (
    COMMANDS,
    DATA_IN,
    DATA_OUT,
    FIRST_BUCKET,
    LATENCY_NS,
    NOT_GOOD,
    SLOWEST,
    TOP_BUCKET,
)
from ..core.table import Cdb, Opcode, OpSpec, OpTable
from ..core.task import Nexus, ScsiTask
from . import vpd
from .alua import U_SUP, AluaState, PortGroups, TpgStatus
from .cbt import GRANULARITY, ChangeTracker, Checkpoint, CheckpointError
from .modes import ModePages
from .opcodes import NO_LU_TABLE, lu_table
from .pr import PersistentReservations
from .sanitize import SanitizeState
from .unit import LunDirectory

if TYPE_CHECKING:
    from ..core.copyservice import CopyServiceHooks
    from ..core.ownership import OwnershipService
    from ..core.reservations import ReservationStore, SharedDocument
    from ..core.snapshots import QuiescedObserver
    from .qos import QosGate

log = logging.getLogger("pytarget.scsi")
T = TypeVar("T")

VENDOR = "PYTARGET"
PRODUCT = "pytarget disk"
REVISION = "0001"
MAX_UA_QUEUE = 16
COPY_BUFFER_BYTES = 1 << 20
INLINE_WRITE_MAX = 262144  # larger writes go to the I/O threads
# Reads at least this large are lent from the page cache to fabrics that take views
# (ScsiTask.lend_data_in); below it a copy costs about as little as the residency check.
LEND_MIN = 16384
NEVER = 1 << 62  # a length no command reaches: the fast path is off
INLINE_WRITE_STALL = 0.020  # seconds (throttling pauses, not scheduling noise)
# Resets supersede every other pending unit attention (SAM-5 5.14).
_RESET_UAS = frozenset({Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET, Asc.POWER_ON_OCCURRED,
                        Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED})


class _UnitRangeLock(RangeLock):
    """The LU's range locks, which tell `write_observers` when blocks are about to change and
    mark the checkpoints' dirty bitmap once they have (`track`).

    Everything that changes blocks holds an exclusive lock on exactly those blocks, granted only
    once earlier readers of them are done; the copy manager uses this to invalidate ROD tokens
    (SBC-3 4.29.4). An exclusive lock reaching past the medium is a barrier (RESERVE), not a
    write. An observer may hold the write back (ROD tokens shared with other gateways, whose
    cancellation must reach them first): the lock is then granted only through `acquire`,
    which waits for what the observers return and asks them again; if that fails, the lock is
    released and the failure (a SenseError) is the command's.
    """

    def __init__(self, lu: LogicalUnit, tracker: ChangeTracker) -> None:
        super().__init__()
        self.lu = lu
        self.tracker = tracker
        self._unchanged: set[_Request] = set()

    async def acquire(self, start: int, count: int, exclusive: bool) -> _Request:
        req = await super().acquire(start, count, exclusive)
        if exclusive:
            try:
                while waits := self._will_write(start, count):
                    for wait in waits:
                        await asyncio.shield(wait)
            except BaseException:
                self.release(req)
                raise
        return req

    def try_acquire(self, start: int, count: int, exclusive: bool) -> _Request | None:
        req = super().try_acquire(start, count, exclusive)
        if req is not None and exclusive and self._will_write(start, count):
            self.release(req)
            return None
        return req

    def _will_write(self, start: int, count: int) -> list[asyncio.Future[None]]:
        if start + count > self.lu.nblocks:
            return []
        return [wait for observer in self.lu.write_observers
                if (wait := observer(start, max(count, 1))) is not None]

    def track(self, on: bool) -> None:
        """While the tracker has checkpoints, releasing an exclusive lock within the medium
        marks its blocks changed (scsi/cbt.py): the choke point every change passes through.
        Without checkpoints `release` calls nothing more (`on_exclusive_release` is None)."""
        self.on_exclusive_release = self._mark_changed if on else None
        if not on:
            self._unchanged.clear()

    def _mark_changed(self, req: _Request) -> None:
        tracker = self.tracker
        bitmap = tracker.active
        if bitmap is None:
            return
        if self._unchanged and req in self._unchanged:
            self._unchanged.discard(req)
            return
        lu = self.lu
        if req.end <= lu.nblocks:
            bs = lu.block_size
            first = req.start * bs >> tracker.shift
            if (req.end * bs - 1) >> tracker.shift == first:
                bitmap[first] = 1
            else:
                tracker.mark(req.start * bs, req.end * bs)

    def unchanged(self, req: _Request) -> None:
        if self.tracker.active is not None:
            self._unchanged.add(req)

    def held_writes(self) -> list[tuple[int, int]]:
        """Byte ranges of the medium that commands hold to change now."""
        bs, nblocks = self.lu.block_size, self.lu.nblocks
        return [(start * bs, end * bs) for start, end in self.exclusive_holds()
                if end <= nblocks]


@dataclass
class LuConfig:
    lun: int
    block_size: int = 512
    readonly: bool = False
    thin: bool = True
    removable: bool = False
    serial: str = ""
    naa: bytes = bytes(8)
    vendor: str = VENDOR
    product: str = PRODUCT
    revision: str = REVISION
    pr_state_path: str | None = None  # APTPL state file; None: APTPL=1 is not supported
    # The target port groups the LU is reached through (SPC-4 5.15) and its owner group
    # (None: the local one).
    port_groups: PortGroups = field(default_factory=PortGroups.single)
    owner: int | None = None
    sanitize_state_path: str | None = None  # sanitize in progress or failed; None: not kept
    sanitize_rate: int = 0  # bytes per second a sanitize OVERWRITE writes; 0: unlimited
    # SANITIZE is offered only where one process serves the medium: its in-progress state
    # (which fences every other command) is not shared between worker processes.
    sanitize: bool = True
    atomic_write_bytes: int = limits.ATOMIC_WRITE_BYTES  # the WRITE ATOMIC(16) length wanted
    checkpoint_state_path: str | None = None  # checkpoints' bitmaps; None: kept in memory only
    checkpoint_granularity: int = GRANULARITY  # bytes per bit of a new checkpoint chain


class LogicalUnit:
    """A direct-access block device (SBC-3) on a backstore.

    Its opcode table holds the SPC/SBC rows and the rows of `services`, the services that will
    serve it (`opcodes.lu_table`); without them it knows the SPC/SBC commands only. With a
    `reservations` store its persistent and SPC-2 reservations are shared with the other
    gateways serving the same logical unit (scsi/pr.py).
    """

    exists = True

    def __init__(self, config: LuConfig, backstore: Backstore | None,
                 directory: LunDirectory, services: Iterable[OpSpec] = (),
                 reservations: ReservationStore | None = None,
                 tokens: SharedDocument | None = None) -> None:
        self.config = config
        self.lun = config.lun
        self.backstore = backstore
        self.caps = backstore.caps if backstore is not None else Capabilities()
        self.directory = directory
        self.block_size = config.block_size
        self.nblocks = backstore.size // config.block_size if backstore else 0
        self.readonly = config.readonly or bool(backstore and backstore.readonly)
        self.thin = config.thin and (backstore is None or self.caps.thin)
        # COMPARE AND WRITE: in this process under the range lock, unless the medium is shared
        # and offers its own atomic compare-and-write (caps.compare_and_write_max), which then
        # bounds the length advertised and done (never a non-atomic fallback).
        self.medium_compare_and_write = self.caps.compare_and_write_max > 0
        self.max_compare_and_write_blocks = limits.MAX_COMPARE_AND_WRITE_BLOCKS
        if self.medium_compare_and_write:
            unit = self.caps.compare_and_write_max
            if self.caps.compare_and_write_boundary:
                unit = min(unit, self.caps.compare_and_write_boundary)
            self.max_compare_and_write_blocks = min(self.max_compare_and_write_blocks,
                                                    unit // config.block_size)
        self.atomic_write_blocks = atomic_write_blocks(self.caps, config.block_size,
                                                       config.atomic_write_bytes)
        self.table: OpTable = lu_table(self.thin, services,
                                       compare_and_write=self.max_compare_and_write_blocks > 0,
                                       atomic=bool(self.atomic_write_blocks),
                                       sanitize=config.sanitize)
        # The fast paths the backstore offers, as the lengths they start or stop at.
        self._inline_write_max = INLINE_WRITE_MAX if self.caps.write_inline else -1
        self._lend_min = LEND_MIN if self.caps.lend else NEVER
        self.removable = config.removable
        self.vendor = config.vendor
        self.product = config.product
        self.revision = config.revision
        self.serial = config.serial
        self.naa = config.naa
        self.third_party_copy = False
        self.max_write_same_blocks = limits.MAX_WRITE_SAME_BYTES // config.block_size
        self.vpd: dict[int, Callable[..., bytes]] = dict(vpd.PAGES)
        if not self.thin:
            del self.vpd[0xB2]
        self.mode = ModePages(self)
        self.write_observers: list[Callable[[int, int], asyncio.Future[None] | None]] = []
        self.token_store = tokens  # the copy manager shares the unit's ROD tokens through it
        # called while the unit is quiesced for a snapshot (core/snapshots.py)
        self.snapshot_observers: list[QuiescedObserver] = [self._checkpoint_with_snapshot]
        self.checkpoints = ChangeTracker.open(
            config.checkpoint_state_path if backstore is not None else None,
            backstore.size if backstore is not None else 0, config.checkpoint_granularity)
        self._ranges = _UnitRangeLock(self, self.checkpoints)
        self.ranges: RangeLock = self._ranges
        self.checkpoints.attach(self._ranges)
        self.copy_service: CopyServiceHooks | None = None  # see attach_copy_service
        self.qos: QosGate | None = None  # the target's QoS scheduler when a policy applies
        self.stats_copy_paths: dict[str, int] = {}
        self.stats_copy_bytes: dict[str, int] = {}
        self.stats_commands: dict[int, list[int]] = {}  # opcode -> stats row
        self.ua: dict[tuple[Any, ...], deque[Asc]] = {}
        self.tasks: dict[tuple[tuple[Any, ...], int], tuple[ScsiTask, asyncio.Task[Any]]] = {}
        self.medium_present = True
        self.prevent: set[tuple[Any, ...]] = set()  # nexuses preventing medium removal
        self.pr = PersistentReservations(self, reservations)
        self.alua = AluaState(config.port_groups, config.owner,
                              unavailable=reservations is not None)
        # Moves the owner when a gateway dies (a shared medium's; set by assembly).
        self.ownership: OwnershipService | None = None
        self.sanitize = SanitizeState(config.sanitize_state_path, config.sanitize_rate)
        self.closed = False
        self.stats_miscompares = 0
        self._inline_after = 0.0  # perf_counter() before which writes go to the I/O threads

    # ------------------------------------------------------------------ execution
    def start(self, task: ScsiTask) -> asyncio.Task[None]:
        """Enter the task into the task set and begin executing it."""
        runner = asyncio.get_running_loop().create_task(self.execute(task))
        key = (task.nexus.key, task.tag)
        self.tasks[key] = (task, runner)
        runner.add_done_callback(lambda _r: self.tasks.pop(key, None))
        return runner

    def submit(self, task: ScsiTask, on_done: Callable[[ScsiTask], None]) -> None:
        """Execute eagerly: run the command now, up to its first real wait.

        Most commands (page-cache reads, writes whose data came as immediate data) never
        wait: they finish here, with no asyncio Task and no extra loop iteration, and
        `on_done` runs at once. A command that must wait joins the task set as a Task that
        resumes it, so aborts and resets reach it like any other. A task whose execution was
        cancelled (abort, reset, connection loss) ends with `task.aborted` set.
        """
        coro = self._start(task)
        if coro is None:
            on_done(task)
            return
        try:
            waiting = coro.send(None)
        except StopIteration:
            on_done(task)
            return
        runner = asyncio.get_running_loop().create_task(_resume(coro, waiting, task))
        key = (task.nexus.key, task.tag)
        self.tasks[key] = (task, runner)

        def finished(_runner: asyncio.Task[None]) -> None:
            self.tasks.pop(key, None)
            on_done(task)

        runner.add_done_callback(finished)

    def _start(self, task: ScsiTask) -> Coroutine[Any, Any, None] | None:
        """Run a command as far as it goes without waiting: None when it ended here, else the
        coroutine that completes it.

        A command whose table row has a synchronous handler (`OpSpec.now`: a page-cache read,
        a write to the page cache) and that meets no QoS budget or shared reservation state
        runs here with no coroutine at all; the handler declines, having changed nothing, when
        it would have to wait, and the row's coroutine handler then runs from the start.
        """
        started = perf_counter_ns()
        try:
            raw = task.cdb
            table = self.table
            spec = table.plain.get(raw[0]) or table.lookup(raw)  # `lookup` without its call
            now = spec.now
            n = spec.cdb_len
            if now is None or self.qos is not None or self.pr.store is not None \
                    or len(raw) < n or int.from_bytes(raw[:n], "big") & spec.reserved:
                return self._run(task, started, spec)  # a reserved bit fails in its `parse`
            self._admit(task, spec)
            if not now(self, task, spec):
                return self._run(task, started, spec, spec.parse(raw))
        except BaseException as exc:
            self._ended(task, exc)
        self._account(task, started)
        return None

    async def execute(self, task: ScsiTask) -> None:
        """Run one command to completion; status, sense and Data-In are left on `task`."""
        await self._run(task, perf_counter_ns())

    async def _run(self, task: ScsiTask, started: int, spec: OpSpec | None = None,
                   admitted: Cdb | None = None) -> None:
        """A command from its table row on, one coroutine for all of it: with `admitted` (its
        parsed CDB), only the handler of a command `_start` has already checked and admitted."""
        try:
            if admitted is None:
                if spec is None:
                    spec = self.table.lookup(task.cdb)
                cdb = spec.parse(task.cdb)
                if self.qos is not None:  # storage QoS (scsi/qos.py): wait for the budget
                    wait = self.qos.admit(self.lun, self.block_size, self.nblocks, task, spec,
                                          cdb)
                    if wait is not None:
                        await wait
                pr = self.pr
                if pr.store is not None and not pr.current() \
                        and (spec.spc2 or spec.pr is not Pr.ALLOWED):
                    await pr.refresh()
                self._admit(task, spec)
            else:
                assert spec is not None
                cdb = admitted
            await spec.handler(self, task, cdb)
        except BaseException as exc:
            self._ended(task, exc)
        self._account(task, started)

    def _ended(self, task: ScsiTask, exc: BaseException) -> None:
        """A command's execution raised `exc`: its status and sense, or `exc` again when it
        is not the command's outcome (a cancellation other than an abort)."""
        if isinstance(exc, SenseError):
            self._fail(task, exc)
        elif isinstance(exc, asyncio.CancelledError):
            if not task.aborted:
                raise exc
            task.status = Status.TASK_ABORTED
            task.data_in = None
            task.data_in_len = 0
        elif isinstance(exc, Exception):
            log.error("LUN %d: internal failure executing %s", self.lun,
                      bytes(task.cdb).hex(), exc_info=exc)
            self._fail(task, S.internal_target_failure())
        else:
            raise exc

    def _account(self, task: ScsiTask, started: int) -> None:
        """The command's row of the per-opcode statistics."""
        if task.internal:
            return
        elapsed = perf_counter_ns() - started
        row = self.stats_commands.get(task.cdb[0])
        if row is None:
            row = self.stats_commands[task.cdb[0]] = stats.new_row()
        row[COMMANDS] += 1
        row[DATA_IN] += task.data_in_len
        row[DATA_OUT] += task.data_out_len
        if task.status:
            row[NOT_GOOD] += 1
        row[LATENCY_NS] += elapsed
        us = elapsed // 1000
        row[FIRST_BUCKET + (us.bit_length() if us < SLOWEST else TOP_BUCKET)] += 1

    def _fail(self, task: ScsiTask, exc: SenseError) -> None:
        task.status = exc.status
        task.sense = exc.encode(self.mode.d_sense) if exc.status == Status.CHECK_CONDITION else None
        task.data_in = None
        task.data_in_len = 0

    def _admit(self, task: ScsiTask, spec: OpSpec) -> None:
        """Per-command policy from the table: unit attentions, reservations, medium, protection.

        The copy manager's internal sub-commands neither see nor consume unit attentions.
        """
        nexus = task.nexus
        if not spec.ua_exempt and not task.internal:
            pending = self.ua.get(nexus.key)
            if pending is None or pending:
                pending = self._ua_queue(nexus)
                if pending:
                    raise S.unit_attention(pending.popleft())
        if self.sanitize.active:
            blocked = self.sanitize.blocks(spec.during_sanitize, spec.medium,
                                           spec.opcode == Opcode.SANITIZE)
            if blocked is not None:
                raise blocked
        if spec.spc2 and self.reservation is not None and self.reservation != nexus.key:
            raise S.reservation_conflict()
        pr = self.pr
        if pr.state.type is not None:  # what `check` tests first, without the call
            pr.check(nexus, spec.pr, task.cdb)
        if spec.medium and not self.medium_present:
            raise S.not_ready(Asc.MEDIUM_NOT_PRESENT)
        if self.alua.transitioning and (spec.medium or spec.writes):
            raise S.asymmetric_access_state_transition()
        if spec.writes and self.write_protected:
            raise S.write_protected()

    @property
    def reservation(self) -> tuple[Any, ...] | None:
        """The I_T nexus holding the SPC-2 RESERVE (SPC-2 5.5.1), if any."""
        return self.pr.state.spc2

    @property
    def write_protected(self) -> bool:
        return self.readonly or self.mode.software_write_protect

    def persistent_reservation_active(self) -> bool:
        return self.pr.active

    def vpd_pages(self) -> list[int]:
        return sorted(self.vpd)

    def attach_copy_service(self, service: CopyServiceHooks) -> None:
        """A copy manager serves this LU from now on: 3PC=1, VPD 8Fh and 85h, and resets and
        nexus losses reach its copies."""
        self.copy_service = service
        self.third_party_copy = True
        self.vpd[0x8F] = lambda lu, task: service.third_party_copy_page()
        self.vpd[0x85] = lambda lu, task: service.management_network_addresses()

    # ------------------------------------------------------------------ asymmetric access
    def set_owner(self, gateway: int | str) -> bool:
        """Make `gateway` (a target port group id or a gateway's name) the owner of this LU:
        its group becomes active/optimized, the others active/non-optimized, and any transition
        of the local group ends. Every I_T nexus then gets ASYMMETRIC ACCESS STATE CHANGED
        (SPC-4 5.15.2.6). True when a state changed; KeyError for an unknown gateway.

        The hook through which whatever decides ownership (the configuration on reload, a
        shared backstore's exclusive lock) moves it, on the event loop's thread; nothing else
        changes `alua`.
        """
        if not self.alua.set_owner(gateway):
            return False
        self.establish_ua(Asc.ASYMMETRIC_ACCESS_STATE_CHANGED)
        log.info("LUN %d: owner is now target port group %d (here: %s)", self.lun, self.alua.owner,
                 self.alua.local_state.name.lower(),
                 extra={"event": "alua", "lun": self.lun, "owner": self.alua.owner})
        return True

    def set_port_groups(self, groups: PortGroups, owner: int | None) -> bool:
        """The gateways changed (a reload): the LU is reached through `groups` from now on, with
        `owner` (a group id; None: the local group) as its preferred owner. The current owner
        stays while it still exists and the preferred owner did not change. Every I_T nexus
        gets ASYMMETRIC ACCESS STATE CHANGED when what REPORT TARGET PORT GROUPS says changed.
        True then."""
        old = self.alua
        new = AluaState(groups, owner, unavailable=bool(old.supported & U_SUP))
        if groups == old.groups and new.preferred == old.preferred:
            return False
        if new.preferred == old.preferred and any(g.id == old.owner for g in groups.groups):
            new.owner = old.owner
        new.pref_follows_owner = old.pref_follows_owner
        if new.owner != old.owner:
            new.status = TpgStatus.ALTERED_BY_IMPLICIT_BEHAVIOR
        else:
            new.status = old.status
        self.alua = new
        self.establish_ua(Asc.ASYMMETRIC_ACCESS_STATE_CHANGED)
        return True

    def begin_transition(self) -> None:
        """The local target port group is transitioning (an ownership move involving this
        gateway is under way) until the next `set_owner`."""
        self.alua.begin_transition()

    # ------------------------------------------------------------------ unit attentions
    def _ua_queue(self, nexus: Nexus) -> deque[Asc]:
        queue = self.ua.get(nexus.key)
        if queue is None:
            queue = self.ua[nexus.key] = deque((Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET,))
        return queue

    def take_unit_attention(self, nexus: Nexus) -> Asc | None:
        queue = self._ua_queue(nexus)
        return queue.popleft() if queue else None

    def establish_ua(self, asc: Asc, keys: Iterable[tuple[Any, ...]] | None = None,
                     skip: Nexus | None = None) -> None:
        """Queue a unit attention for the given nexus keys, or for every nexus that has used
        this LU (except `skip`)."""
        if keys is None:
            keys = [k for k in self.ua if skip is None or k != skip.key]
        for key in keys:
            queue = self.ua.setdefault(key, deque((Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET,)))
            if asc in _RESET_UAS:
                queue.clear()
            if asc not in queue and len(queue) < MAX_UA_QUEUE:
                queue.append(asc)

    # ------------------------------------------------------------------ task management
    async def abort(self, entries: list[tuple[ScsiTask, asyncio.Task[Any]]]) -> None:
        """Abort tasks and wait until each has really ended (SAM-5 7.2)."""
        waits = []
        current = asyncio.current_task()
        for task, runner in entries:
            task.aborted = True
            if runner is not current and not runner.done():
                runner.cancel()
                waits.append(runner)
        if waits:
            await asyncio.wait(waits)

    async def abort_task(self, nexus: Nexus, tag: int) -> bool:
        """ABORT TASK (SAM-5 7.2): False when no such task is in the task set."""
        entry = self.tasks.get((nexus.key, tag))
        if entry is None:
            return False
        await self.abort([entry])
        return True

    async def abort_tasks_of(self, keys: set[tuple[Any, ...]]) -> None:
        """Abort every task of the given nexuses (PREEMPT AND ABORT, SPC-4 5.13.11.2.5)."""
        await self.abort([e for k, e in self.tasks.items() if k[0] in keys])

    async def abort_task_set(self, nexus: Nexus | None, issuer: Nexus | None = None) -> None:
        """ABORT TASK SET (nexus given) or CLEAR TASK SET (None, by `issuer`).

        With TAS=0, other nexuses whose tasks were cleared learn of it through a unit
        attention (SAM-5 5.6, 7.3).
        """
        entries = [e for k, e in self.tasks.items() if nexus is None or k[0] == nexus.key]
        await self.abort(entries)
        if issuer is not None:
            for key in {task.nexus.key for task, _ in entries} - {issuer.key}:
                queue = self.ua.get(key)
                if queue is not None and Asc.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR not in queue:
                    queue.append(Asc.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)

    async def reset(self, issuer: Nexus | None, power_on: bool = False,
                    publish: bool = True) -> None:
        """LOGICAL UNIT RESET (SAM-5 7.7) or target reset: end every task, drop RESERVE and
        PREVENT state, restore mode pages, and tell every nexus. With shared reservations the
        reset is of the one logical unit every gateway serves: it is published to the others
        (unless `publish` is false: this is another gateway's reset arriving here)."""
        await self.abort_task_set(None)
        if publish:
            try:
                await self.pr.release_unit(None, reset=True)
            except SenseError:
                log.error("LUN %d: the reset could not reach the other gateways", self.lun)
        self.prevent.clear()
        self.mode.reset()
        asc = Asc.POWER_ON_OCCURRED if power_on else Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED
        for key in list(self.ua):
            self.ua[key] = deque((asc,))
        if issuer is not None and issuer.key not in self.ua:
            self.ua[issuer.key] = deque((asc,))
        if self.copy_service is not None:
            await self.copy_service.reset()

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus is gone (logout, dropped connection, session reinstatement)."""
        self.pr.nexus_lost(nexus)
        self.prevent.discard(nexus.key)
        self.ua.pop(nexus.key, None)
        if self.qos is not None:
            self.qos.nexus_lost(nexus)
        if self.copy_service is not None:
            self.copy_service.nexus_lost(nexus)

    # ------------------------------------------------------------------ block I/O
    def check_range(self, lba: int, count: int) -> None:
        """LBA OUT OF RANGE unless [lba, lba+count) lies on the medium (SBC-3 4.5)."""
        if lba + count > self.nblocks or (count == 0 and lba >= self.nblocks):
            raise S.lba_out_of_range()

    def in_thread(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run blocking work on the I/O threads; a cancelled caller still waits for it to end."""
        return run_blocking(fn, *args)

    async def read_blocks(self, buf: memoryview, lba: int, then: ReadHook | None = None) -> None:
        """Fill buf from the medium, then run `then` (a fabric hook, iSCSI's data digests) on
        it: both on the event loop when the backstore has the data in a cache (the page
        cache), else both where the backstore's read completes (an I/O thread). Measured here,
        a trip to a thread and back costs more than the copy and the CRC it would move off the
        loop (1 MiB reads with data digests: 0.82 of the digest-free rate with the CRC on a
        thread, 0.94 on the loop)."""
        backstore = self.backstore
        assert backstore is not None
        offset = lba * self.block_size
        try:
            if backstore.read_nowait(buf, offset):
                if then is not None:
                    then(buf)
                return
            await backstore.aread(buf, offset, then)
        except OSError as exc:
            raise self.io_error(exc, lba, write=False) from exc

    def read_cached(self, buf: memoryview, lba: int, then: ReadHook | None = None) -> bool:
        """`read_blocks` when it would not wait (the data is in the backstore's cache),
        without a coroutine; False when it would: the caller then awaits `read_blocks`."""
        backstore = self.backstore
        assert backstore is not None
        try:
            if not backstore.read_nowait(buf, lba * self.block_size):
                return False
        except OSError as exc:
            raise self.io_error(exc, lba, write=False) from exc
        if then is not None:
            then(buf)
        return True

    def lend_blocks(self, lba: int, nbytes: int) -> memoryview | None:
        """A view of the medium's blocks as they are in the backstore's cache, or None when
        reading them would wait for the medium (see Backstore.mapped for the caller's duties)."""
        if self.backstore is None or nbytes < self._lend_min:
            return None
        return self.backstore.mapped(lba * self.block_size, nbytes)

    def write_inline(self, data: memoryview, lba: int, fua: bool) -> bool:
        """`write_blocks` when it would complete on the event loop (a small write to the page
        cache, no flush after it), without a coroutine; False otherwise: the caller then
        awaits `write_blocks`."""
        if len(data) > self._inline_write_max or fua or perf_counter() < self._inline_after \
                or not self.mode.write_cache:
            return False
        backstore = self.backstore
        assert backstore is not None
        try:
            started = perf_counter()
            backstore.write(data, lba * self.block_size)
        except OSError as exc:
            raise self.io_error(exc, lba, write=True) from exc
        if perf_counter() - started > INLINE_WRITE_STALL:
            self._inline_after = perf_counter() + 1.0
        return True

    async def write_blocks(self, data: memoryview, lba: int, fua: bool,
                           inline: bool = True) -> None:
        """Write whole blocks; small writes go to the page cache from the event loop when the
        backstore takes them there (`caps.write_inline`).

        Buffered writes cannot be asked not to block (RWF_NOWAIT is refused for them), and
        under writeback pressure the kernel throttles the writer: a write that took longer than
        INLINE_WRITE_STALL sends this LU's writes to the I/O threads for a second, so one
        stalled write never holds up every session.
        """
        backstore = self.backstore
        assert backstore is not None
        offset = lba * self.block_size
        try:
            if inline and len(data) <= self._inline_write_max \
                    and perf_counter() >= self._inline_after:
                started = perf_counter()
                backstore.write(data, offset)
                if perf_counter() - started > INLINE_WRITE_STALL:
                    self._inline_after = perf_counter() + 1.0
            else:
                await backstore.awrite(data, offset)
            if fua or not self.mode.write_cache:
                await backstore.aflush()
        except OSError as exc:
            raise self.io_error(exc, lba, write=True) from exc

    async def flush(self) -> None:
        assert self.backstore is not None
        try:
            await self.backstore.aflush()
        except OSError as exc:
            raise self.io_error(exc, None, write=True) from exc

    def io_error(self, exc: OSError, lba: int | None, write: bool) -> SenseError:
        log.error("LUN %d: I/O error at LBA %s: %s", self.lun, lba, exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return S.space_allocation_failed()
        if write:
            return S.medium_error(Asc.WRITE_ERROR, lba)
        return S.medium_error(Asc.UNRECOVERED_READ_ERROR, lba)

    # ------------------------------------------------------------------ internal copy
    def admit_internal(self, nexus: Nexus, opcode: int) -> None:
        """The policy `opcode` would meet from `nexus` (reservations, medium, write protection),
        for a sub-command the copy manager issues on that nexus's behalf; no unit attention."""
        spec = self.table.get(opcode, None)
        assert spec is not None
        task = ScsiTask(b"", self.lun, 0, nexus)
        task.internal = True
        self._admit(task, spec)

    async def copy_blocks_from(self, src: LogicalUnit, src_lba: int, dst_lba: int, count: int,
                               nexus: Nexus, guard: Callable[[], None] | None = None
                               ) -> set[str]:
        """Copy `count` of this LU's blocks from `src` (which may be this LU) for `nexus`.

        The copy manager's data mover: the checks a READ of the source and a WRITE of the
        destination would get (LBA range, reservations, medium, write protection), a shared
        lock on the source blocks and an exclusive one on the destination blocks (one exclusive
        lock over both when they overlap within one LU), then the fastest path the backstores
        offer, chosen per extent: holes become holes (or zeros on a fully provisioned LU),
        data is cloned (a reflink), else copied inside the storage (copy_file_range), else read
        and written, all of it in one piece of blocking work on an I/O thread. `guard` runs
        once the locks are held (a ROD token's validity check).
        Returns the paths taken ("hole", "reflink", "copy_range", "buffered").
        """
        nbytes = count * self.block_size
        if nbytes % src.block_size:
            raise S.invalid_field_in_parameter_list(0, None)
        src_count = nbytes // src.block_size
        for lu in (src, self):
            if not lu.pr.current():
                await lu.pr.refresh()
        src.admit_internal(nexus, Opcode.READ_16)
        self.admit_internal(nexus, Opcode.WRITE_16)
        src.check_range(src_lba, src_count)
        self.check_range(dst_lba, count)
        if not count:
            return set()
        if src.qos is not None:  # a copy is charged under the policies of the LUNs it touches
            await src.qos.charge_copy(src.lun, nexus, nbytes, write=False)
        if self.qos is not None:
            await self.qos.charge_copy(self.lun, nexus, nbytes, write=True)
        assert src.backstore is not None and self.backstore is not None
        so, do = src_lba * src.block_size, dst_lba * self.block_size
        overlap = src is self and so < do + nbytes and do < so + nbytes
        async with contextlib.AsyncExitStack() as stack:
            if overlap:
                start = min(src_lba, dst_lba)
                await stack.enter_async_context(
                    self.ranges.exclusive(start, max(src_lba, dst_lba) + count - start))
            else:
                for lu, lba, n, excl in sorted(
                        ((src, src_lba, src_count, False), (self, dst_lba, count, True)),
                        key=lambda e: (id(e[0]), e[1])):
                    lock = lu.ranges.exclusive(lba, n) if excl else lu.ranges.shared(lba, n)
                    await stack.enter_async_context(lock)
            if guard is not None:
                guard()
            try:
                paths = await self.in_thread(self._copy_bytes, src.backstore, so, do, nbytes,
                                             overlap)
                if not self.mode.write_cache:
                    await self.backstore.aflush()
            except OSError as exc:
                raise self.io_error(exc, dst_lba, write=True) from exc
        for path, moved in paths.items():
            self.stats_copy_paths[path] = self.stats_copy_paths.get(path, 0) + 1
            self.stats_copy_bytes[path] = self.stats_copy_bytes.get(path, 0) + moved
        return set(paths)

    def _copy_bytes(self, src: Backstore, so: int, do: int, n: int,
                    overlap: bool) -> Counter[str]:
        """The blocking part of `copy_blocks_from`, run on an I/O thread; the bytes each path
        moved."""
        dst = self.backstore
        assert dst is not None
        if overlap:
            return Counter({self._copy_buffered(src, so, do, n, whole=True): n})
        paths: Counter[str] = Counter()
        for extent in src.extents(so, n):
            at = do + extent.offset - so
            if not extent.mapped:
                (dst.deallocate if self._deallocate_zeros(dst) else dst.zero)(at, extent.length)
                paths["hole"] += extent.length
            else:
                paths.update(self._copy_data(src, extent.offset, at, extent.length))
        return paths

    def _copy_data(self, src: Backstore, so: int, do: int, n: int) -> Counter[str]:
        """Data: the destination's clone offer, else its in-storage copy, each for the part
        of the range its alignment allows (the unaligned head and tail go the next way),
        else read and written."""
        dst = self.backstore
        assert dst is not None
        overlap = src is dst and so < do + n and do < so + n
        offers = (("reflink", dst.caps.clone, dst.caps.clone_alignment, dst.clone_from),
                  ("copy_range", dst.caps.copy_range and not overlap,
                   dst.caps.copy_range_alignment, dst.copy_range_from))
        for path, offered, alignment, offer in offers:
            align = max(alignment, self.block_size)
            if not offered or so % align != do % align:
                continue
            head = min(n, -so % align)
            body = (n - head) // align * align
            if body and offer(src, so + head, do + head, body):
                paths: Counter[str] = Counter({path: body})
                if head:
                    paths.update(self._copy_data(src, so, do, head))
                tail = n - head - body
                if tail:
                    paths.update(self._copy_data(src, so + head + body, do + head + body, tail))
                return paths
        return Counter({self._copy_buffered(src, so, do, n): n})

    def _copy_buffered(self, src: Backstore, so: int, do: int, n: int,
                       whole: bool = False) -> str:
        """Read and write; blocks of zeros become holes on a thin LU. `whole` reads everything
        before writing anything (memmove semantics for an overlapping copy within one LU)."""
        dst = self.backstore
        assert dst is not None
        step = n if whole else min(n, COPY_BUFFER_BYTES)
        buf = memoryview(bytearray(step))
        done = 0
        while done < n:
            k = min(step, n - done)
            src.read_into(buf[:k], so + done)
            self._write_or_punch(buf[:k], do + done)
            done += k
        return "buffered"

    def _write_or_punch(self, data: memoryview, offset: int) -> None:
        """Write `data`; on a thin LU runs of all-zero blocks are deallocated instead."""
        dst = self.backstore
        assert dst is not None
        if not self._deallocate_zeros(dst):
            dst.write(data, offset)
            return
        bs = self.block_size
        nonzero = np.asarray(np.frombuffer(data, dtype=np.uint8).reshape(-1, bs).any(axis=1))
        edges = [0, *(np.flatnonzero(np.diff(nonzero)) + 1).tolist(), len(nonzero)]
        for a, b in itertools.pairwise(edges):
            if nonzero[a]:
                dst.write(data[a * bs:b * bs], offset + a * bs)
            else:
                dst.deallocate(offset + a * bs, (b - a) * bs)

    def _deallocate_zeros(self, dst: Backstore) -> bool:
        """Whether zeros are written as deallocated blocks: on a thin LU whose deallocated
        blocks read as zeros."""
        return self.thin and dst.caps.deallocated_reads_zero

    # ------------------------------------------------------------------ checkpoints
    def create_checkpoint(self, name: str) -> Checkpoint:
        """A checkpoint of this LU from this instant (scsi/cbt.py). Synchronous, so a caller
        that has quiesced the LU (a snapshot) pairs it exactly with what it took."""
        if self.pr.store is not None:
            raise CheckpointError("the LUN is served by several gateways: writes through the "
                                  "others would be missed")
        if self.backstore is None:
            raise CheckpointError("no logical unit")
        cp = self.checkpoints.create(name)
        log.info("LUN %d: checkpoint %s created", self.lun, name,
                 extra={"event": "checkpoint", "lun": self.lun, "checkpoint": name})
        return cp

    def _checkpoint_with_snapshot(self, unit: object, snapshot: str) -> None:
        """Each snapshot starts a checkpoint of its own name at the same instant, so what
        changed between two snapshots is known (docs/cbt.md); not on a LUN that several
        gateways serve, whose writes through the others this one would miss."""
        if self.pr.store is None and self.backstore is not None:
            self.create_checkpoint(snapshot)

    def delete_checkpoint(self, name: str) -> None:
        self.checkpoints.delete(name)
        log.info("LUN %d: checkpoint %s deleted", self.lun, name,
                 extra={"event": "checkpoint_deleted", "lun": self.lun, "checkpoint": name})

    def close(self) -> None:
        self.sanitize.abandon()
        if self.ownership is not None:
            self.ownership.close()
        if self.backstore is not None and not self.closed:
            flushed = False
            try:
                if not self.readonly:
                    self.backstore.flush()
                flushed = True
            finally:
                self.backstore.close()
                self.pr.close()
                if self.token_store is not None:
                    self.token_store.close()
                self.checkpoints.detach(self._ranges)
                try:
                    self.checkpoints.close(clean=flushed)
                except OSError as exc:
                    log.error("LUN %d: checkpoints not saved (%s): they will be inconsistent "
                              "at the next start", self.lun, exc)
        self.closed = True


def atomic_write_blocks(caps: Capabilities, block_size: int,
                        wanted: int = limits.ATOMIC_WRITE_BYTES) -> int:
    """The one WRITE ATOMIC(16) length a LUN offers, in blocks (`wanted` bytes, a power of two,
    within the backstore's atomic unit range); 0 when the backstore writes nothing atomically."""
    if not caps.atomic_write_unit_max:
        return 0
    unit = min(max(wanted, caps.atomic_write_unit_min, block_size),
               caps.atomic_write_unit_max, limits.MAX_TRANSFER_BYTES)
    if unit < block_size or unit % block_size or unit < caps.atomic_write_unit_min:
        return 0
    return unit // block_size


async def _resume(coro: Any, waiting: Any, task: ScsiTask) -> None:
    """Drive a coroutine that has already run up to its first suspension (`waiting`).

    Each awaitable it yields is awaited here; the coroutine then reads the outcome itself when
    resumed. A cancellation of this Task is thrown into the coroutine at its wait, as a Task
    would have done.
    """
    try:
        while True:
            try:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    waiting._asyncio_future_blocking = False
                    await waiting
            except asyncio.CancelledError as exc:
                waiting = coro.throw(exc)
                continue
            except BaseException:
                pass  # the coroutine sees the exception when it reads the future's result
            waiting = coro.send(None)
    except StopIteration:
        return
    except asyncio.CancelledError:
        task.aborted = True
        raise


class NoLogicalUnit(LogicalUnit):
    """What answers for a LUN with no logical unit behind it (SPC-4 4.6.4)."""

    exists = False

    def __init__(self, lun: int, directory: LunDirectory) -> None:
        super().__init__(LuConfig(lun=lun), None, directory)
        self.table = NO_LU_TABLE

    def _ua_queue(self, nexus: Nexus) -> deque[Asc]:
        return deque()


if TYPE_CHECKING:
    from .pr import LogicalUnit as PrUnit
    from .sanitize import LogicalUnit as SanitizedUnit
    from .unit import Unit

    def _interfaces(lu: LogicalUnit) -> tuple[Unit, PrUnit, SanitizedUnit]:
        """The interfaces handlers, persistent reservations and sanitize type their unit with
        (checked by mypy)."""
        return lu, lu, lu
