"""The interface to whatever moves a logical unit's ownership between gateways on its own
(cluster/ownership.py, over Ceph): the server starts it, `pytarget status` reads it, and the
logical unit stops it before its backstore closes. It changes the LU only through
`LogicalUnit.set_owner` and `begin_transition`, on the event loop."""

from __future__ import annotations

from typing import Any, Protocol


class OwnershipService(Protocol):
    def start(self) -> None:
        """Begin following the gateways' liveness (on the running event loop)."""

    def close(self) -> None:
        """Stop; returns once nothing of it uses the backstore's cluster client any more."""

    def set_preferred(self, preferred: str) -> None:
        """The configured owner changed (a reload)."""

    def describe(self) -> dict[str, Any]:
        """What `pytarget status` shows of it."""
