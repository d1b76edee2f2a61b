"""Live reconfiguration: the difference between the running configuration and a new one, checked
whole before anything changes, then applied without touching what did not change.

A `Reload` goes through three steps:

1. check: compare the two configurations target by target and LUN by LUN and refuse what
   cannot be applied (a LUN that would shrink, growing a read-only LUN or a block device, two
   LUNs sharing a reservations file). Nothing has changed yet.
2. prepare: everything that can fail, undone if anything fails: create the backing files of new
   LUNs, open every new or replaced LUN, bind new portals and a moved metrics endpoint, then
   grow backing files (shrunk back on failure; no initiator has seen the new blocks yet).
3. commit: swap the new objects in. Sessions stay logged in unless their target was removed.
   Initiators learn about changes through unit attentions: REPORTED LUNS DATA HAS CHANGED
   (3Fh/0Eh) on every LUN a session sees whenever the set of LUNs it sees changes (LUNs added or
   removed, ACL edits); CAPACITY DATA HAS CHANGED (2Ah/09h) on a grown LUN; INQUIRY DATA HAS
   CHANGED (3Fh/03h) and CAPACITY DATA HAS CHANGED on a LUN replaced by another backing file or
   other settings, and INQUIRY DATA HAS CHANGED everywhere when VPD 85h's addresses change.
   Removed LUNs are retired in the background: their commands in flight complete first.

Target settings other than LUNs (alias, access list, CHAP, session limits) and registry-wide
settings (discovery CHAP, the session limit) are copied from targets built afresh from the new
configuration, so they apply to the next login; sessions already logged in stay. `limits`
apply to new connections (memory budgets at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import assembly
from .backstore.threads import run_blocking
from .config import Config, ConfigError, LunConfig, TargetConfig, lun_owner
from .core.sense import Asc
from .iscsi.bounds import Bounds
from .iscsi.node import TargetNode
from .iscsi.target import TargetRegistry
from .scsi.pr import PrStateError
from .status import size_text

if TYPE_CHECKING:
    from .backstore.base import Backstore
    from .metrics import MetricsServer
    from .scsi.device import LogicalUnit

# Registry attributes that are live state, not settings: a reload never replaces them.
_REGISTRY_STATE = frozenset({"targets", "portals", "sessions", "_next_tsih", "ledger"})
_NODE_STATE = frozenset({"name", "luns"})
# A change to any of these replaces the LUN with a new logical unit.
_IDENTITY = ("path", "rbd", "block_size", "readonly", "thin", "removable", "serial",
             "backstore", "reservations", "sanitize_rate", "atomic_write_size", "snapshot",
             "checkpoint_granularity")


class ReloadRefused(Exception):
    """The new configuration cannot be applied; nothing was changed."""


class Portal(Protocol):
    """A listening portal opened for the new configuration."""

    @property
    def address(self) -> tuple[str, int]: ...

    def close(self) -> None: ...


class Reconfigurable(Protocol):
    """The running server as a reload sees it: what it reads, and one method per change."""

    @property
    def config(self) -> Config: ...

    @property
    def registry(self) -> TargetRegistry: ...

    @property
    def fixed_portals(self) -> bool: ...

    def use_config(self, config: Config) -> None: ...

    def apply_limits(self, limits: Bounds) -> None: ...

    def set_poll_window(self, window: float) -> bool: ...

    def open_portal(self, host: str, port: int) -> Portal: ...

    def change_portals(self, removed: list[tuple[str, int]],
                       added: list[tuple[tuple[str, int], Any]]) -> list[str]: ...

    async def start_metrics(self, address: tuple[str, int]) -> MetricsServer: ...

    async def replace_metrics(self, metrics: MetricsServer | None) -> None: ...

    def update_management_addresses(self, config: Config) -> bool: ...

    def serve_lu(self, node: TargetNode[LogicalUnit], lu: LogicalUnit) -> LogicalUnit | None: ...

    def remove_lu(self, node: TargetNode[LogicalUnit], lun: int) -> None: ...

    def add_target(self, node: TargetNode[LogicalUnit]) -> None: ...

    async def remove_target(self, node: TargetNode[LogicalUnit], reason: str) -> int: ...

    def retire(self, lu: LogicalUnit) -> None: ...


def _identity(lc: LunConfig) -> tuple[Any, ...]:
    return tuple(lc.path.resolve() if f == "path" and lc.path is not None else getattr(lc, f)
                 for f in _IDENTITY)


@dataclasses.dataclass
class _LunChange:
    kind: str  # "add", "remove", "replace", "resize"
    node: TargetNode[LogicalUnit]
    tc: TargetConfig | None
    lun: int
    lc: LunConfig | None = None  # the new configuration (add, replace)
    live: LogicalUnit | None = None  # the running logical unit (remove, replace, resize)
    new: LogicalUnit | None = None  # the prepared one (add, replace)
    grow_to: int | None = None  # resize: the backing file's new size, when it must grow
    why: str = ""


class Reload:
    """One new configuration being applied to a running `Server` (see the module docstring)."""

    def __init__(self, server: Reconfigurable, new: Config) -> None:
        self.server = server
        self.old = server.config
        self.new = new
        self.changes: list[str] = []
        self.lun_changes: list[_LunChange] = []
        self.added_targets: list[tuple[TargetConfig, TargetNode[LogicalUnit]]] = []
        self.removed_targets: list[TargetNode[LogicalUnit]] = []
        self.kept: list[tuple[TargetNode[LogicalUnit], TargetConfig]] = []
        self.added_portals: list[tuple[str, int]] = []
        self.removed_portals: list[tuple[str, int]] = []
        # What prepare() did, for rollback.
        self._created: list[Path] = []
        self._opened: list[LogicalUnit] = []
        self._grown: list[tuple[Backstore, int]] = []
        self._listeners: list[tuple[tuple[str, int], Portal]] = []
        self._metrics: MetricsServer | None = None

    async def apply(self) -> list[str]:
        try:
            self.check()
            await self.prepare()
        except BaseException as exc:
            await self.rollback()
            if isinstance(exc, OSError):
                where = f"{exc.filename}: " if exc.filename else ""
                raise ReloadRefused(f"{where}{exc.strerror or exc}") from None
            raise
        await self.commit()
        return self.changes

    # ------------------------------------------------------------------ 1. check
    def check(self) -> None:
        try:
            assembly.check(self.new)
        except PrStateError as exc:
            raise ReloadRefused(f"{exc.filename}: {exc.strerror}") from None
        except ConfigError as exc:
            raise ReloadRefused(str(exc)) from None
        self._check_gateways()
        live = self.server.registry.targets
        old_targets = {t.name.lower(): t for t in self.old.targets}
        new_targets = {t.name.lower(): t for t in self.new.targets}
        for key, tc in new_targets.items():
            node = live.get(key)
            if key not in old_targets or node is None:
                self.added_targets.append((tc, assembly.build_node(tc, self.new)))
            else:
                self.kept.append((node, tc))
                self._check_luns(node, old_targets[key], tc)
        self.removed_targets = [live[k] for k in old_targets if k not in new_targets and k in live]
        if not self.server.fixed_portals:  # as multisets: "127.0.0.1:0" twice is two portals
            new, old = Counter(self.new.portals), Counter(self.old.portals)
            self.added_portals = list((new - old).elements())
            self.removed_portals = list((old - new).elements())

    def _check_gateways(self) -> None:
        """This process's target port may not change under its sessions: its gateway keeps
        its id (other gateways may come, go or change; the LUs' port groups follow)."""
        before, after = assembly.local_port(self.old), assembly.local_port(self.new)
        if before != after:
            raise ReloadRefused(f"{self.new.file}: gateway: this process's target port group "
                                f"would change from {before[0]} to {after[0]}; restart it "
                                "instead")

    def _check_luns(self, node: TargetNode[LogicalUnit], old: TargetConfig,
                    new: TargetConfig) -> None:
        olds = {lc.id: lc for lc in old.luns}
        news = {lc.id: lc for lc in new.luns}
        for lun, lu in sorted(node.luns.items()):
            if lu.sanitize.run is not None and (
                    lun not in news or lun not in olds
                    or _identity(olds[lun]) != _identity(news[lun])
                    or news[lun].size != olds[lun].size):
                # the operation belongs to this logical unit and covers its whole medium
                raise ReloadRefused(f"{self.new.file}: target {new.name} LUN {lun}: a SANITIZE "
                                    "is in progress; change the LUN once it has completed")
            if lun not in news:
                self.lun_changes.append(_LunChange("remove", node, new, lun, live=lu))
        for lun, lc in sorted(news.items()):
            running = node.luns.get(lun)
            before = olds.get(lun)
            if running is None or before is None:
                self.lun_changes.append(_LunChange("add", node, new, lun, lc))
            elif _identity(before) != _identity(lc):
                why = ", ".join(f for f, a, b in zip(_IDENTITY, _identity(before), _identity(lc),
                                                      strict=True)
                                if a != b)
                self.lun_changes.append(_LunChange("replace", node, new, lun, lc, running,
                                                   why=why))
            else:
                self._check_size(node, new, lun, before, lc, running)

    def _check_size(self, node: TargetNode[LogicalUnit], tc: TargetConfig, lun: int,
                    before: LunConfig, lc: LunConfig, lu: LogicalUnit) -> None:
        """Grow the file only when the configured size changed and is larger (a size that did
        not change is never acted on, as at start); a file grown by other means is picked up."""
        assert lu.backstore is not None
        current = lu.backstore.medium_size()
        grow_to = None
        if lc.size is not None and lc.size != before.size and lc.size != current:
            where = f"{self.new.file}: target {tc.name} LUN {lun}: size"
            if lc.size < current:
                raise ReloadRefused(f"{where}: {size_text(lc.size)} is smaller than {lc.location} "
                                    f"({size_text(current)}); LUNs never shrink")
            if lu.readonly:
                raise ReloadRefused(f"{where}: a read-only LUN cannot be grown")
            if lc.path is not None and not lc.path.is_file():
                raise ReloadRefused(f"{where}: {lc.path} is not a regular file; grow the "
                                    "device itself, then reload")
            grow_to = lc.size
        if (grow_to or current) // lu.block_size != lu.nblocks:
            self.lun_changes.append(_LunChange("resize", node, tc, lun, lc, lu, grow_to=grow_to))

    # ------------------------------------------------------------------ 2. prepare
    async def prepare(self) -> None:
        for change in self.lun_changes:
            if change.kind in ("add", "replace"):
                assert change.tc is not None and change.lc is not None
                store = await run_blocking(self._create_and_open, change.tc, change.lc)
                change.new = assembly.build_lu(self.new, change.tc, change.lc, change.node,
                                               store)
                self._opened.append(change.new)
        for tc, node in self.added_targets:
            for lc in tc.luns:
                store = await run_blocking(self._create_and_open, tc, lc)
                lu = assembly.build_lu(self.new, tc, lc, node, store)
                self._opened.append(lu)
                node.luns[lc.id] = lu
        for host, port in self.added_portals:
            self._listeners.append(((host, port), self.server.open_portal(host, port)))
        if self.new.metrics != self.old.metrics and self.new.metrics is not None:
            self._metrics = await self.server.start_metrics(self.new.metrics)
        for change in self.lun_changes:
            if change.grow_to is not None:
                assert change.live is not None and change.live.backstore is not None
                backstore = change.live.backstore
                before = backstore.medium_size()
                await run_blocking(backstore.resize, change.grow_to)
                self._grown.append((backstore, before))

    def _create_and_open(self, tc: TargetConfig, lc: LunConfig) -> Backstore:
        """Create a missing backing store and open it, off the event loop (an RBD image is
        reached over the network)."""
        if assembly.create_backing(self.new, tc, lc) and lc.path is not None:
            self._created.append(lc.path)
        return assembly.open_backing(self.new, tc, lc)

    async def rollback(self) -> None:
        for lu in self._opened:
            lu.close()
        for path in self._created:
            with contextlib.suppress(OSError):
                path.unlink()
        for backstore, size in self._grown:
            with contextlib.suppress(OSError):
                backstore.resize(size)
        for _, listener in self._listeners:
            listener.close()
        if self._metrics is not None:
            await self._metrics.close()

    # ------------------------------------------------------------------ 3. commit
    async def commit(self) -> None:
        server = self.server
        registry = server.registry
        kept_nodes = {id(node) for node, _ in self.kept}
        sessions = [s for s in registry.sessions.values()
                    if s.target is not None and id(s.target) in kept_nodes and s.nexus]
        seen_before = {id(s): set(s.target.visible_luns(s.nexus))  # type: ignore[union-attr,arg-type]
                       for s in sessions}

        shadow = assembly.build_registry(self.new, luns=False)
        for node, tc in self.kept:
            fresh = shadow.target(tc.name)
            assert fresh is not None
            for name in self._copy_settings(fresh, node, _NODE_STATE):
                self.changes.append(f"target {node.name}: {name} changed (applies to new "
                                    "logins; sessions stay logged in)")
        for name in self._copy_settings(shadow, registry, _REGISTRY_STATE):
            self.changes.append(f"{name} changed (applies to new logins)")
        if self.new.limits != self.old.limits:
            server.apply_limits(self.new.limits)
            self.changes.append("limits changed (timeouts apply to new connections)")
        if self.new.busy_poll_us != self.old.busy_poll_us \
                and server.set_poll_window(self.new.poll_window()):
            self.changes.append(f"busy polling window now {self.new.poll_window() * 1e6:.0f} µs")

        replaced: list[LogicalUnit] = []
        for change in self.lun_changes:
            self._commit_lun(change, replaced)
        self._commit_port_groups()
        for _, node in self.added_targets:
            server.add_target(node)
            self.changes.append(f"target {node.name} added with {len(node.luns)} LUN(s)")
        for node, tc in [*self.kept, *((n, t) for t, n in self.added_targets)]:
            self.changes += assembly.apply_qos(node, tc)
        for node in self.removed_targets:
            ended = await server.remove_target(node, "target removed from the configuration")
            self.changes.append(f"target {node.name} removed ({ended} session(s) ended)")

        for session in sessions:
            target, nexus = session.target, session.nexus
            assert target is not None and nexus is not None
            session.lun_cache.clear()  # the transport's LUN -> logical unit lookups
            after = set(target.visible_luns(nexus))
            if after != seen_before[id(session)]:
                for lun in after:
                    target.luns[lun].establish_ua(Asc.REPORTED_LUNS_DATA_HAS_CHANGED,
                                                  keys=[nexus.key])
            for lu in replaced:
                if lu.directory is target and lu.lun in after:
                    lu.establish_ua(Asc.INQUIRY_DATA_HAS_CHANGED, keys=[nexus.key])
                    lu.establish_ua(Asc.CAPACITY_DATA_HAS_CHANGED, keys=[nexus.key])

        self.changes += server.change_portals(self.removed_portals, self._listeners)
        if self.server.fixed_portals and self.new.portals != self.old.portals:
            self.changes.append("portals are given on the command line: the configuration's "
                                "portals are not applied")

        if self.new.metrics != self.old.metrics:
            await server.replace_metrics(self._metrics)
            self.changes.append(f"metrics endpoint now {self._metrics.url}" if self._metrics
                                else "metrics endpoint closed")
        if server.update_management_addresses(self.new):
            for node in registry.targets.values():
                for lu in node.luns.values():
                    lu.establish_ua(Asc.INQUIRY_DATA_HAS_CHANGED)
            self.changes.append("management network addresses (VPD 85h) changed")
        if (self.new.control_socket, self.new.control_group) != (self.old.control_socket,
                                                                 self.old.control_group):
            self.changes.append("control_socket/control_group: take effect at the next start")
        server.use_config(self.new)

    def _commit_port_groups(self) -> None:
        """Gateways added, removed or renumbered, or LUN owners changed: every running LU
        reports the new target port groups (scsi/alua.py)."""
        groups = assembly.lu_port_groups(self.new)
        for tc in self.new.targets:
            node = self.server.registry.target(tc.name)
            if node is None:
                continue
            for lc in tc.luns:
                lu = node.luns.get(lc.id)
                owner = lun_owner(self.new, lc)
                if lu is not None and lu.ownership is not None and owner is not None:
                    lu.ownership.set_preferred(owner.name)
                if lu is not None and lu.set_port_groups(groups, owner.id if owner else None):
                    self.changes.append(f"target {node.name} LUN {lc.id}: target port groups "
                                        f"changed, owner {owner.name if owner else '-'}")

    def _commit_lun(self, change: _LunChange, replaced: list[LogicalUnit]) -> None:
        server = self.server
        node, lun = change.node, change.lun
        name = f"target {node.name} LUN {lun}"
        if change.kind == "remove":
            server.remove_lu(node, lun)
            self.changes.append(f"{name} removed")
        elif change.kind in ("add", "replace"):
            assert change.new is not None and change.lc is not None
            server.serve_lu(node, change.new)
            size = size_text(change.new.nblocks * change.new.block_size)
            if change.kind == "add":
                self.changes.append(f"{name} added: {change.lc.location} ({size})")
            else:
                assert change.live is not None
                server.retire(change.live)
                replaced.append(change.new)
                self.changes.append(f"{name} replaced ({change.why} changed): "
                                    f"{change.lc.location} ({size})")
        else:
            lu = change.live
            assert lu is not None and lu.backstore is not None
            before = lu.nblocks * lu.block_size
            lu.backstore.size = lu.backstore.medium_size()
            lu.nblocks = lu.backstore.size // lu.block_size
            lu.checkpoints.resize(lu.nblocks * lu.block_size)
            lu.establish_ua(Asc.CAPACITY_DATA_HAS_CHANGED)
            how = "grown" if change.grow_to is not None else "resized (the backing file changed)"
            self.changes.append(f"{name} {how} from {size_text(before)} to "
                                f"{size_text(lu.nblocks * lu.block_size)}")

    @staticmethod
    def _copy_settings(fresh: Any, live: Any, state: frozenset[str]) -> list[str]:
        """Copy every setting of `fresh` that differs onto `live`; the names that changed."""
        if dataclasses.is_dataclass(fresh):
            names = [f.name for f in dataclasses.fields(fresh)]
        else:
            names = list(vars(fresh))
        changed = []
        for name in names:
            if name in state or callable(getattr(fresh, name)):
                continue
            value = getattr(fresh, name)
            if getattr(live, name, None) != value:
                setattr(live, name, value)
                changed.append(name)
        return changed
