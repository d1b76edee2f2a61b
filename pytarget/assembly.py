"""The configuration turned into live objects: backstores by their kind, logical units with their
opcode tables, target nodes with their access lists and CHAP credentials, the target registry,
and the copy manager with its domain over the targets. The server assembles everything here at
start; a reload assembles the new and replaced parts here before it swaps them in.

Nothing here listens, logs in or serves: the objects are handed to the server, which owns them
from then on.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from .backstore import KINDS
from .backstore.base import Backstore
from .backstore.rbd import RbdBackstore
from .cluster.local import LocalDocument, Relay
from .cluster.ownership import RadosOwnership, object_name
from .cluster.rados import RadosReservationStore
from .config import (
    Config,
    ConfigError,
    LunConfig,
    SnapshotSource,
    TargetConfig,
    local_gateway,
    lun_owner,
)
from .copy import commands as copy_commands
from .copy.manager import CopyManager
from .core.qos import InitiatorPolicy, Limits, TargetPolicy
from .core.reservations import ReservationStore, SharedDocument
from .core.task import Nexus
from .iscsi.node import DEFAULT_TPGT, RELATIVE_PORT, AclEntry, TargetNode
from .iscsi.target import TargetRegistry
from .nbd.exports import LOOPBACK, ContextSource, Export, ExportTable
from .nbd.proto import DIRTY_BITMAP
from .scsi.alua import PortGroups, port_groups
from .scsi.cbt import bitmaps
from .scsi.device import LogicalUnit, LuConfig, NoLogicalUnit
from .scsi.pr import PrStateError
from .scsi.qos import QosGate
from .transport import is_local_address

WILDCARD_HOSTS = ("", "0.0.0.0", "::")

log = logging.getLogger("pytarget")


def backstore_kind(config: Config, tc: TargetConfig, lc: LunConfig) -> type[Backstore]:
    """The backstore a LUN's configuration names (ConfigError for a kind that does not exist)."""
    kind = KINDS.get(lc.backstore)
    if kind is None:
        key = f"targets[{config.targets.index(tc)}].luns[{tc.luns.index(lc)}].backstore"
        raise ConfigError(config.file, key, "one of " + ", ".join(sorted(KINDS)))
    return kind


def backstore_params(lc: LunConfig) -> dict[str, Any]:
    """The parameters a LUN's backstore is opened and provisioned with (for a `snapshot:` LUN,
    those of the LUN it shows a snapshot of)."""
    if lc.path is None:
        return dict(lc.rbd)
    return {"path": str(lc.path)}


def snapshot_params(kind: type[Backstore], lc: LunConfig, name: str) -> dict[str, Any]:
    """The parameters that open snapshot `name` of LUN `lc` (read-only)."""
    return kind.snapshot_params(backstore_params(lc), name)


def lu_identity(target_name: str, lun: int, serial: str | None,
                snapshot: str | None = None) -> tuple[str, bytes]:
    """A stable unit serial number and NAA 3h (locally assigned) designator for a LUN, or for
    snapshot `snapshot` of it: derived from the LUN and the snapshot's name, whichever target
    and LUN show the snapshot, and distinct from the LUN's own."""
    key = f"{target_name.lower()}:{lun}" + ("" if snapshot is None else f"@{snapshot}")
    digest = hashlib.sha256(key.encode()).digest()
    value = (0x3 << 60) | (int.from_bytes(digest[:8], "big") & ((1 << 60) - 1))
    naa = value.to_bytes(8, "big")
    return serial or digest[:8].hex().upper(), naa


def _state_suffix(lc: LunConfig, suffix: str) -> str:
    return suffix if lc.snapshot is None else f"@{lc.snapshot.name}{suffix}"


def _image_state_path(config: Config, lc: LunConfig, suffix: str) -> Path:
    """Where this gateway keeps a file of state for an RBD image, which has no directory of its
    own: <config dir>/rbd.<pool>.<image><suffix>."""
    return config.base / f"rbd.{lc.rbd['pool']}.{lc.rbd['image']}{_state_suffix(lc, suffix)}"


