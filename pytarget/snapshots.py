"""Snapshots of the running target's LUNs as an operator reaches them: the control-socket
commands behind `pytarget snapshot ...`, the catalog that keeps what is known of each snapshot
beside its LUN, and the read-only units that serve snapshots exposed over NBD.

The device server takes the snapshots and rolls back (`scsi/snapshots.py`); the backstore keeps
them (`<file>.snapshots/NAME`, an RBD snapshot). The catalog is one JSON file per LUN
(`assembly.snapshot_catalog_path`), replaced atomically, read afresh by every command, so it is
kept across restarts and reloads with nothing cached here. A snapshot shown as a LUN of a
target is a `snapshot:` LUN of the configuration (the command line edits it and reloads, as
`pytarget lun create` does); one exposed over NBD is marked in the catalog and opened again at
the next start. docs/snapshots.md is the operator's side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import assembly
from .backstore.threads import run_blocking
from .config import (
    Config,
    ConfigError,
    LunConfig,
    SnapshotSource,
    TargetConfig,
    check_snapshot_name,
)
from .control import ControlError
from .iscsi.target import TargetRegistry
from .scsi import snapshots as device_snapshots
from .scsi.device import LogicalUnit
from .scsi.snapshots import SnapshotError

log = logging.getLogger("pytarget.snapshots")

CATALOG_VERSION = 1
COMMANDS = ("snapshot_create", "snapshot_list", "snapshot_delete", "snapshot_expose_nbd",
            "snapshot_unexpose_nbd", "snapshot_clone", "snapshot_rollback")


@dataclass
class SnapshotRecord:
    """One snapshot of one LUN, as the catalog keeps it."""

    name: str
    created: str  # ISO 8601, UTC
    size: int  # bytes of the LUN when it was taken
    method: str  # "reflink", "copy", "rbd"
    members: list[str] = field(default_factory=list)  # the set it was taken with (TARGET/LUN)
    held_ms: float = 0.0  # how long the set's writes were held back
    nbd: bool = False  # exposed over NBD as TARGET-IQN/LUN-ID@NAME


class Catalog:
    """The snapshots of one LUN, in a JSON file beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, SnapshotRecord] = {}
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ControlError(f"{path}: unreadable snapshot catalog ({exc})") from None
        if not isinstance(doc, dict) or doc.get("version") != CATALOG_VERSION:
            raise ControlError(f"{path}: not a version {CATALOG_VERSION} snapshot catalog")
        try:
            for raw in doc["snapshots"]:
                record = SnapshotRecord(**raw)
                self.records[record.name] = record
        except (KeyError, TypeError) as exc:
            raise ControlError(f"{path}: damaged snapshot catalog ({exc})") from None

    def save(self) -> None:
        """Replace the file whole (a crash leaves the old or the new one); removed when
        empty."""
        if not self.records:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        doc = {"version": CATALOG_VERSION,
               "snapshots": [asdict(r) for r in self.records.values()]}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out, indent=1)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class SnapshotHost(Protocol):
    """The running server as the snapshot commands see it."""

    @property
    def config(self) -> Config: ...

    @property
    def registry(self) -> TargetRegistry: ...

    def snapshot_exports_changed(self) -> None: ...


