"""Checkpoint operations on the running target's LUNs, as the control socket serves them:
`checkpoint_create`, `checkpoint_list` and `checkpoint_delete` (`pytarget checkpoint ...`,
docs/cbt.md)."""

from __future__ import annotations

from typing import Any

from .control import ControlError
from .iscsi.target import TargetRegistry
from .scsi.cbt import CheckpointError
from .scsi.device import LogicalUnit

COMMANDS = ("checkpoint_create", "checkpoint_list", "checkpoint_delete")


def find_unit(registry: TargetRegistry, target: str | None, lun: Any
              ) -> tuple[str, LogicalUnit]:
    """The name of `target` (or of the only target) and its logical unit at `lun`;
    ControlError naming what is missing."""
    if isinstance(lun, bool) or not isinstance(lun, int):
        raise ControlError('expected "lun": N')
    if target is None:
        nodes = list(registry.targets.values())
        if len(nodes) != 1:
            raise ControlError(f"{len(nodes)} targets: name one (--target IQN)")
        node = nodes[0]
    else:
        found = registry.target(target)
        if found is None:
            raise ControlError(f"no target {target}")
        node = found
    lu = node.luns.get(lun)
    if lu is None:
        raise ControlError(f"target {node.name} has no LUN {lun}")
    return node.name, lu


def _name(request: dict[str, Any]) -> str:
    name = request.get("name")
    if not isinstance(name, str):
        raise ControlError('expected "name": CHECKPOINT')
    return name


async def control(registry: TargetRegistry, command: str, request: dict[str, Any]) -> Any:
    """One checkpoint request (see COMMANDS); its result, or ControlError."""
    target = request.get("target")
    if target is not None and not isinstance(target, str):
        raise ControlError('expected "target": IQN')
    try:
        if command == "checkpoint_list":
            if request.get("lun") is None:
                return [{"target": node.name, "lun": lun, "checkpoints": lu.checkpoints.describe()}
                        for node in registry.targets.values()
                        if target is None or node.name.lower() == target.lower()
                        for lun, lu in sorted(node.luns.items())]
            name, lu = find_unit(registry, target, request["lun"])
            return [{"target": name, "lun": lu.lun,
                     "checkpoints": lu.checkpoints.describe()}]
        _, lu = find_unit(registry, target, request.get("lun"))
        if command == "checkpoint_create":
            lu.create_checkpoint(_name(request))
            return lu.checkpoints.describe()
        if command == "checkpoint_delete":
            lu.delete_checkpoint(_name(request))
            return lu.checkpoints.describe()
    except CheckpointError as exc:
        raise ControlError(str(exc)) from None
    except OSError as exc:
        raise ControlError(f"checkpoint state not saved: {exc.strerror or exc}") from None
    raise ControlError(f"unknown command {command!r}")