def pr_state_path(config: Config, lc: LunConfig) -> Path:
    """APTPL state lives next to the configuration: <config dir>/<backing file>.pr.json, and
    for an RBD image <config dir>/rbd.<pool>.<image>.pr.json (kept by this gateway only); a
    snapshot LUN's has `@SNAPSHOT` before `.pr.json`."""
    if lc.path is None:
        return _image_state_path(config, lc, ".pr.json")
    return config.base / f"{lc.path.name}{_state_suffix(lc, '.pr.json')}"


def snapshot_catalog_path(config: Config, lc: LunConfig) -> Path:
    """What is known of a LUN's snapshots (docs/snapshots.md): <backing file>.snapshots.json
    beside the backing file (and its `<backing file>.snapshots/` directory of snapshots), and
    for an RBD image <config dir>/rbd.<pool>.<image>.snapshots.json."""
    if lc.path is None:
        return _image_state_path(config, lc, ".snapshots.json")
    return lc.path.with_name(f"{lc.path.name}.snapshots.json")


# The channel to the other worker processes (`workers:`), set by a worker before it builds
# anything; None in a single process.
_worker_relay: Relay | None = None


def serve_as_worker(relay: Relay) -> None:
    """This process is one of several workers: the logical units it builds from now on keep
    their shared state (reservations, ROD tokens) in documents the workers share through
    `relay`, and their atomic operations exclude the other workers'."""
    global _worker_relay
    _worker_relay = relay


def worker_documents(config: Config, lc: LunConfig) -> tuple[Path, Path]:
    """Where the workers of one machine share a LUN's reservations and ROD tokens: beside its
    APTPL file, `<backing file>.workers.pr` and `<backing file>.workers.tokens`."""
    aptpl = pr_state_path(config, lc)
    stem = aptpl.name.removesuffix(".pr.json")
    return aptpl.with_name(f"{stem}.workers.pr"), aptpl.with_name(f"{stem}.workers.tokens")


def reservation_store(lc: LunConfig, naa: bytes) -> ReservationStore | None:
    """The store a LUN shares its reservations through with the other gateways, or None (the
    process's own state and APTPL file). It connects when the LUN first needs it."""
    rc = lc.reservations
    if rc is None:
        return None
    return RadosReservationStore(rc.pool, rc.object or f"pytarget.reservations.{naa.hex()}",
                                 conf=str(rc.conf),
                                 keyring=None if rc.keyring is None else str(rc.keyring),
                                 client_id=rc.client_id)


def token_store(lc: LunConfig, naa: bytes) -> SharedDocument | None:
    """Where a LUN whose reservations are shared keeps its ROD tokens, so that a token made
    through one gateway can be used through another: beside the reservations, in the same pool
    through the same client, object `<reservations object>.tokens` (default
    pytarget.tokens.<NAA>). None for a LUN without shared reservations."""
    rc = lc.reservations
    if rc is None:
        return None
    name = f"{rc.object}.tokens" if rc.object else f"pytarget.tokens.{naa.hex()}"
    return RadosReservationStore(rc.pool, name, conf=str(rc.conf),
                                 keyring=None if rc.keyring is None else str(rc.keyring),
                                 client_id=rc.client_id)


def sanitize_state_path(config: Config, lc: LunConfig) -> Path:
    """A sanitize in progress or failed is recorded next to the backing file,
    <backing file>.sanitize.json, and for an RBD image in
    <config dir>/rbd.<pool>.<image>.sanitize.json (SBC-4 4.11.4: the failure mode survives a
    restart)."""
    if lc.path is None:
        return _image_state_path(config, lc, ".sanitize.json")
    return lc.path.with_name(f"{lc.path.name}{_state_suffix(lc, '.sanitize.json')}")


def checkpoint_state_path(config: Config, lc: LunConfig) -> Path:
    """A LUN's checkpoints and their dirty bitmaps are kept next to the backing file,
    <backing file>.cbt, and for an RBD image in <config dir>/rbd.<pool>.<image>.cbt
    (docs/cbt.md)."""
    if lc.path is None:
        return _image_state_path(config, lc, ".cbt")
    return lc.path.with_name(f"{lc.path.name}.cbt")


