"""The device server of one logical unit: command dispatch, unit attentions, task set, resets.

`LogicalUnit.execute` is the only place a `SenseError` becomes CHECK CONDITION (or another
status) and the only place an unexpected exception becomes HARDWARE ERROR / INTERNAL TARGET
FAILURE. Dispatch, CDB validation and the per-command policy (unit attentions, NOT READY,
write protection, reservation conflicts) all come from the opcode table in `opcodes`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import limits, vpd
from . import sense as S
from .locks import RangeLock
from .modes import ModePages
from .opcodes import NO_LU_TABLE, SBC_THICK_TABLE, SBC_TABLE, OpSpec, OpTable
from .policy import Flag
from .pr import PersistentReservations
from .sense import Asc, SenseError, Status
from .task import Nexus, ScsiTask

if TYPE_CHECKING:
    from ..backstore.file import FileBackstore

log = logging.getLogger("pytarget.scsi")
T = TypeVar("T")

VENDOR = "PYTARGET"
PRODUCT = "pytarget disk"
REVISION = "0001"
MAX_UA_QUEUE = 16
INLINE_WRITE_MAX = 262144  # larger writes go to the I/O threads
# Resets supersede every other pending unit attention (SAM-5 5.14).
_RESET_UAS = frozenset({Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET, Asc.POWER_ON_OCCURRED,
                        Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED})

_executor: ThreadPoolExecutor | None = None


def io_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pytarget-io")
    return _executor


class LunDirectory(Protocol):
    """What a logical unit needs from the target that exports it."""

    def visible_luns(self, nexus: Nexus) -> list[int]: ...


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


class LogicalUnit:
    """A direct-access block device (SBC-3) backed by a file."""

    exists = True

    def __init__(self, config: LuConfig, backstore: FileBackstore | None,
                 directory: LunDirectory) -> None:
        self.config = config
        self.table: OpTable = SBC_TABLE if config.thin else SBC_THICK_TABLE
        self.lun = config.lun
        self.backstore = backstore
        self.directory = directory
        self.block_size = config.block_size
        self.nblocks = backstore.size // config.block_size if backstore else 0
        self.readonly = config.readonly or bool(backstore and backstore.readonly)
        self.thin = config.thin
        self.removable = config.removable
        self.vendor = config.vendor
        self.product = config.product
        self.revision = config.revision
        self.serial = config.serial
        self.naa = config.naa
        self.third_party_copy = False
        self.max_compare_and_write_blocks = limits.MAX_COMPARE_AND_WRITE_BLOCKS
        self.max_write_same_blocks = limits.MAX_WRITE_SAME_BYTES // config.block_size
        self.vpd: dict[int, Callable[..., bytes]] = dict(vpd.PAGES)
        if not self.thin:
            del self.vpd[0xB2]
        self.mode = ModePages(self)
        self.ranges = RangeLock()
        self.ua: dict[tuple[Any, ...], deque[Asc]] = {}
        self.tasks: dict[tuple[tuple[Any, ...], int], tuple[ScsiTask, asyncio.Task[Any]]] = {}
        self.medium_present = True
        self.prevent: set[tuple[Any, ...]] = set()  # nexuses preventing medium removal
        self.reservation: tuple[Any, ...] | None = None  # SPC-2 RESERVE holder
        self.pr = PersistentReservations(self)
        self.closed = False
        self.stats_miscompares = 0

    # ------------------------------------------------------------------ execution
    def start(self, task: ScsiTask) -> asyncio.Task[None]:
        """Enter the task into the task set and begin executing it."""
        runner = asyncio.get_running_loop().create_task(self.execute(task))
        key = (task.nexus.key, task.tag)
        self.tasks[key] = (task, runner)
        runner.add_done_callback(lambda _r: self.tasks.pop(key, None))
        return runner

    async def execute(self, task: ScsiTask) -> None:
        """Run one command to completion; status, sense and Data-In are left on `task`."""
        try:
            spec = self.table.lookup(task.cdb)
            cdb = bytes(task.cdb[:spec.cdb_len])
            spec.check(cdb)
            self._admit(task, spec)
            await spec.handler(self, task, cdb)
        except SenseError as exc:
            self._fail(task, exc)
        except asyncio.CancelledError:
            if not task.aborted:
                raise
            task.status = Status.TASK_ABORTED
            task.data_in = None
            task.data_in_len = 0
        except Exception:
            log.exception("LUN %d: internal failure executing %s", self.lun, bytes(task.cdb).hex())
            self._fail(task, S.internal_target_failure())

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
        flags = spec.flags
        if not flags & Flag.UA_EXEMPT and not task.internal:
            pending = self._ua_queue(nexus)
            if pending:
                raise S.unit_attention(pending.popleft())
        if flags & Flag.CONFLICTS_SPC2 and self.reservation is not None \
                and self.reservation != nexus.key:
            raise S.reservation_conflict()
        self.pr.check(nexus, spec.pr)
        if flags & Flag.MEDIUM and not self.medium_present:
            raise S.not_ready(Asc.MEDIUM_NOT_PRESENT)
        if flags & Flag.WRITES and self.write_protected:
            raise S.write_protected()

    @property
    def write_protected(self) -> bool:
        return self.readonly or self.mode.software_write_protect

    def persistent_reservation_active(self) -> bool:
        return self.pr.active

    def vpd_pages(self) -> list[int]:
        return sorted(self.vpd)

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

    async def reset(self, issuer: Nexus | None, power_on: bool = False) -> None:
        """LOGICAL UNIT RESET (SAM-5 7.7) or target reset: end every task, drop RESERVE and
        PREVENT state, restore mode pages, and tell every nexus."""
        await self.abort_task_set(None)
        self.reservation = None
        self.prevent.clear()
        self.mode.reset()
        asc = Asc.POWER_ON_OCCURRED if power_on else Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED
        for key in list(self.ua):
            self.ua[key] = deque((asc,))
        if issuer is not None and issuer.key not in self.ua:
            self.ua[issuer.key] = deque((asc,))

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus is gone (logout, dropped connection, session reinstatement)."""
        if self.reservation == nexus.key:
            self.reservation = None
        self.prevent.discard(nexus.key)
        self.ua.pop(nexus.key, None)

    # ------------------------------------------------------------------ block I/O
    def check_range(self, lba: int, count: int) -> None:
        """LBA OUT OF RANGE unless [lba, lba+count) lies on the medium (SBC-3 4.5)."""
        if lba + count > self.nblocks or (count == 0 and lba >= self.nblocks):
            raise S.lba_out_of_range()

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work on the I/O threads; a cancelled caller still waits for it to end."""
        fut = asyncio.get_running_loop().run_in_executor(io_executor(), fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    async def read_blocks(self, buf: memoryview, lba: int) -> None:
        assert self.backstore is not None
        offset = lba * self.block_size
        try:
            if not self.backstore.read_nowait(buf, offset):
                await self.in_thread(self.backstore.read_into, buf, offset)
        except OSError as exc:
            raise self.io_error(exc, lba, write=False) from exc

    async def write_blocks(self, data: memoryview, lba: int, fua: bool,
                           inline: bool = True) -> None:
        """Write whole blocks; small writes go to the page cache from the event loop."""
        assert self.backstore is not None
        offset = lba * self.block_size
        try:
            if inline and len(data) <= INLINE_WRITE_MAX:
                self.backstore.write(data, offset)
            else:
                await self.in_thread(self.backstore.write, data, offset)
            if fua or not self.mode.write_cache:
                await self.in_thread(self.backstore.flush)
        except OSError as exc:
            raise self.io_error(exc, lba, write=True) from exc

    async def flush(self) -> None:
        assert self.backstore is not None
        try:
            await self.in_thread(self.backstore.flush)
        except OSError as exc:
            raise self.io_error(exc, None, write=True) from exc

    def io_error(self, exc: OSError, lba: int | None, write: bool) -> SenseError:
        log.error("LUN %d: I/O error at LBA %s: %s", self.lun, lba, exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return S.space_allocation_failed()
        if write:
            return S.medium_error(Asc.WRITE_ERROR, lba)
        return S.medium_error(Asc.UNRECOVERED_READ_ERROR, lba)

    def close(self) -> None:
        if self.backstore is not None and not self.closed:
            try:
                if not self.readonly:
                    os.fdatasync(self.backstore.fd)
            finally:
                self.backstore.close()
        self.closed = True


class NoLogicalUnit(LogicalUnit):
    """What answers for a LUN with no logical unit behind it (SPC-4 4.6.4)."""

    exists = False

    def __init__(self, lun: int, directory: LunDirectory) -> None:
        super().__init__(LuConfig(lun=lun), None, directory)
        self.table = NO_LU_TABLE

    def _ua_queue(self, nexus: Nexus) -> deque[Asc]:
        return deque()
