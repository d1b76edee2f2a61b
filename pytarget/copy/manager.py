"""The copy manager: which logical units a copy may reach, the copy operations of each logical
unit, and the status held for RECEIVE COPY RESULTS (SPC-4 5.17, 6.18).

One `CopyManager` serves a whole pytarget instance (its ROD tokens are valid across logical
units); each logical unit it serves has a `CopyService` that keeps that unit's operations, active
and finished, per I_T nexus and list identifier. Logical units are resolved through a
`CopyDomain`, which only ever offers units the requesting initiator may access: a CSCD descriptor
never reaches a LUN the initiator's ACL masks or a target it may not log into (the lesson of
CVE-2020-28374).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from ..core import limits
from ..core import sense as S
from ..core.designators import lu_designators
from ..core.sense import SenseError, Status
from ..core.table import ThirdPartyCopyOut
from . import discovery
from .tokens import Clock, TokenStore

if TYPE_CHECKING:
    from ..core.task import Nexus
    from .unit import LogicalUnit

log = logging.getLogger("pytarget.copy")
# The commands that start a copy operation, by service action of operation code 83h.
OPERATION_NAMES: dict[int, str] = {ThirdPartyCopyOut.EXTENDED_COPY_LID1: "EXTENDED COPY(LID1)",
                                   ThirdPartyCopyOut.EXTENDED_COPY_LID4: "EXTENDED COPY(LID4)",
                                   ThirdPartyCopyOut.POPULATE_TOKEN: "POPULATE TOKEN",
                                   ThirdPartyCopyOut.WRITE_USING_TOKEN: "WRITE USING TOKEN"}


class CopyDomain(Protocol):
    """The logical units a copy manager may reach on behalf of an initiator."""

    def accessible_units(self, nexus: Nexus) -> Iterable[LogicalUnit]:
        """Every logical unit `nexus`'s initiator may access, on any target it may log into."""
        ...

    def portal_unit(self, nexus: Nexus, address: str, port: int, lun: int) -> LogicalUnit | None:
        """The LUN `lun` of the nexus's own target if address:port is one of its portals."""
        ...

    def target_names(self) -> Iterable[str]:
        """The iSCSI names of the targets whose ROD tokens this copy manager made."""
        ...

    def portal_urls(self) -> Iterable[str]:
        """iscsi:// URLs of the portals, for VPD 85h's copy service."""
        ...


class CopyStatus(IntEnum):
    """COPY OPERATION STATUS (SPC-4 6.18.5 table 389); LID1 reports 0/1/2 (table 383)."""

    COMPLETED = 0x01
    FAILED = 0x02
    IN_PROGRESS = 0x11  # in the foreground
    IN_PROGRESS_BACKGROUND = 0x12
    ABORTED = 0x60  # by COPY OPERATION ABORT


@dataclass
class CopyOperation:
    """One EXTENDED COPY, POPULATE TOKEN or WRITE USING TOKEN and what it has done so far."""

    nexus_key: tuple[Any, ...]
    list_id: int
    service_action: int
    held: bool  # status kept after completion for RECEIVE COPY RESULTS
    identified: bool  # findable by list identifier while active
    priority: int = 0
    status: CopyStatus = CopyStatus.IN_PROGRESS
    segments_processed: int = 0
    bytes_transferred: int = 0
    blocks_transferred: int = 0
    operations: int = 0  # sub-operations completed (OPERATION COUNTER)
    error: SenseError | None = None
    scsi_status: int = Status.GOOD
    token: bytes | None = None  # the ROD token a POPULATE TOKEN created
    abort_requested: bool = False
    runner: asyncio.Task[Any] | None = None  # the task doing the work
    created: float = field(default_factory=time.monotonic)
    total_bytes: int = 0  # what the operation will move, once its parameters are checked
    initiator: str = ""  # initiator port name, for logs and `pytarget status`
    target: str = ""

    @property
    def name(self) -> str:
        return OPERATION_NAMES.get(self.service_action, f"copy {self.service_action:#x}")

    def moved(self, block_size: int) -> int:
        """Bytes written so far (token operations count blocks of the LU that runs them)."""
        return self.bytes_transferred or self.blocks_transferred * block_size

    @property
    def active(self) -> bool:
        return self.status in (CopyStatus.IN_PROGRESS, CopyStatus.IN_PROGRESS_BACKGROUND)

    def finish(self, error: SenseError | None, aborted: bool = False) -> None:
        self.error = error
        if aborted:
            self.status = CopyStatus.ABORTED
            self.scsi_status = Status.TASK_ABORTED
        elif error is not None:
            self.status = CopyStatus.FAILED
            self.scsi_status = error.status
        else:
            self.status = CopyStatus.COMPLETED
            self.scsi_status = Status.GOOD


