"""Per-command policy flags shared by the opcode table and the code that enforces them."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum, IntFlag


class Flag(IntFlag):
    NONE = 0
    UA_EXEMPT = 0x01  # runs with a unit attention pending, leaving it pending (SAM-5 5.14)
    MEDIUM = 0x02  # needs the medium: NOT READY while stopped
    WRITES = 0x04  # changes blocks: DATA PROTECT when write protected
    CONFLICTS_SPC2 = 0x08  # RESERVATION CONFLICT under another nexus's RESERVE (SPC-2 5.5.1)
    DURING_SANITIZE = 0x10  # runs while a sanitize operation is in progress (SBC-4 4.11.3)


class Pr(Enum):
    """How a command fares under a persistent reservation (SPC-4 5.13.1, SBC-3 4.17).

    The reservation holder may issue every command; so may every registered I_T nexus under a
    Registrants Only or All Registrants type. For every other I_T nexus the class decides.
    """

    ALLOWED = "allowed"  # every type, every I_T nexus (INQUIRY, TEST UNIT READY, READ CAPACITY)
    READ = "read"  # allowed through Write Exclusive types, conflicts under Exclusive Access
    # types; also MODE SENSE, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS,
    # READ DEFECT DATA and RECEIVE COPY RESULTS (REPORT CAPABILITIES ALLOW COMMANDS 011b)
    WRITE = "write"  # conflicts under every type (writes, MODE SELECT, SYNCHRONIZE CACHE)
    PR = "pr"  # PERSISTENT RESERVE IN/OUT: the service action decides (SPC-4 5.13.2)
    PREVENT_ALLOW = "prevent-allow"  # ALLOWED with PREVENT 00b, otherwise WRITE
    START_STOP = "start-stop"  # ALLOWED with START=1 and POWER CONDITION 0h, otherwise WRITE

    def resolve(self, cdb: Sequence[int] | None) -> Pr:
        """The class that applies to this CDB (SBC-3 4.17 splits two commands by a field)."""
        if self is not Pr.PREVENT_ALLOW and self is not Pr.START_STOP:
            return self
        if cdb is None or len(cdb) < 6:
            return Pr.WRITE
        if self is Pr.PREVENT_ALLOW:
            return Pr.ALLOWED if not cdb[4] & 0x03 else Pr.WRITE
        return Pr.ALLOWED if cdb[4] & 0x01 and not cdb[4] & 0xF0 else Pr.WRITE
