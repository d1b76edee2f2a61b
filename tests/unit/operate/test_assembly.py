"""Assembly: the configuration turned into target nodes, logical units and the copy manager, and
the copy domain over the registry, without sockets."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from pytarget import assembly
from pytarget.config import Config, ConfigError, parse
from pytarget.core.task import Nexus
from pytarget.scsi.device import LogicalUnit
from pytarget.scsi.pr import PrStateError

TARGET = "iqn.2026-11.io.pytarget:disk"
OTHER = "iqn.2026-11.io.pytarget:other"
INIT_A = "iqn.2026-11.io.pytarget.test:a"
INIT_B = "iqn.2026-11.io.pytarget.test:b"

CONFIG = f"""\
portals: ["127.0.0.1:3260", "0.0.0.0:3261"]
targets:
  - name: {TARGET}
    alias: lab disk
    max_sessions: 2
    acl:
      - initiator: {INIT_A}
      - initiator: {INIT_B}
        luns: [1]
    luns:
      - id: 0
        path: d0.img
        size: 1MiB
      - id: 1
        path: d1.img
        size: 2MiB
        block_size: 4096
        serial: ABC123
  - name: {OTHER}
    luns:
      - id: 0
        path: o0.img
        size: 1MiB
"""


def config(tmp_path: Path, text: str = CONFIG) -> Config:
    return parse(text, str(tmp_path / "t.yaml"), tmp_path)


def nexus(initiator: str, target: str = TARGET) -> Nexus:
    return Nexus(initiator, bytes.fromhex("800000000001"), target, 1)


def test_registry_from_the_configuration(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert assembly.prepare_backing_files(cfg) == [tmp_path / "d0.img", tmp_path / "d1.img",
                                                   tmp_path / "o0.img"]
    registry = assembly.build_registry(cfg)
    try:
        node = registry.target(TARGET)
        assert node is not None and node.alias == "lab disk" and node.max_sessions == 2
        assert node.allows(INIT_A) and node.allows(INIT_B) and not node.allows("iqn.x:y")
        assert node.masked_luns(INIT_B) == frozenset({1})
        lu = node.luns[1]
        assert (lu.lun, lu.block_size, lu.nblocks) == (1, 4096, 512)
        serial, naa = assembly.lu_identity(TARGET, 1, "ABC123")
        assert serial == "ABC123" and lu.config.naa == naa
        assert lu.config.pr_state_path == str(tmp_path / "d1.img.pr.json")
        assert registry.portals == [("127.0.0.1", 3260), ("0.0.0.0", 3261)]
    finally:
        for n in registry.targets.values():
            for unit in n.luns.values():
                unit.close()


def test_lu_identity_is_stable_and_case_blind() -> None:
    serial, naa = assembly.lu_identity(TARGET, 0, None)
    assert (serial, naa) == assembly.lu_identity(TARGET.upper(), 0, None)
    assert naa[0] >> 4 == 0x3 and len(naa) == 8 and len(serial) == 16
    assert assembly.lu_identity(TARGET, 1, None)[1] != naa


def test_unknown_backstore_kind_names_the_key(tmp_path: Path) -> None:
    cfg = config(tmp_path, CONFIG.replace("serial: ABC123", "backstore: tape"))
    with pytest.raises(ConfigError) as info:
        assembly.check(cfg)
    assert info.value.key == "targets[0].luns[1].backstore"
    with pytest.raises(ConfigError):
        assembly.prepare_backing_files(cfg)
    assert not (tmp_path / "d1.img").exists()


def test_two_luns_cannot_share_a_reservations_file(tmp_path: Path) -> None:
    cfg = config(tmp_path, CONFIG.replace("path: o0.img", "path: sub/d0.img"))
    with pytest.raises(PrStateError) as info:
        assembly.check(cfg)
    assert info.value.errno == errno.EEXIST


def test_a_failing_lu_closes_the_ones_built(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    assembly.prepare_backing_files(cfg)
    (tmp_path / "o0.img").unlink()
    opened: list[LogicalUnit] = []
    real = assembly.build_lu

    def build_lu(*args: Any) -> LogicalUnit:
        lu = real(*args)
        opened.append(lu)
        return lu

    monkeypatch.setattr(assembly, "build_lu", build_lu)
    with pytest.raises(FileNotFoundError):
        assembly.build_registry(cfg)
    assert len(opened) == 2
    assert all(lu.backstore is not None and lu.backstore.fd < 0 for lu in opened)


def test_copy_manager_serves_every_lu(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assembly.prepare_backing_files(cfg)
    registry = assembly.build_registry(cfg)
    manager = assembly.build_copy_manager(registry, cfg)
    units = [lu for node in registry.targets.values() for lu in node.luns.values()]
    try:
        assert len(manager.services) == 3
        assert all(lu.third_party_copy and lu.copy_service is not None for lu in units)
        assert manager.is_local_target(OTHER.upper())
    finally:
        for lu in units:
            lu.close()


def test_copy_domain_follows_access_lists(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assembly.prepare_backing_files(cfg)
    registry = assembly.build_registry(cfg)
    local = {ipaddress.ip_address("192.0.2.7")}
    domain = assembly.RegistryDomain(registry, is_local=lambda a: a in local)
    try:
        node, other = registry.target(TARGET), registry.target(OTHER)
        assert node is not None and other is not None
        assert list(domain.accessible_units(nexus(INIT_B))) == [node.luns[1], other.luns[0]]
        assert len(list(domain.accessible_units(nexus(INIT_A)))) == 3
        assert domain.portal_unit(nexus(INIT_A), "127.0.0.1", 3260, 0) is node.luns[0]
        assert domain.portal_unit(nexus(INIT_A), "::ffff:127.0.0.1", 3260, 0) is node.luns[0]
        assert domain.portal_unit(nexus(INIT_A), "127.0.0.1", 3261, 0) is None
        assert domain.portal_unit(nexus(INIT_A), "192.0.2.7", 3261, 0) is node.luns[0]
        assert domain.portal_unit(nexus(INIT_A), "192.0.2.8", 3261, 0) is None
        assert domain.portal_unit(nexus(INIT_A), "not an address", 3260, 0) is None
        assert domain.portal_unit(nexus(INIT_B), "127.0.0.1", 3260, 0) is None
        assert domain.portal_unit(nexus(INIT_B), "127.0.0.1", 3260, 1) is node.luns[1]
        assert domain.portal_urls() == ["iscsi://127.0.0.1:3260"]
        assert domain.target_names() == [TARGET, OTHER]
    finally:
        for n in registry.targets.values():
            for lu in n.luns.values():
                lu.close()