def check(config: Config) -> None:
    """What only assembly can refuse, before anything is created."""
    local_gateway(config)
    check_backstores(config)
    check_pr_paths(config)


def check_backstores(config: Config) -> None:
    """ConfigError when a LUN names a kind of backstore that does not exist."""
    for tc in config.targets:
        for lc in tc.luns:
            backstore_kind(config, tc, lc)


def check_pr_paths(config: Config) -> None:
    """PrStateError when two LUNs would keep their persistent reservations in one file."""
    seen: set[Path] = set()
    for tc in config.targets:
        for lc in tc.luns:
            path = pr_state_path(config, lc)
            if path in seen:
                raise PrStateError(errno.EEXIST, "two LUNs would keep persistent reservations "
                                   "in one file (backing file names must differ)", str(path))
            seen.add(path)


def create_backing(config: Config, tc: TargetConfig, lc: LunConfig) -> bool:
    """Create a LUN's missing backing store (sparse, of the configured size); never touches an
    existing one. True when it was created."""
    kind, params = backstore_kind(config, tc, lc), backstore_params(lc)
    key = f"targets[{config.targets.index(tc)}].luns[{tc.luns.index(lc)}]"
    if lc.snapshot is not None:
        if not kind.exists(snapshot_params(kind, lc, lc.snapshot.name)):
            raise ConfigError(config.file, f"{key}.snapshot",
                              f"{lc.snapshot} does not exist (see `pytarget snapshot list`)")
        return False
    if kind.exists(params):
        return False
    if lc.size is None:  # load() refuses a missing file without a size; an image shows here
        raise ConfigError(config.file, f"{key}.size",
                          f"{lc.location} does not exist and no size is given to create it")
    if lc.readonly:
        raise ConfigError(config.file, f"{key}.image",
                          f"{lc.location} does not exist (read-only LUNs are never created)")
    kind.provision(params, lc.size)
    return True


def prepare_backing_files(config: Config) -> list[Path | str]:
    """Create the backing stores that do not exist yet; returns the created ones (the path of
    a file, pool/image of an RBD image)."""
    return [lc.path if lc.path is not None else lc.location
            for tc in config.targets for lc in tc.luns if create_backing(config, tc, lc)]


def local_port(config: Config) -> tuple[int, int]:
    """(TPGT, relative target port identifier) of this process's target port of each target:
    its gateway's id for both, or 1 and 1 without gateways."""
    gateway = local_gateway(config)
    return (DEFAULT_TPGT, RELATIVE_PORT) if gateway is None else (gateway.id, gateway.id)


def lu_port_groups(config: Config) -> PortGroups:
    """The target port groups every LU is reached through: one per gateway, or the one
    group of a process without gateways (scsi/alua.py)."""
    tpgt, relative_port = local_port(config)
    if not config.gateways:
        return PortGroups.single(tpgt, relative_port)
    return port_groups([(g.id, g.name, (g.id,)) for g in config.gateways], tpgt)


def build_node(tc: TargetConfig, config: Config) -> TargetNode[LogicalUnit]:
    """A target node's settings from its configuration, without its logical units; its
    target port is this process's gateway's when `config` has gateways."""
    acl = None if tc.acl is None else [
        AclEntry(e.initiator, None if e.luns is None else frozenset(e.luns)) for e in tc.acl]
    tpgt, relative_port = local_port(config)
    return TargetNode(tc.name, tc.alias, tpgt=tpgt, relative_port=relative_port, acl=acl,
                      auth=tc.auth, max_sessions=tc.max_sessions)


def open_backing(config: Config, tc: TargetConfig, lc: LunConfig) -> Backstore:
    """Open a LUN's backing store, which must exist (blocking: an RBD image connects to its
    cluster); a `snapshot:` LUN's snapshot, read-only."""
    kind = backstore_kind(config, tc, lc)
    if lc.snapshot is not None:
        return kind.open(snapshot_params(kind, lc, lc.snapshot.name), readonly=True)
    return kind.open(backstore_params(lc), readonly=lc.readonly)


