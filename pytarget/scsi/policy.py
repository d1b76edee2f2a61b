"""Per-command policy flags shared by the opcode table and the code that enforces them."""

from __future__ import annotations

from enum import Enum, IntFlag


class Flag(IntFlag):
    NONE = 0
    UA_EXEMPT = 0x01  # runs with a unit attention pending, leaving it pending (SAM-5 5.14)
    MEDIUM = 0x02  # needs the medium: NOT READY while stopped
    WRITES = 0x04  # changes blocks: DATA PROTECT when write protected
    CONFLICTS_SPC2 = 0x08  # RESERVATION CONFLICT under another nexus's RESERVE (SPC-2 5.5.1)


class Pr(Enum):
    """How a command fares under a persistent reservation held by another nexus (SPC-4 5.13)."""

    ALLOWED = "allowed"  # under every reservation type
    READ = "read"  # allowed under Write Exclusive types, conflicts under Exclusive Access
    WRITE = "write"  # conflicts for non-registrants under every type
    PR = "pr"  # PERSISTENT RESERVE IN/OUT: the PR code decides