class ChunkScheduler:
    """Grants chunk slots of one logical unit's copies in PRIORITY order (0 first, SPC-4
    6.4.3.2), first come first served within a priority."""

    def __init__(self, slots: int = 4) -> None:
        self.free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                self._waiting = [w for w in self._waiting if w[2] is not fut]
                heapq.heapify(self._waiting)
            raise

    def release(self) -> None:
        self.free += 1
        while self.free > 0 and self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                self.free -= 1
                fut.set_result(None)


class CopyService:
    """The copy manager as one logical unit sees it: its operations and held results.

    It is what the device server knows of the copy manager (`core.copyservice.CopyServiceHooks`).
    """

    def __init__(self, manager: CopyManager, lu: LogicalUnit) -> None:
        self.manager = manager
        self.lu = lu
        self.operations: OrderedDict[tuple[tuple[Any, ...], int], CopyOperation] = OrderedDict()
        self.running: dict[int, CopyOperation] = {}  # every active operation, by id()
        self.scheduler = ChunkScheduler()

    @property
    def active_count(self) -> int:
        return len(self.running)

    def begin(self, nexus: Nexus, list_id: int, service_action: int, *, held: bool,
              identified: bool, priority: int = 0) -> CopyOperation:
        """Register a new operation, or refuse it (OPERATION IN PROGRESS, INSUFFICIENT
        RESOURCES) before it does anything."""
        key = (nexus.key, list_id)
        if identified:
            current = self.operations.get(key)
            if current is not None and current.active:
                raise S.operation_in_progress()
        if self.active_count >= limits.MAX_CONCURRENT_COPIES:
            raise S.insufficient_resources()
        op = CopyOperation(nexus.key, list_id, service_action, held, identified, priority,
                           initiator=nexus.initiator_port_name, target=nexus.target_name)
        if identified:
            self.operations.pop(key, None)
            self.operations[key] = op
            self._trim(nexus.key)
        self.running[id(op)] = op
        log.info("copy started: %s list %d on %s LUN %d by %s", op.name, list_id,
                 nexus.target_name, self.lu.lun, op.initiator,
                 extra={"event": "copy_start", "initiator": op.initiator,
                        "target": nexus.target_name, "lun": self.lu.lun, "list_id": list_id,
                        "operation": op.name})
        return op

    def end(self, op: CopyOperation) -> None:
        """The operation has finished: keep its status only if it is held."""
        if self.running.pop(id(op), None) is not None:
            self.manager.finished(self, op)
        if op.identified and not op.held:
            key = (op.nexus_key, op.list_id)
            if self.operations.get(key) is op:
                del self.operations[key]

    def find(self, nexus: Nexus, list_id: int) -> CopyOperation | None:
        return self.operations.get((nexus.key, list_id))

    def discard(self, op: CopyOperation) -> None:
        key = (op.nexus_key, op.list_id)
        if self.operations.get(key) is op and not op.active:
            del self.operations[key]

    def _trim(self, nexus_key: tuple[Any, ...]) -> None:
        mine = [k for k, op in self.operations.items() if k[0] == nexus_key and not op.active]
        for key in mine[:max(0, len(mine) - limits.MAX_HELD_RESULTS)]:
            del self.operations[key]

    def nexus_lost(self, nexus: Nexus) -> None:
        """Held results belong to the I_T nexus; background copies of it end with it."""
        for key, op in list(self.operations.items()):
            if key[0] != nexus.key:
                continue
            if op.runner is not None and not op.runner.done():
                op.abort_requested = True
                op.runner.cancel()
            del self.operations[key]

    async def reset(self) -> None:
        """LOGICAL UNIT RESET ends background copies (foreground ones end with their task)."""
        runners = [op.runner for op in self.operations.values()
                   if op.runner is not None and not op.runner.done()]
        for runner in runners:
            runner.cancel()
        if runners:
            await asyncio.wait(runners)

    def third_party_copy_page(self) -> bytes:
        return discovery.third_party_copy_page(self.lu)

    def management_network_addresses(self) -> bytes:
        entries = list(self.manager.management_addresses)
        if not any(kind == discovery.COPY_SERVICE for kind, _ in entries):
            entries += [(discovery.COPY_SERVICE, url) for url in self.manager.copy_service_urls()]
        return discovery.management_network_addresses(entries)