def snapshot_lun(lc: LunConfig, target: str, name: str, lun: int | None = None) -> LunConfig:
    """The configuration of a read-only LUN (numbered `lun`, by default the source's) showing
    snapshot `name` of `lc`, a LUN of `target`."""
    return LunConfig(lc.id if lun is None else lun, lc.path, block_size=lc.block_size,
                     readonly=True, thin=lc.thin, backstore=lc.backstore, rbd=dict(lc.rbd),
                     snapshot=SnapshotSource(target, lc.id, name))


def build_lu(config: Config, tc: TargetConfig, lc: LunConfig,
             node: TargetNode[LogicalUnit], backstore: Backstore | None = None) -> LogicalUnit:
    """Make a LUN's device server on its backing store, opened here unless given (and closed
    if this fails)."""
    if backstore is None:
        backstore = open_backing(config, tc, lc)
    try:
        if lc.snapshot is None:
            serial, naa = lu_identity(tc.name, lc.id, lc.serial)
        else:
            source = lc.snapshot
            serial, naa = lu_identity(source.target, source.lun, lc.serial, source.name)
        owner = lun_owner(config, lc)
        lu_config = LuConfig(lun=lc.id, block_size=lc.block_size, readonly=lc.readonly,
                             thin=lc.thin, removable=lc.removable, serial=serial, naa=naa,
                             pr_state_path=str(pr_state_path(config, lc)),
                             port_groups=lu_port_groups(config),
                             owner=owner.id if owner is not None else None,
                             sanitize_state_path=str(sanitize_state_path(config, lc)),
                             sanitize_rate=lc.sanitize_rate,
                             checkpoint_state_path=str(checkpoint_state_path(config, lc)),
                             checkpoint_granularity=lc.checkpoint_granularity)
        if lc.atomic_write_size is not None:
            lu_config.atomic_write_bytes = lc.atomic_write_size
        lu_config.sanitize = _worker_relay is None
        reservations, tokens = reservation_store(lc, naa), token_store(lc, naa)
        if _worker_relay is not None:
            backstore.share_with_processes()
            if reservations is None:
                pr_path, tokens_path = worker_documents(config, lc)
                reservations = LocalDocument(pr_path, _worker_relay)
                tokens = LocalDocument(tokens_path, _worker_relay)
        # The unit's opcode table: SPC/SBC rows joined with the copy manager's.
        lu = LogicalUnit(lu_config, backstore, node, copy_commands.ROWS,
                         reservations=reservations, tokens=tokens)
        lu.ownership = ownership(config, tc, lc, lu)
        return lu
    except BaseException:
        backstore.close()
        raise


def ownership(config: Config, tc: TargetConfig, lc: LunConfig,
              lu: LogicalUnit) -> RadosOwnership | None:
    """What moves the LU's owner when a gateway dies: for an RBD LUN served by gateways, the
    ownership record beside its image, on the image's own client (cluster/ownership.py).
    The image's exclusive-lock feature is turned off first: every gateway writes the image
    (active/non-optimized paths serve I/O), and with the feature on the lock would move at
    every write of another gateway."""
    backstore = lu.backstore
    gateway, owner = local_gateway(config), lun_owner(config, lc)
    if not isinstance(backstore, RbdBackstore) or gateway is None or owner is None \
            or lc.snapshot is not None:
        return None  # a snapshot LUN is read-only at a snapshot of another LUN's image
    lu.alua.pref_follows_owner = True
    if not lu.readonly and backstore.image.allow_concurrent_writers_blocking():
        log.warning("%s LUN %d: turned off the exclusive-lock feature (and object map, fast "
                    "diff, journaling) of %s: gateways write it concurrently "
                    "(docs/guides/scale-out.md)", tc.name, lc.id, backstore.location)
    return RadosOwnership(
        backstore.image.rados_handles(), object_name(str(lc.rbd["image"])),
        local=gateway.name, gateways=[g.name for g in config.gateways], preferred=owner.name,
        set_owner=lu.set_owner, begin_transition=lu.begin_transition,
        timeout=config.failover.timeout, heartbeat=config.failover.heartbeat,
        label=f"{tc.name} LUN {lc.id}")


