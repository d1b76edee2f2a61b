"""A reload planned and applied against an in-memory server: what it asks the server to change,
and that a configuration it refuses changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pytarget import assembly
from pytarget.config import Config, parse
from pytarget.iscsi.bounds import Bounds
from pytarget.iscsi.node import TargetNode
from pytarget.metrics import MetricsServer
from pytarget.reconfigure import Reload, ReloadRefused
from pytarget.scsi.device import LogicalUnit
from pytarget.scsi.sanitize import SanitizeRun
from pytarget.server import Server

TARGET = "iqn.2026-11.io.pytarget:disk"
OTHER = "iqn.2026-11.io.pytarget:other"

BASE = f"""\
portals: ["127.0.0.1:3260"]
targets:
  - name: {TARGET}
    luns:
      - id: 0
        path: d0.img
        size: 1MiB
  - name: {OTHER}
    luns:
      - id: 0
        path: o0.img
        size: 1MiB
"""


class FakePortal:
    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeServer:
    """The `Reconfigurable` side of a server, recording the changes asked of it."""

    def __init__(self, config: Config) -> None:
        assembly.prepare_backing_files(config)
        self.config = config
        self.registry = assembly.build_registry(config)
        self.copy_manager = assembly.build_copy_manager(self.registry, config)
        self.fixed_portals = False
        self.portals: list[tuple[tuple[str, int], Any]] = [
            (p, FakePortal(*p)) for p in config.portals]
        self.limits: Bounds | None = None
        self.retired: list[LogicalUnit] = []
        self.removed_targets: list[str] = []

    def use_config(self, config: Config) -> None:
        self.config = config

    def apply_limits(self, limits: Bounds) -> None:
        self.limits = limits

    def set_poll_window(self, window: float) -> bool:
        return False

    def open_portal(self, host: str, port: int) -> FakePortal:
        return FakePortal(host, port)

    def change_portals(self, removed: list[tuple[str, int]],
                       added: list[tuple[tuple[str, int], Any]]) -> list[str]:
        self.portals = [e for e in self.portals if e[0] not in removed] + added
        return [f"portals now {[p for p, _ in self.portals]}"]

    async def start_metrics(self, address: tuple[str, int]) -> MetricsServer:
        raise AssertionError("no metrics in these configurations")

    async def replace_metrics(self, metrics: MetricsServer | None) -> None:
        raise AssertionError("no metrics in these configurations")

    def update_management_addresses(self, config: Config) -> bool:
        return False

    def serve_lu(self, node: TargetNode, lu: LogicalUnit) -> LogicalUnit | None:
        previous = node.luns.get(lu.lun)
        node.luns[lu.lun] = lu
        self.copy_manager.attach(lu)
        return previous

    def remove_lu(self, node: TargetNode, lun: int) -> None:
        self.retire(node.luns.pop(lun))

    def add_target(self, node: TargetNode) -> None:
        self.registry.add_target(node)

    async def remove_target(self, node: TargetNode, reason: str) -> int:
        self.registry.targets.pop(node.name.lower())
        self.removed_targets.append(node.name)
        for lu in node.luns.values():
            self.retire(lu)
        return 0

    def retire(self, lu: LogicalUnit) -> None:
        self.retired.append(lu)
        lu.close()

    def close(self) -> None:
        for node in self.registry.targets.values():
            for lu in node.luns.values():
                lu.close()


@pytest.fixture
def server(tmp_path: Path) -> Any:
    server = FakeServer(parse(BASE, str(tmp_path / "t.yaml"), tmp_path))
    yield server
    server.close()


def reload(server: FakeServer, text: str) -> list[str]:
    new = parse(text, server.config.file, server.config.base)
    return asyncio.run(Reload(server, new).apply())


def test_luns_added_grown_and_replaced(server: FakeServer, tmp_path: Path) -> None:
    node, other = server.registry.target(TARGET), server.registry.target(OTHER)
    assert node is not None and other is not None
    before, replaced = node.luns[0], other.luns[0]
    text = BASE.replace("path: d0.img\n        size: 1MiB",
                        "path: d0.img\n        size: 2MiB\n      - id: 1\n        path: d1.img\n"
                        "        size: 1MiB")
    text = text.replace("path: o0.img", "path: o0.img\n        serial: NEW")
    changes = reload(server, text)
    assert node.luns[0] is before and before.nblocks == 4096
    assert (tmp_path / "d0.img").stat().st_size == 2 << 20
    assert node.luns[1].copy_service is not None and (tmp_path / "d1.img").exists()
    assert other.luns[0].config.serial == "NEW" and server.retired == [replaced]
    assert any("LUN 1 added" in c for c in changes)
    assert any("replaced (serial changed)" in c for c in changes)
    assert server.config.targets[0].luns[0].size == 2 << 20


def test_a_refused_reload_changes_nothing(server: FakeServer, tmp_path: Path) -> None:
    text = BASE.replace("size: 1MiB", "size: 512KiB", 1) + (
        "      - id: 1\n        path: o1.img\n        size: 1MiB\n")
    with pytest.raises(ReloadRefused, match="LUNs never shrink"):
        reload(server, text)
    assert not (tmp_path / "o1.img").exists()
    assert server.config.targets[0].luns[0].size == 1 << 20
    assert not server.retired


def test_settings_portals_and_targets(server: FakeServer) -> None:
    text = BASE.replace('["127.0.0.1:3260"]', '["127.0.0.1:3262"]')
    text = text[:text.index(f"  - name: {OTHER}")] + "limits:\n  max_connections: 7\n"
    changes = reload(server, text)
    assert server.limits is not None and server.limits.max_connections == 7
    assert [p for p, _ in server.portals] == [("127.0.0.1", 3262)]
    assert server.removed_targets == [OTHER] and server.registry.target(OTHER) is None
    assert len(server.retired) == 1
    assert "limits changed (timeouts apply to new connections)" in changes


def test_an_unknown_backstore_is_refused(server: FakeServer) -> None:
    with pytest.raises(ReloadRefused, match=r"luns\[0\]\.backstore"):
        reload(server, BASE.replace("path: d0.img", "path: d0.img\n        backstore: tape"))


def test_server_limits_keep_the_options_it_was_started_with(tmp_path: Path) -> None:
    config = parse(BASE, str(tmp_path / "t.yaml"), tmp_path)
    server = Server(config, [("127.0.0.1", 0)], nop_interval=5.0)
    try:
        server.apply_limits(Bounds(data_out_memory=3 << 20, session_data_out_memory=1 << 20,
                                   nop_interval=60.0, nop_timeout=7.0))
        assert (server.budget.total, server.budget.per_holder) == (3 << 20, 1 << 20)
        assert server.connection_options["nop_interval"] == 5.0
        assert server.connection_options["nop_timeout"] == 7.0
        assert server.connection_options["budget"] is server.budget
        assert not server.set_poll_window(0.0001)
    finally:
        for node in server.registry.targets.values():
            for unit in node.luns.values():
                unit.close()


def test_a_lun_being_sanitized_is_not_replaced_removed_or_grown(server: FakeServer) -> None:
    lu = server.registry.target(TARGET).luns[0]  # type: ignore[union-attr]

    async def sanitizing() -> None:
        lu.sanitize.run = SanitizeRun(lu.nblocks * lu.block_size)
    asyncio.run(sanitizing())
    removed = BASE.replace("      - id: 0\n        path: d0.img\n        size: 1MiB\n", "", 1)
    removed = removed.replace("    luns:\n  - name", "    luns: []\n  - name", 1)
    for text in (BASE.replace("path: d0.img", "path: d0.img\n        serial: NEW", 1),
                 BASE.replace("size: 1MiB", "size: 2MiB", 1), removed):
        with pytest.raises(ReloadRefused, match="a SANITIZE is in progress"):
            reload(server, text)
    node = server.registry.target(TARGET)
    assert not server.retired and node is not None and node.luns[0] is lu
    reload(server, BASE.replace(f"  - name: {OTHER}", f"  - name: {OTHER}\n    alias: o", 1))


def test_checkpoints_follow_a_grown_and_a_replaced_lun(server: FakeServer, tmp_path: Path) -> None:
    node = server.registry.target(TARGET)
    assert node is not None
    lu = node.luns[0]
    lu.create_checkpoint("c1")
    assert lu.checkpoints.granules == 16
    reload(server, BASE.replace("size: 1MiB", "size: 2MiB", 1))
    assert lu.checkpoints.granules == 32
    assert set(lu.checkpoints.changed("c1").nonzero()[0]) == set(range(16, 32))  # new space
    # a replaced LUN (same file) keeps its checkpoints; the old unit's close saves nothing over
    text = BASE.replace("size: 1MiB", "size: 2MiB\n        serial: NEW", 1)
    reload(server, text)
    assert node.luns[0] is not lu and node.luns[0].checkpoints is lu.checkpoints
    assert [c.name for c in node.luns[0].checkpoints.checkpoints] == ["c1"]
    assert (tmp_path / "d0.img.cbt").exists()
