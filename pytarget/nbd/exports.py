"""What an NBD client can see and open: exports, the access rule that hides them, and the
metadata contexts each offers.

An export is a LUN of a target named as in an iSCSI URL path, `TARGET-IQN/LUN-ID`. NBD carries
no initiator name, so access is by client address: an export is listed, described and opened
only for clients whose address lies in its `allow` networks (loopback alone unless configured,
docs/nbd.md). To a client outside them the export does not exist (NBD_REP_ERR_UNKNOWN, absent
from NBD_OPT_LIST), exactly as a masked LUN does not exist for an iSCSI initiator.

Metadata contexts: `base:allocation` is served by the glue from GET LBA STATUS for every
export; anything else an export offers (a `qemu:dirty-bitmap:NAME` of a checkpoint) comes from
its `contexts`, each a `ContextSource` that answers block status for a range.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..core.frontend import FrontEndUnit
from .proto import BASE_ALLOCATION

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                 ipaddress.ip_network("::1/128"))


class ContextSource(Protocol):
    """A metadata context beyond `base:allocation` (a checkpoint's dirty bitmap...)."""

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents from `offset`, covering at least one byte."""
        ...


def _no_contexts() -> Mapping[str, ContextSource]:
    return {}


@dataclass(frozen=True)
class Export:
    name: str
    target_name: str
    lun: int
    unit: Callable[[], FrontEndUnit | None]  # the unit serving it now; None once removed
    description: str = ""
    allow: tuple[Network, ...] = LOOPBACK
    contexts: Callable[[], Mapping[str, ContextSource]] = field(default=_no_contexts)

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.allow)

    def context_names(self) -> list[str]:
        return [BASE_ALLOCATION, *sorted(self.contexts())]


class ExportDirectory(Protocol):
    """The exports as one client address sees them."""

    def visible(self, address: str) -> list[Export]: ...

    def lookup(self, name: str, address: str) -> Export | None: ...


class ExportTable:
    """A fixed set of exports (rebuilt by the server on reload)."""

    def __init__(self, exports: Iterable[Export]) -> None:
        self.exports = {e.name: e for e in exports}

    def visible(self, address: str) -> list[Export]:
        return [e for e in self.exports.values() if e.allows(address)]

    def lookup(self, name: str, address: str) -> Export | None:
        """The export `name`; the empty name ("the default export") is the only export the
        client can see, when it sees exactly one."""
        if not name:
            visible = self.visible(address)
            return visible[0] if len(visible) == 1 else None
        export = self.exports.get(name)
        return export if export is not None and export.allows(address) else None


def match_contexts(available: list[str], queries: tuple[str, ...], listing: bool) -> list[str]:
    """The contexts that NBD_OPT_LIST_META_CONTEXT (`listing`) or NBD_OPT_SET_META_CONTEXT
    selects ("Metadata querying"): no query lists everything and sets nothing; a query of a
    namespace and an empty leaf (`base:`, `qemu:dirty-bitmap:`) lists every context it
    prefixes and sets none; any other query selects the context of exactly that name.
    Queries of unknown namespaces, or without a colon, select nothing."""
    if not queries:
        return list(available) if listing else []
    chosen: list[str] = []
    for query in queries:
        if ":" not in query:
            continue
        if query.endswith(":"):
            if listing:
                chosen += [name for name in available if name.startswith(query)]
        elif query in available:
            chosen.append(query)
    return list(dict.fromkeys(chosen))
