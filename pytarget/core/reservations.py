"""The interface to state that several gateways share: one versioned document, replaced only by
compare-and-update, with change notification.

A logical unit whose gateways share state has two such documents: its reservations, which the
device server's persistent reservation code (`scsi/pr.py`) keeps a decoded copy of, and its ROD
tokens (`copy/sharedtokens.py`). Both program against `ReservationStore` (also named
`SharedDocument`); `cluster/rados.py` implements it over one RADOS object
(docs/scale-out-consistency.md). The store knows nothing of what the document means: it moves
bytes, versions and change notices.

The contract that makes a cached copy safe to act on:
- `load` establishes the change subscription before it reads, so every change committed after
  the read is notified;
- `update` returns only after every other subscriber has handled the change (its `on_change`
  has returned) or has lost its subscription for good;
- `trusted` is false from the moment a change notice arrives until `load` runs again, and
  whenever the subscription is lost or not confirmed recently enough to be sure it is alive.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

OnChange = Callable[[], Awaitable[None]]


class StaleVersion(Exception):
    """The document is no longer at the version an update was computed from."""


@dataclass(frozen=True)
class Snapshot:
    """The document as read, with its version (0 and None: no document was ever written)."""

    version: int
    document: bytes | None


class ReservationStore(Protocol):
    @property
    def name(self) -> str:
        """Where the state lives, for logs and errors."""
        ...

    def trusted(self) -> bool:
        """Whether the last `load` (or own `update`) is still the latest document."""
        ...

    async def load(self) -> Snapshot:
        """Subscribe (again) if needed, then read the document. OSError when unreachable."""
        ...

    async def update(self, version: int, document: bytes) -> int:
        """Replace the document if it is still at `version`, else raise StaleVersion; returns
        the new version, `version + 1`, once every other subscriber has handled the change."""
        ...

    def subscribe(self, on_change: OnChange) -> None:
        """`on_change` runs on the event loop when another party has changed the document;
        the change is acknowledged to its author after `on_change` returns."""
        ...

    def close(self) -> None:
        """Unsubscribe and let go of the connection (blocking; at shutdown)."""
        ...


SharedDocument = ReservationStore
"""The same contract, named for the documents that are not reservations (ROD tokens)."""
