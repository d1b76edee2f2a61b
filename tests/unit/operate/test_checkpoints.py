"""`pytarget checkpoint create|list|delete` over the control socket to a registry's LUNs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytarget import checkpoints, cli
from pytarget.control import ControlError, ControlServer
from pytarget.iscsi.node import TargetNode
from pytarget.iscsi.target import TargetRegistry
from pytarget.scsi.device import LogicalUnit

from ..scsi.harness import make_lu

IQN = "iqn.2026-11.io.pytarget:cbt"


def registry_with_lun(tmp_path: Path) -> tuple[TargetRegistry, LogicalUnit]:
    registry = TargetRegistry()
    node: TargetNode[LogicalUnit] = TargetNode(IQN)
    registry.add_target(node)
    lu = make_lu(tmp_path, directory=node)  # type: ignore[arg-type]
    node.luns[0] = lu
    return registry, lu


def with_socket(tmp_path: Path, registry: TargetRegistry, check: Callable[[Path], None]) -> None:
    path = tmp_path / "t.sock"

    async def handle(command: str, req: dict[str, Any], uid: int | None) -> Any:
        return await checkpoints.control(registry, command, req)

    async def go() -> None:
        server = ControlServer(path, handle)
        await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, check, path)
        finally:
            await server.close()

    asyncio.run(go())


def test_create_list_delete_from_the_command_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    registry, lu = registry_with_lun(tmp_path)

    def check(sock: Path) -> None:
        assert cli.main(["checkpoint", "create", "0", "monday", "--socket", str(sock)]) == 0
        assert "checkpoint monday created on LUN 0" in capsys.readouterr().out
        lu.checkpoints.mark(0, 4096)
        assert cli.main(["checkpoint", "list", "--socket", str(sock)]) == 0
        out = capsys.readouterr().out
        assert f"{IQN} LUN 0:" in out and "monday" in out and "exact" in out
        assert "64KiB changed" in out
        assert cli.main(["checkpoint", "list", "0", "--json", "--socket", str(sock)]) == 0
        (entry,) = json.loads(capsys.readouterr().out)
        assert entry["lun"] == 0 and entry["checkpoints"][0]["name"] == "monday"
        assert cli.main(["checkpoint", "create", "0", "monday", "--socket", str(sock)]) == 1
        assert "exists" in capsys.readouterr().err
        assert cli.main(["checkpoint", "create", "3", "x", "--socket", str(sock)]) == 1
        assert "has no LUN 3" in capsys.readouterr().err
        assert cli.main(["checkpoint", "delete", "0", "monday", "--socket", str(sock)]) == 0
        assert cli.main(["checkpoint", "list", "0", "--socket", str(sock)]) == 0
        assert "no checkpoints" in capsys.readouterr().out

    with_socket(tmp_path, registry, check)
    assert lu.checkpoints.checkpoints == []


def test_bad_requests_are_refused_by_name(tmp_path: Path) -> None:
    registry, _ = registry_with_lun(tmp_path)
    registry.add_target(TargetNode("iqn.2026-11.io.pytarget:other"))

    async def go() -> None:
        for req, error in (({"lun": 0, "name": "x"}, "2 targets"),
                           ({"lun": "0", "target": IQN, "name": "x"}, '"lun": N'),
                           ({"lun": 0, "target": IQN}, '"name"'),
                           ({"lun": 0, "target": "iqn.2026-11.x:none", "name": "x"},
                            "no target"),
                           ({"lun": 0, "target": IQN, "name": "a b"}, "invalid checkpoint")):
            with pytest.raises(ControlError, match=error):
                await checkpoints.control(registry, "checkpoint_create", req)

    asyncio.run(go())