class CopyManager:
    """Third-party copy for every logical unit of one pytarget instance."""

    def __init__(self, domain: CopyDomain,
                 management_addresses: Iterable[tuple[int, str]] = (),
                 clock: Clock = time.monotonic) -> None:
        self.domain = domain
        self.management_addresses = list(management_addresses)
        self.clock = clock
        self.tokens: TokenStore = TokenStore(self, clock)
        self.services: list[CopyService] = []
        # awaited before each chunk moves, when set: lets a test hold a copy and watch it move
        self.chunk_gate: Callable[[], Awaitable[object]] | None = None
        self.stats_operations: dict[tuple[str, str], int] = {}  # (operation, outcome) -> count
        self.stats_bytes: dict[str, int] = {}  # operation -> bytes moved

    def finished(self, service: CopyService, op: CopyOperation) -> None:
        """Count and log an operation that has ended."""
        outcome = op.status.name.lower()
        moved = op.moved(service.lu.block_size)
        key = (op.name, outcome)
        self.stats_operations[key] = self.stats_operations.get(key, 0) + 1
        self.stats_bytes[op.name] = self.stats_bytes.get(op.name, 0) + moved
        elapsed = time.monotonic() - op.created
        log.info("copy ended: %s list %d on %s LUN %d by %s: %s, %d bytes in %.3f s",
                 op.name, op.list_id, op.target, service.lu.lun, op.initiator, outcome, moved,
                 elapsed, extra={"event": "copy_end", "initiator": op.initiator,
                                 "target": op.target, "lun": service.lu.lun,
                                 "list_id": op.list_id, "operation": op.name,
                                 "outcome": outcome, "bytes": moved})

    def detach(self, lu: LogicalUnit) -> None:
        """Stop serving `lu` (its LUN was removed): its ROD tokens die with it."""
        service = lu.copy_service
        if service in self.services:
            self.services.remove(service)
        self.tokens.forget(lu)

    def attach(self, lu: LogicalUnit) -> CopyService:
        """Serve `lu`: 3PC=1, VPD 8Fh and 85h, copy status, ROD tokens."""
        service = CopyService(self, lu)
        lu.attach_copy_service(service)
        # `partial`, not a lambda: one Python call less for every WRITE's range lock
        lu.write_observers.append(partial(self.tokens.blocks_written, lu))
        if lu.token_store is not None:
            self.tokens.share(lu, lu.token_store)
        self.services.append(service)
        return service

    def resolve_designator(self, nexus: Nexus, designator_type: int,
                           designator: bytes) -> LogicalUnit | None:
        """The accessible logical unit with this VPD 83h designator (association: LU)."""
        for lu in self.domain.accessible_units(nexus):
            if not lu.exists:
                continue
            for d in lu_designators(lu.naa, lu.vendor, lu.serial):
                if d[1] & 0x30:
                    continue
                if d[1] & 0x0F == designator_type and d[4:4 + d[3]] == designator:
                    return lu
        return None

    def accessible(self, nexus: Nexus, lu: LogicalUnit) -> bool:
        return any(u is lu for u in self.domain.accessible_units(nexus))

    def is_local_target(self, name: str) -> bool:
        return any(n.lower() == name.lower() for n in self.domain.target_names())

    def copy_service_urls(self) -> list[str]:
        return list(self.domain.portal_urls())