def build_registry(config: Config, luns: bool = True) -> TargetRegistry:
    """Targets (with their logical units unless `luns` is false) and registry-wide settings."""
    registry = TargetRegistry(absent_unit=NoLogicalUnit)
    registry.portals = list(config.portals)
    registry.discovery_auth = config.discovery_auth
    registry.max_sessions = config.limits.max_sessions
    if luns:
        check(config)
    registry.tpgt = local_port(config)[0]
    try:
        for tc in config.targets:
            node = build_node(tc, config)
            registry.add_target(node)
            if luns:
                for lc in tc.luns:
                    node.luns[lc.id] = build_lu(config, tc, lc, node)
                apply_qos(node, tc)
    except BaseException:
        for node in registry.targets.values():
            for lu in node.luns.values():
                lu.close()
        raise
    return registry


def apply_qos(node: TargetNode[LogicalUnit], tc: TargetConfig) -> list[str]:
    """Put a target's QoS policies (tc.qos) in force on its logical units: one scheduler per
    target, reached by each LU a policy can apply to (the others keep no gate: no cost), kept
    across reloads with its flows and held commands. Returns what changed, for the log."""
    gate = next((lu.qos for lu in node.luns.values() if lu.qos is not None), None)
    old = gate.policy if gate is not None else TargetPolicy()
    new = tc.qos
    if new.empty:
        if gate is not None:
            gate.close()
        gate = None
    elif gate is None:
        gate = QosGate(node.name, new)
    elif new != old:
        gate.set_policy(new)
    governed = {lun for lun, p in new.luns if p.limits.limited or p.initiators}
    for lun, lu in node.luns.items():
        lu.qos = gate if gate is not None and (new.initiators or lun in governed) else None
    return qos_changes(node.name, old, new)


def qos_changes(target: str, old: TargetPolicy, new: TargetPolicy) -> list[str]:
    """One line per policy that differs between two sets of a target's policies."""
    def text(limits: Limits | None, initiators: tuple[InitiatorPolicy, ...]) -> str:
        def values(lim: Limits) -> str:
            return ", ".join(f"{k} {v:g}" for k, v in lim.describe().items())

        parts = [values(limits)] if limits is not None and limits.limited else []
        parts += [f"initiator {p.initiator} per {p.per}: {values(p.limits)}"
                  for p in initiators]
        return "; ".join(parts) or "none"

    out = []
    if old.normalize != new.normalize:
        out.append(f"target {target}: QoS normalization now {new.normalize} bytes")
    if old.initiators != new.initiators:
        out.append(f"target {target}: QoS initiator policy now {text(None, new.initiators)}")
    for lun in sorted({n for n, _ in old.luns} | {n for n, _ in new.luns}):
        before, after = old.lun(lun), new.lun(lun)
        if before != after:
            desc = "none" if after is None else text(after.limits, after.initiators)
            out.append(f"target {target} LUN {lun}: QoS policy now {desc}")
    return out


def build_copy_manager(registry: TargetRegistry, config: Config) -> CopyManager:
    """The copy manager over every target of `registry`, serving each of their logical units."""
    manager = CopyManager(RegistryDomain(registry), list(config.management_addresses))
    for node in registry.targets.values():
        for lu in node.luns.values():
            manager.attach(lu)
    return manager