class Snapshots:
    """The snapshot commands of one running server and its NBD snapshot units."""

    def __init__(self, host: SnapshotHost) -> None:
        self.host = host
        self.units: dict[SnapshotSource, LogicalUnit] = {}  # exposed over NBD

    # ------------------------------------------------------------------ lookups
    def _lun(self, target: Any, lun: Any) -> tuple[TargetConfig, LunConfig]:
        config = self.host.config
        if not isinstance(target, str) or isinstance(lun, bool) or not isinstance(lun, int):
            raise ControlError("expected a target name and a LUN number")
        tc = next((t for t in config.targets if t.name.lower() == target.lower()), None)
        if tc is None:
            raise ControlError(f"no target {target}")
        lc = next((c for c in tc.luns if c.id == lun), None)
        if lc is None:
            raise ControlError(f"target {tc.name} has no LUN {lun}")
        if lc.snapshot is not None:
            raise ControlError(f"LUN {lun} of {tc.name} shows snapshot {lc.snapshot}: a "
                               "snapshot has no snapshots of its own")
        return tc, lc

    def _live(self, tc: TargetConfig, lc: LunConfig) -> LogicalUnit:
        node = self.host.registry.target(tc.name)
        lu = node.luns.get(lc.id) if node is not None else None
        if lu is None or lu.closed or lu.backstore is None:
            raise ControlError(f"LUN {lc.id} of {tc.name} is not being served")
        return lu

    def catalog(self, lc: LunConfig) -> Catalog:
        return Catalog(assembly.snapshot_catalog_path(self.host.config, lc))

    @staticmethod
    def _name(raw: Any) -> str:
        if not isinstance(raw, str):
            raise ControlError("expected a snapshot name")
        try:
            check_snapshot_name(raw)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        return raw

    def _existing(self, request: dict[str, Any]
                  ) -> tuple[TargetConfig, LunConfig, Catalog, SnapshotRecord]:
        tc, lc = self._lun(request.get("target"), request.get("lun"))
        name = self._name(request.get("name"))
        catalog = self.catalog(lc)
        record = catalog.records.get(name)
        if record is None:
            raise ControlError(f"LUN {lc.id} of {tc.name} has no snapshot {name}")
        return tc, lc, catalog, record

    def shown_as(self, source: SnapshotSource) -> list[str]:
        """The LUNs of the configuration that show snapshot `source`, as TARGET/LUN."""
        return [f"{tc.name}/{lc.id}" for tc in self.host.config.targets for lc in tc.luns
                if lc.snapshot is not None and lc.snapshot.target.lower() == source.target.lower()
                and lc.snapshot.lun == source.lun and lc.snapshot.name == source.name]

    # ------------------------------------------------------------------ commands
    async def handle(self, command: str, request: dict[str, Any]) -> Any:
        handlers = {"snapshot_create": self.create, "snapshot_list": self.listing,
                    "snapshot_delete": self.delete, "snapshot_expose_nbd": self.expose_nbd,
                    "snapshot_unexpose_nbd": self.unexpose_nbd, "snapshot_clone": self.clone,
                    "snapshot_rollback": self.rollback}
        try:
            return await handlers[command](request)
        except SnapshotError as exc:
            raise ControlError(str(exc)) from None
        except ConfigError as exc:
            raise ControlError(str(exc)) from None

    async def create(self, request: dict[str, Any]) -> dict[str, Any]:
        """Snapshot `name` of every LUN of `members` ([{target, lun}...]) at one instant."""
        name = self._name(request.get("name"))
        raw = request.get("members")
        if not isinstance(raw, list) or not raw:
            raise ControlError("expected at least one LUN")
        members: list[tuple[TargetConfig, LunConfig, LogicalUnit, Catalog]] = []
        for item in raw:
            if not isinstance(item, dict):
                raise ControlError("expected {target, lun} for each LUN")
            tc, lc = self._lun(item.get("target"), item.get("lun"))
            if any(m[1] is lc for m in members):
                raise ControlError(f"LUN {lc.id} of {tc.name} is named twice")
            lu = self._live(tc, lc)
            if lu.readonly:
                raise ControlError(f"LUN {lc.id} of {tc.name} is read-only: it cannot change, "
                                   "so it needs no snapshot")
            if lu.sanitize.run is not None:
                raise ControlError(f"LUN {lc.id} of {tc.name}: a SANITIZE is in progress")
            catalog = self.catalog(lc)
            if name in catalog.records:
                raise ControlError(f"LUN {lc.id} of {tc.name} already has a snapshot {name}")
            members.append((tc, lc, lu, catalog))
        try:
            methods, held = await device_snapshots.take([(m[2], name) for m in members])
        except SnapshotError as exc:
            if isinstance(exc.__cause__, FileExistsError):
                raise ControlError(f"snapshot {name} exists on the medium but not in the "
                                   f"catalog: {exc}") from None
            raise
        created = datetime.now(UTC).isoformat(timespec="seconds")
        names = [f"{tc.name}/{lc.id}" for tc, lc, _, _ in members]
        out = []
        for index, (tc, lc, lu, catalog) in enumerate(members):
            record = SnapshotRecord(name, created, lu.nblocks * lu.block_size, methods[index],
                                    names, round(held * 1000, 3))
            catalog.records[name] = record
            catalog.save()
            out.append({"target": tc.name, "lun": lc.id, **asdict(record)})
        log.info("snapshot %s of %s taken (writes held %.1f ms)", name, ", ".join(names),
                 held * 1000, extra={"event": "snapshot", "snapshot": name, "members": names})
        return {"snapshots": out, "held_ms": round(held * 1000, 3)}

    async def listing(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Every snapshot of every LUN (or of `target`, `lun` when given)."""
        out = []
        want_target, want_lun = request.get("target"), request.get("lun")
        for tc in self.host.config.targets:
            if want_target is not None and tc.name.lower() != str(want_target).lower():
                continue
            for lc in tc.luns:
                if lc.snapshot is not None or (want_lun is not None and lc.id != want_lun):
                    continue
                for record in self.catalog(lc).records.values():
                    source = SnapshotSource(tc.name, lc.id, record.name)
                    out.append({"target": tc.name, "lun": lc.id, **asdict(record),
                                "export": str(source), "shown_as": self.shown_as(source)})
        return out

    async def delete(self, request: dict[str, Any]) -> dict[str, Any]:
        tc, lc, catalog, record = self._existing(request)
        source = SnapshotSource(tc.name, lc.id, record.name)
        shown = self.shown_as(source)
        if shown:
            raise ControlError(f"snapshot {source} is shown as LUN {', '.join(shown)}: "
                               f"`pytarget snapshot unexpose {source}` first")
        if record.nbd:
            raise ControlError(f"snapshot {source} is exposed over NBD: `pytarget snapshot "
                               f"unexpose --nbd {source}` first")
        lu = self._live(tc, lc)
        assert lu.backstore is not None
        try:
            await run_blocking(lu.backstore.delete_snapshot, record.name)
        except FileNotFoundError:
            pass  # gone from the medium already: the catalog follows
        except OSError as exc:
            raise ControlError(f"snapshot {source}: {exc.strerror or exc}") from None
        del catalog.records[record.name]
        catalog.save()
        log.info("snapshot %s deleted", source, extra={"event": "snapshot_delete",
                                                       "snapshot": str(source)})
        return {"deleted": str(source)}

    async def expose_nbd(self, request: dict[str, Any]) -> dict[str, Any]:
        tc, lc, catalog, record = self._existing(request)
        if self.host.config.nbd is None:
            raise ControlError("NBD is not configured (`nbd: HOST:PORT`, docs/nbd.md)")
        source = SnapshotSource(tc.name, lc.id, record.name)
        if not record.nbd:
            record.nbd = True
            catalog.save()
        if source not in self.units:
            self.units[source] = await run_blocking(self._open_unit, self.host.config, tc, lc,
                                                    record.name)
            self.host.snapshot_exports_changed()
        return {"export": str(source)}

    async def unexpose_nbd(self, request: dict[str, Any]) -> dict[str, Any]:
        tc, lc, catalog, record = self._existing(request)
        source = SnapshotSource(tc.name, lc.id, record.name)
        if record.nbd:
            record.nbd = False
            catalog.save()
        unit = self.units.pop(source, None)
        if unit is not None:
            self.host.snapshot_exports_changed()  # its connections close
            unit.close()
        return {"export": str(source)}

    async def clone(self, request: dict[str, Any]) -> dict[str, Any]:
        """A new writable medium (`file`, or `image` in `pool`) with the snapshot's contents;
        the command line then adds it to the configuration as a LUN."""
        tc, lc, _, record = self._existing(request)
        kind = assembly.backstore_kind(self.host.config, tc, lc)
        if lc.path is not None:
            path = request.get("file")
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ControlError("a file LUN's clone needs an absolute path")
            params: dict[str, Any] = {"path": path}
        else:
            image = request.get("image")
            if not isinstance(image, str) or not image:
                raise ControlError("an RBD LUN's clone needs an image name")
            params = {**lc.rbd, "image": image, "pool": request.get("pool") or lc.rbd["pool"]}
        if await run_blocking(kind.exists, params):
            where = params.get("path") or f"{params['pool']}/{params['image']}"
            raise ControlError(f"{where} exists: a clone is always a new medium")
        lu = self._live(tc, lc)
        assert lu.backstore is not None
        try:
            await run_blocking(lu.backstore.clone_snapshot, record.name, params)
        except OSError as exc:
            raise ControlError(f"clone of {tc.name}/{lc.id}@{record.name}: "
                               f"{exc.strerror or exc}") from None
        return {"params": params, "size": record.size}

    async def rollback(self, request: dict[str, Any]) -> dict[str, Any]:
        tc, lc, _, record = self._existing(request)
        lu = self._live(tc, lc)
        if lu.sanitize.run is not None:
            raise ControlError(f"LUN {lc.id} of {tc.name}: a SANITIZE is in progress")
        before = lu.nblocks * lu.block_size
        changed = await device_snapshots.rollback(lu, record.name)
        log.warning("LUN %d of %s rolled back to snapshot %s", lc.id, tc.name, record.name,
                    extra={"event": "snapshot_rollback", "target": tc.name, "lun": lc.id,
                           "snapshot": record.name})
        return {"rolled_back": f"{tc.name}/{lc.id}@{record.name}", "size_before": before,
                "size": lu.nblocks * lu.block_size, "capacity_changed": changed}

    # ------------------------------------------------------------------ NBD units
    @staticmethod
    def _open_unit(config: Config, tc: TargetConfig, lc: LunConfig, name: str) -> LogicalUnit:
        """A read-only unit on snapshot `name` of `lc` (blocking: it opens the medium)."""
        snap = assembly.snapshot_lun(lc, tc.name, name)
        node = assembly.build_node(tc, config)
        store = assembly.open_backing(config, tc, snap)
        return assembly.build_lu(config, tc, snap, node, store)

    def open_exposed(self) -> list[str]:
        """At start, or when a reload turns NBD on: open the snapshots the catalogs mark as
        exposed over NBD and not open yet (blocking); what could not be opened, one line
        each."""
        config = self.host.config
        problems: list[str] = []
        if config.nbd is None:
            return problems
        for tc in config.targets:
            for lc in tc.luns:
                if lc.snapshot is not None:
                    continue
                try:
                    records = self.catalog(lc).records.values()
                except ControlError as exc:
                    problems.append(str(exc))
                    continue
                for record in records:
                    if not record.nbd:
                        continue
                    source = SnapshotSource(tc.name, lc.id, record.name)
                    if source in self.units:
                        continue
                    try:
                        self.units[source] = self._open_unit(config, tc, lc, record.name)
                    except (OSError, ConfigError) as exc:
                        problems.append(f"snapshot {source}: not exposed over NBD: {exc}")
        return problems

    def prune(self, config: Config) -> list[str]:
        """After a reload: close the NBD units of snapshots whose LUN is gone."""
        present = {(tc.name.lower(), lc.id) for tc in config.targets for lc in tc.luns
                   if lc.snapshot is None}
        gone = [s for s in self.units if (s.target.lower(), s.lun) not in present]
        for source in gone:
            self.units.pop(source).close()
        return [f"snapshot {s} no longer exposed over NBD (its LUN was removed)" for s in gone]

    def close(self) -> None:
        for unit in self.units.values():
            unit.close()
        self.units.clear()

