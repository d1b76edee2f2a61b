"""What the device server needs from the copy manager that serves one of its logical units.

The copy manager (`pytarget.copy`) implements it and hands it to the logical unit when it
starts serving it (`LogicalUnit.attach_copy_service`); the device server never imports the copy
manager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .task import Nexus


class CopyServiceHooks(Protocol):
    async def reset(self) -> None:
        """LOGICAL UNIT RESET: end the unit's background copies (SAM-5 7.7)."""
        ...

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus is gone: its held results and background copies end with it."""
        ...

    def third_party_copy_page(self) -> bytes:
        """VPD 8Fh (Third-party Copy) page body (SPC-4 7.8.17)."""
        ...

    def management_network_addresses(self) -> bytes:
        """VPD 85h (Management Network Addresses) page body (SPC-4 7.8.9)."""
        ...