def build_exports(registry: TargetRegistry, config: Config,
                  snapshots: Mapping[SnapshotSource, LogicalUnit] | None = None) -> ExportTable:
    """The NBD exports: every LUN of every target as `TARGET-IQN/LUN-ID`, served by whatever
    logical unit the registry has at that LUN when a request comes, open to the client
    networks of its `nbd_allow` (loopback only by default); and each snapshot exposed over
    NBD (`snapshots`, its read-only unit) as `TARGET-IQN/LUN-ID@SNAPSHOT`, open to the same
    networks as its LUN."""
    exports = []
    allows: dict[tuple[str, int], tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = {}
    for tc in config.targets:
        for lc in tc.luns:
            allowed = config.nbd.allowed(tc.name, lc.id) if config.nbd is not None else None
            allow = LOOPBACK if allowed is None else tuple(
                ipaddress.ip_network(net) for net in allowed)
            allows[tc.name.lower(), lc.id] = allow
            exports.append(Export(f"{tc.name}/{lc.id}", tc.name, lc.id,
                                  partial(_live_unit, registry, tc.name, lc.id),
                                  description=tc.alias or f"LUN {lc.id} of {tc.name}",
                                  allow=allow,
                                  contexts=partial(checkpoint_contexts, registry, tc.name,
                                                   lc.id)))
    for source, unit in (snapshots or {}).items():
        key = (source.target.lower(), source.lun)
        if key in allows:
            exports.append(snapshot_export(source, unit, allows[key], partial(
                checkpoint_contexts, registry, source.target, source.lun, until=source.name)))
    return ExportTable(exports)


def snapshot_export(source: SnapshotSource, unit: LogicalUnit,
                    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                    contexts: Callable[[], Mapping[str, ContextSource]]) -> Export:
    """The read-only NBD export `TARGET-IQN/LUN-ID@SNAPSHOT` of a snapshot's unit, with the
    dirty bitmaps of the LUN's checkpoints up to the one taken with the snapshot."""
    return Export(str(source), source.target, source.lun, lambda: None if unit.closed else unit,
                  description=f"snapshot {source.name} of LUN {source.lun} of {source.target}",
                  allow=allow, contexts=contexts)


def checkpoint_contexts(registry: TargetRegistry, target: str, lun: int,
                        until: str | None = None) -> dict[str, ContextSource]:
    """The `qemu:dirty-bitmap:NAME` contexts of a LUN's export: each checkpoint whose changes
    are known exactly, since it until now, or until the checkpoint `until` (the one created with
    a snapshot, for that snapshot's export)."""
    lu = _live_unit(registry, target, lun)
    if lu is None:
        return {}
    return {DIRTY_BITMAP + name: source for name, source in bitmaps(lu.checkpoints, until).items()}


def _live_unit(registry: TargetRegistry, target: str, lun: int) -> LogicalUnit | None:
    node = registry.target(target)
    return node.luns.get(lun) if node is not None else None


class RegistryDomain:
    """The copy manager's `CopyDomain` over the iSCSI target registry: a copy reaches only the
    logical units the initiator's access lists let it reach."""

    def __init__(self, registry: TargetRegistry,
                 is_local: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]
                 = is_local_address) -> None:
        self.registry = registry
        self.is_local = is_local

    def accessible_units(self, nexus: Nexus) -> Iterator[LogicalUnit]:
        for node in self.registry.targets.values():
            if not node.allows(nexus.initiator_name):
                continue
            masked = node.masked_luns(nexus.initiator_name)
            for lun, lu in node.luns.items():
                if masked is None or lun in masked:
                    yield lu

    def portal_unit(self, nexus: Nexus, address: str, port: int, lun: int) -> LogicalUnit | None:
        if not any(self._portal_matches(host, p, address, port)
                   for host, p in self.registry.portals):
            return None
        node = self.registry.target(nexus.target_name)
        if node is None or not node.allows(nexus.initiator_name):
            return None
        masked = node.masked_luns(nexus.initiator_name)
        if masked is not None and lun not in masked:
            return None
        return node.luns.get(lun)

    def target_names(self) -> list[str]:
        return [node.name for node in self.registry.targets.values()]

    def portal_urls(self) -> list[str]:
        urls = []
        for host, port in self.registry.portals:
            if host in WILDCARD_HOSTS:
                continue
            urls.append(f"iscsi://[{host}]:{port}" if ":" in host else f"iscsi://{host}:{port}")
        return urls

    def _portal_matches(self, host: str, port: int, address: str, wanted_port: int) -> bool:
        """Whether address:wanted_port is the portal host:port (a wildcard portal listens on
        every local address)."""
        if port != wanted_port:
            return False
        try:
            want = ipaddress.ip_address(address)
        except ValueError:
            return False
        if host in WILDCARD_HOSTS:
            return self.is_local(want)
        try:
            have = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(have, ipaddress.IPv6Address) and have.ipv4_mapped is not None:
            have = have.ipv4_mapped
        if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped is not None:
            want = want.ipv4_mapped
        return have == want
