"""The interface between a front end (a SCSI transport: iSCSI today, NBD next) and the device
server: what a front end hands a logical unit, and what it may ask of it (SAM-5 4, 7).

A front end turns its requests into `ScsiTask`s, each carrying its I_T nexus (`Nexus`), and
submits them to the `FrontEndUnit` that answers for the LUN. The task's hooks carry the data:

- Data-Out: `task.source` is the front end's `DataSource`; the device server awaits
  `source.fetch_data_out(task, length)` when it wants the bytes, so the front end solicits
  them then (iSCSI: R2T) and resolves to a view of its buffer.
- Data-In: the device server leaves `task.data_in` / `task.data_in_len` (and status, sense)
  on the task and calls `on_done(task)`. `task.prepare_data_in`, when set, runs on the filled
  buffer wherever the read ran (iSCSI computes its data digests there).
- Lent reads: a front end that sends Data-In without reading it in Python sets
  `task.lend_data_in`; a READ may then answer with a view of the medium's pages and set
  `task.on_data_sent`, which the front end calls exactly once, when the data has left (or will
  never leave). The blocks stay locked until then.

Task management (ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, target
resets) and the loss of an I_T nexus are methods of the unit. Which unit answers for a LUN,
as an initiator sees it, is the `UnitDirectory`'s answer; a LUN with no logical unit behind it
is answered by a unit whose `exists` is false (SPC-4 4.6.4), made by the device server's
`AbsentUnitFactory` from the `LunDirectory` that REPORT LUNS reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, runtime_checkable

from .task import DataSource, Nexus, ScsiTask, TaskAttr

__all__ = ["AbsentUnitFactory", "DataSource", "FrontEndUnit", "LunDirectory", "Nexus",
           "ScsiTask", "TaskAttr", "UnitDirectory"]


@runtime_checkable
class FrontEndUnit(Protocol):
    """A logical unit as a front end sees it."""

    @property
    def lun(self) -> int: ...

    @property
    def exists(self) -> bool:
        """False for the unit that answers for a LUN with nothing behind it."""
        ...

    def submit(self, task: ScsiTask, on_done: Callable[[ScsiTask], None]) -> None:
        """Execute `task`; `on_done(task)` runs once it has ended, maybe before this returns.
        A task ended by task management or nexus loss has `task.aborted` set and gets no
        response (SAM-5 5.6)."""
        ...

    def abort_task(self, nexus: Nexus, tag: int) -> Awaitable[bool]:
        """ABORT TASK (SAM-5 7.2): True once the task has ended, False if there was none."""
        ...

    def abort_task_set(self, nexus: Nexus | None, issuer: Nexus | None = None
                       ) -> Awaitable[None]:
        """ABORT TASK SET for `nexus` (SAM-5 7.3), or CLEAR TASK SET (`nexus` None) issued by
        `issuer` (SAM-5 7.4)."""
        ...

    def reset(self, issuer: Nexus | None, power_on: bool = False) -> Awaitable[None]:
        """LOGICAL UNIT RESET (SAM-5 7.7); `power_on` for a target cold reset."""
        ...

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus is gone (logout, dropped connection, session reinstatement)."""
        ...


class LunDirectory(Protocol):
    """What a logical unit needs from the target port that exports it (REPORT LUNS)."""

    def visible_luns(self, nexus: Nexus) -> list[int]: ...


class UnitDirectory(LunDirectory, Protocol):
    """The logical units behind one target port, as each initiator sees them."""

    def lookup(self, lun: int | None, nexus: Nexus) -> FrontEndUnit:
        """The unit for `lun` (an absent one if `nexus` cannot see such a LUN)."""
        ...

    def units(self) -> Iterable[FrontEndUnit]:
        """Every logical unit of the target (a target reset reaches all of them)."""
        ...


AbsentUnitFactory = Callable[[int, LunDirectory], FrontEndUnit]
"""Makes the unit that answers for a LUN with no logical unit (the device server's)."""
