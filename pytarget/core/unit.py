"""What every service beside or under the device server reads of a logical unit: its geometry
(`UnitGeometry`), and its identity, opcode table, range lock and copy service (`BlockUnit`).

`scsi.device.LogicalUnit` implements both. The interfaces that the device server's handlers
(`scsi/unit.py`), the copy manager (`copy/unit.py`), a sanitize and a snapshot observer type
their unit with extend these, so what they share is declared once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .copyservice import CopyServiceHooks
    from .locks import RangeLock
    from .table import OpTable


class UnitGeometry(Protocol):
    @property
    def lun(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def nblocks(self) -> int: ...


class BlockUnit(UnitGeometry, Protocol):
    @property
    def exists(self) -> bool:
        """False for the unit that answers for a LUN with nothing behind it."""
        ...
    @property
    def thin(self) -> bool: ...
    @property
    def naa(self) -> bytes: ...
    @property
    def vendor(self) -> str: ...
    @property
    def serial(self) -> str: ...
    @property
    def max_write_same_blocks(self) -> int: ...
    @property
    def table(self) -> OpTable: ...
    @property
    def ranges(self) -> RangeLock: ...
    @property
    def copy_service(self) -> CopyServiceHooks | None: ...

    def check_range(self, lba: int, count: int) -> None:
        """LBA OUT OF RANGE unless [lba, lba+count) lies on the medium (SBC-3 4.5)."""
        ...
