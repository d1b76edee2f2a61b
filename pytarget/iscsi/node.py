"""An iSCSI target node: one IQN with its logical units and its access list (RFC 7143 4.3).

A node is the `UnitDirectory` of its target port (`core.frontend`); the unit that answers for
an absent LUN comes from the device server's `AbsentUnitFactory`, which the registry hands to
the nodes added to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..core.frontend import AbsentUnitFactory, FrontEndUnit
from ..core.task import Nexus
from .auth import ChapCredentials

DEFAULT_TPGT = 1
RELATIVE_PORT = 1


@dataclass
class AclEntry:
    initiator: str
    luns: frozenset[int] | None  # None: every LUN


Unit = TypeVar("Unit", bound=FrontEndUnit)


def _no_absent_unit(lun: int, directory: Any) -> FrontEndUnit:
    raise LookupError(f"LUN {lun}: no device server to answer for an absent LUN")


@dataclass
class TargetNode(Generic[Unit]):
    name: str
    alias: str = ""
    tpgt: int = DEFAULT_TPGT  # the portal group's tag; also its SCSI target port group
    relative_port: int = RELATIVE_PORT  # RELATIVE TARGET PORT IDENTIFIER of its target port
    luns: dict[int, Unit] = field(default_factory=dict)
    acl: list[AclEntry] | None = None  # None: any initiator, all LUNs
    auth: ChapCredentials | None = None  # None: no authentication
    max_sessions: int = 0  # 0: only the registry's global limit
    # Set by the registry the node is added to, unless given.
    absent_unit: AbsentUnitFactory | None = None

    def allows(self, initiator: str) -> bool:
        return self.acl is None or any(e.initiator.lower() == initiator.lower() for e in self.acl)

    def masked_luns(self, initiator: str) -> frozenset[int] | None:
        if self.acl is None:
            return None
        for entry in self.acl:
            if entry.initiator.lower() == initiator.lower():
                return entry.luns
        return frozenset()

    def visible_luns(self, nexus: Nexus) -> list[int]:
        allowed = self.masked_luns(nexus.initiator_name)
        return [n for n in self.luns if allowed is None or n in allowed]

    def lookup(self, lun: int | None, nexus: Nexus) -> FrontEndUnit:
        """The device server for a LUN as this initiator sees it (masked LUNs do not exist)."""
        if lun is not None:
            lu = self.luns.get(lun)
            allowed = self.masked_luns(nexus.initiator_name)
            if lu is not None and (allowed is None or lun in allowed):
                return lu
        return (self.absent_unit or _no_absent_unit)(lun if lun is not None else 0, self)

    def units(self) -> Iterable[FrontEndUnit]:
        return list(self.luns.values())
