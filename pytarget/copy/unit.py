"""What the copy manager needs from a logical unit of the device server.

`scsi.device.LogicalUnit` implements it. The copy manager reaches logical units only through
this interface (and the set of them through `manager.CopyDomain`): data moves with internal
sub-commands (`execute`) and `copy_blocks_from`, under the policy `admit_internal` applies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, Self

from ..core.unit import BlockUnit

if TYPE_CHECKING:
    from ..core.copyservice import CopyServiceHooks
    from ..core.reservations import SharedDocument
    from ..core.task import Nexus, ScsiTask


class SenseFormat(Protocol):
    @property
    def d_sense(self) -> bool:
        """D_SENSE of the Control mode page: descriptor format sense data (SPC-4 7.5.8)."""
        ...


class LogicalUnit(BlockUnit, Protocol):
    @property
    def mode(self) -> SenseFormat: ...
    @property
    def write_observers(self) -> list[Callable[[int, int], asyncio.Future[None] | None]]:
        """Called with (LBA, count) before blocks change (`_UnitRangeLock`); an observer that
        returns a future holds the write until it is done, then is asked again (the future
        may be shared: the write awaits it shielded)."""
        ...
    @property
    def token_store(self) -> SharedDocument | None:
        """Where the unit's ROD tokens are shared with the other gateways serving it."""
        ...
    @property
    def stats_copy_bytes(self) -> dict[str, int]: ...

    def attach_copy_service(self, service: CopyServiceHooks) -> None: ...
    def admit_internal(self, nexus: Nexus, opcode: int) -> None: ...
    async def execute(self, task: ScsiTask) -> None: ...
    async def copy_blocks_from(self, src: Self, src_lba: int, dst_lba: int, count: int,
                               nexus: Nexus, guard: Callable[[], None] | None = None
                               ) -> set[str]: ...
