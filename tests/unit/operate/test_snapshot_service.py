"""Snapshots from the operator's side without sockets: `snapshot:` LUNs in the configuration,
the identity a shown snapshot gets, the catalog kept beside a LUN, and the snapshot commands'
answers to bad input, against real logical units built by `assembly`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytarget import assembly
from pytarget.config import Config, ConfigError, SnapshotSource, parse, parse_snapshot_ref
from pytarget.control import ControlError
from pytarget.iscsi.target import TargetRegistry
from pytarget.snapshots import Catalog, SnapshotRecord, Snapshots

from ...conftest import run

TARGET = "iqn.2026-11.io.pytarget:snap"
OTHER = "iqn.2026-11.io.pytarget:other"


def text(*extra_luns: str, other: str = "") -> str:
    luns = "".join(f"      - {lun}\n" for lun in extra_luns)
    return f"""\
portals: ["127.0.0.1:0"]
targets:
  - name: {TARGET}
    luns:
      - id: 0
        path: d0.img
        size: 1MiB
        block_size: 4096
      - id: 1
        path: d1.img
        size: 1MiB
        readonly: true
{luns}  - name: {OTHER}
    luns: [{other}]
"""


def config(tmp_path: Path, body: str) -> Config:
    readonly = tmp_path / "d1.img"  # read-only LUNs are never created
    if not readonly.exists():
        readonly.write_bytes(bytes(1 << 20))
    return parse(body, str(tmp_path / "t.yaml"), tmp_path)


def test_a_snapshot_lun_takes_its_source_medium(tmp_path: Path) -> None:
    cfg = config(tmp_path, text('{id: 5, snapshot: "0@nightly"}',
                                other=f'{{id: 0, snapshot: "{TARGET}/0@weekly"}}'))
    lc = cfg.targets[0].luns[2]
    assert lc.snapshot == SnapshotSource(TARGET, 0, "nightly") and lc.readonly
    assert lc.path == tmp_path / "d0.img" and lc.block_size == 4096
    assert lc.location == f"{tmp_path / 'd0.img'}@nightly"
    assert cfg.targets[1].luns[0].snapshot == SnapshotSource(TARGET, 0, "weekly")
    assert assembly.pr_state_path(cfg, lc) == tmp_path / "d0.img@nightly.pr.json"
    assert assembly.sanitize_state_path(cfg, lc) == tmp_path / "d0.img@nightly.sanitize.json"
    assert assembly.snapshot_catalog_path(cfg, cfg.targets[0].luns[0]) \
        == tmp_path / "d0.img.snapshots.json"


@pytest.mark.parametrize(("lun", "key", "message"), [
    ('{id: 5, snapshot: "7@x"}', "luns[2].snapshot", "has no LUN 7"),
    ('{id: 5, snapshot: "iqn.2026-11.io.nowhere:x/0@x"}', "luns[2].snapshot", "no target"),
    ('{id: 5, snapshot: "0"}', "luns[2].snapshot", "is not [TARGET-IQN/]LUN@SNAPSHOT"),
    ('{id: 5, snapshot: "0@.hidden"}', "luns[2].snapshot", "not a snapshot name"),
    ('{id: 5, snapshot: "0@x", path: d5.img}', "luns[2]", "path"),
    ('{id: 5, snapshot: 0}', "luns[2].snapshot", "expected"),
])
def test_bad_snapshot_luns_name_the_key(tmp_path: Path, lun: str, key: str, message: str
                                        ) -> None:
    with pytest.raises(ConfigError) as err:
        config(tmp_path, text(lun))
    assert key in err.value.key and message in str(err.value)


def test_a_snapshot_of_a_snapshot_and_one_shown_twice_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is itself a snapshot"):
        config(tmp_path, text('{id: 5, snapshot: "0@a"}', '{id: 6, snapshot: "5@a"}'))
    with pytest.raises(ConfigError, match="already shown by targets.0..luns.2."):
        config(tmp_path, text('{id: 5, snapshot: "0@a"}', '{id: 6, snapshot: "0@a"}'))


def test_references_parse_with_and_without_a_target() -> None:
    assert parse_snapshot_ref("3@a.b", TARGET) == SnapshotSource(TARGET, 3, "a.b")
    assert parse_snapshot_ref(f"{OTHER}/2@x", TARGET) == SnapshotSource(OTHER, 2, "x")
    for bad in ("3", "@x", "x@y", "3@", "3@a/b", "99999@x", "3@" + "a" * 64):
        with pytest.raises(ValueError):
            parse_snapshot_ref(bad, TARGET)


def test_a_shown_snapshot_has_its_own_stable_identity() -> None:
    lun_serial, lun_naa = assembly.lu_identity(TARGET, 0, None)
    serial, naa = assembly.lu_identity(TARGET, 0, None, "nightly")
    assert (serial, naa) == assembly.lu_identity(TARGET.upper(), 0, None, "nightly")
    assert naa != lun_naa and serial != lun_serial
    assert naa != assembly.lu_identity(TARGET, 0, None, "weekly")[1]
    assert naa[0] >> 4 == 0x3  # NAA 3h, locally assigned (SPC-4 7.8.6.6.5)


def test_a_missing_snapshot_refuses_the_start_naming_the_key(tmp_path: Path) -> None:
    cfg = config(tmp_path, text('{id: 5, snapshot: "0@gone"}'))
    with pytest.raises(ConfigError, match=r"luns\[2\]\.snapshot: .*0@gone does not exist"):
        assembly.prepare_backing_files(cfg)


def test_the_catalog_round_trips_and_refuses_damage(tmp_path: Path) -> None:
    path = tmp_path / "d0.img.snapshots.json"
    catalog = Catalog(path)
    assert catalog.records == {}
    catalog.records["a"] = SnapshotRecord("a", "2026-12-03T06:00:00+00:00", 4096, "copy",
                                          [f"{TARGET}/0"], 1.5, nbd=True)
    catalog.save()
    assert Catalog(path).records == catalog.records
    assert not list(tmp_path.glob(".d0.img.snapshots.json.*"))  # no temporary file left
    del catalog.records["a"]
    catalog.save()
    assert not path.exists()
    path.write_text("{not json")
    with pytest.raises(ControlError, match="unreadable snapshot catalog"):
        Catalog(path)
    path.write_text(json.dumps({"version": 1, "snapshots": [{"name": "a"}]}))
    with pytest.raises(ControlError, match="damaged snapshot catalog"):
        Catalog(path)


class Host:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        assembly.prepare_backing_files(cfg)
        self.registry: TargetRegistry = assembly.build_registry(cfg)
        self.changed = 0

    def snapshot_exports_changed(self) -> None:
        self.changed += 1

    def close(self) -> None:
        for node in self.registry.targets.values():
            for lu in node.luns.values():
                lu.close()


def test_commands_refuse_bad_input_with_the_reason(tmp_path: Path) -> None:
    host = Host(config(tmp_path, text()))
    service = Snapshots(host)

    def refused(command: str, **request: Any) -> str:
        with pytest.raises(ControlError) as err:
            run(service.handle(command, request))
        return str(err.value)

    try:
        lun0 = {"target": TARGET, "lun": 0}
        assert "no target" in refused("snapshot_create", name="a",
                                      members=[{"target": "iqn.2026-11.x:y", "lun": 0}])
        assert "has no LUN 9" in refused("snapshot_create", name="a",
                                         members=[{"target": TARGET, "lun": 9}])
        assert "not a snapshot name" in refused("snapshot_create", name="a/b", members=[lun0])
        assert "at least one LUN" in refused("snapshot_create", name="a", members=[])
        assert "named twice" in refused("snapshot_create", name="a", members=[lun0, lun0])
        assert "read-only" in refused("snapshot_create", name="a",
                                      members=[{"target": TARGET, "lun": 1}])
        answer = run(service.handle("snapshot_create", {"name": "a", "members": [lun0]}))
        assert answer["snapshots"][0]["name"] == "a"
        assert "already has a snapshot a" in refused("snapshot_create", name="a",
                                                     members=[lun0])
        assert "no snapshot b" in refused("snapshot_delete", **lun0, name="b")
        assert "NBD is not configured" in refused("snapshot_expose_nbd", **lun0, name="a")
        assert "absolute path" in refused("snapshot_clone", **lun0, name="a", file="rel.img")
        assert "exists" in refused("snapshot_clone", **lun0, name="a",
                                   file=str(tmp_path / "d1.img"))
        rows = run(service.handle("snapshot_list", {}))
        assert [(r["lun"], r["name"], r["export"]) for r in rows] == [(0, "a", f"{TARGET}/0@a")]
        assert run(service.handle("snapshot_delete", {**lun0, "name": "a"})) \
            == {"deleted": f"{TARGET}/0@a"}
        assert not (tmp_path / "d0.img.snapshots.json").exists()
    finally:
        host.close()


def test_an_nbd_exposed_snapshot_is_not_deleted(tmp_path: Path) -> None:
    host = Host(config(tmp_path, text() + 'nbd: "127.0.0.1:0"\n'))
    service = Snapshots(host)
    lun0 = {"target": TARGET, "lun": 0}
    try:
        run(service.handle("snapshot_create", {"name": "a", "members": [lun0]}))
        run(service.handle("snapshot_expose_nbd", {**lun0, "name": "a"}))
        unit = service.units[SnapshotSource(TARGET, 0, "a")]
        assert unit.readonly and host.changed == 1
        with pytest.raises(ControlError, match="exposed over NBD.*unexpose --nbd"):
            run(service.handle("snapshot_delete", {**lun0, "name": "a"}))
        # a second service on the same files (a restart) opens it again
        again = Snapshots(host)
        assert again.open_exposed() == []
        assert list(again.units) == [SnapshotSource(TARGET, 0, "a")]
        again.close()
        run(service.handle("snapshot_unexpose_nbd", {**lun0, "name": "a"}))
        assert unit.closed and not service.units
        run(service.handle("snapshot_delete", {**lun0, "name": "a"}))
    finally:
        service.close()
        host.close()
