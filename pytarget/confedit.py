"""Edits of a configuration file's text for `pytarget lun ...` and `pytarget target ...`: add or
remove a LUN or a target, change a LUN's size.

The file is changed where the edit lands and nowhere else, so comments, key order and layout
survive: YAML's node positions (`yaml.compose`) locate the block to insert after, remove or
rewrite. Every edit is checked by loading both texts: the result must equal the original
document with exactly the intended change. When that check fails (an unusual layout, flow
style), the whole document is written out again by `yaml.safe_dump` instead, which keeps the
data but not the comments, and `EditResult.rewritten` says so.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


class EditError(Exception):
    """The edit does not apply to this document (no such target or LUN...)."""


@dataclass
class EditResult:
    text: str
    rewritten: bool  # True: comments and layout were lost (see the module docstring)


# ---------------------------------------------------------------- node helpers
def _value(mapping: Node, key: str) -> tuple[ScalarNode, Node] | None:
    if not isinstance(mapping, MappingNode):
        return None
    for k, v in mapping.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return k, v
    return None


def _last_line(node: Node) -> int:
    """The last line (0-based) holding a character of `node`'s content."""
    if isinstance(node, ScalarNode):
        end = node.end_mark
        return end.line if end.column > 0 or end.line == node.start_mark.line else end.line - 1
    if isinstance(node, MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, SequenceNode):
        children = list(node.value)
    else:
        children = []
    if not children or (isinstance(node, (MappingNode, SequenceNode)) and node.flow_style):
        end = node.end_mark
        return end.line if end.column > 0 else end.line - 1
    return max(_last_line(c) for c in children)


def _targets(root: Node) -> SequenceNode:
    found = _value(root, "targets")
    if found is None or not isinstance(found[1], SequenceNode):
        raise EditError("the configuration has no list of targets")
    return found[1]


def _target(root: Node, name: str) -> MappingNode:
    for item in _targets(root).value:
        found = _value(item, "name")
        if found is not None and str(found[1].value).lower() == name.lower():
            assert isinstance(item, MappingNode)
            return item
    raise EditError(f"no target {name}")


def _lun(target: MappingNode, lun: int) -> MappingNode:
    found = _value(target, "luns")
    if found is not None and isinstance(found[1], SequenceNode):
        for item in found[1].value:
            got = _value(item, "id")
            if got is not None and str(got[1].value) == str(lun):
                assert isinstance(item, MappingNode)
                return item
    raise EditError(f"no LUN {lun}")


def _block(data: Any, indent: int) -> list[str]:
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
    return [" " * indent + line for line in text.splitlines()]


# ---------------------------------------------------------------- line edits
def _append_item(lines: list[str], seq: SequenceNode, key: ScalarNode, item: Any) -> None:
    """Add `item` at the end of the sequence (block style), or turn a flow-style sequence
    (`luns: []`) into a block sequence holding the old items and `item`."""
    if seq.flow_style or not seq.value:
        items = yaml.safe_load(seq.start_mark.buffer[seq.start_mark.index:seq.end_mark.index]
                               if seq.start_mark.buffer else "[]") or []
        indent = key.start_mark.column + 2
        first, last = key.start_mark.line, _last_line(seq)
        head = lines[first][:seq.start_mark.column].rstrip() if first == seq.start_mark.line \
            else lines[first].rstrip()
        tail = lines[last][seq.end_mark.column:] if last == seq.end_mark.line else ""
        if tail.strip() and not tail.strip().startswith("#"):
            raise EditError("unexpected text after the list")
        lines[first:last + 1] = [head] + _block([*items, item], indent)
        return
    dash = seq.start_mark.column
    at = _last_line(seq) + 1
    lines[at:at] = _block([item], dash)


def _remove_item(lines: list[str], seq: SequenceNode, key: ScalarNode, item: Node) -> None:
    if len(seq.value) == 1:
        first, last = key.start_mark.line, _last_line(seq)
        lines[first:last + 1] = [" " * key.start_mark.column + f"{key.value}: []"]
        return
    dash = seq.start_mark.column
    first = item.start_mark.line
    while first > 0 and not lines[first][dash:].startswith("-"):
        first -= 1
    last = _last_line(item)
    index = seq.value.index(item)
    if index + 1 < len(seq.value):  # keep comments that belong to the next item
        last = min(last, seq.value[index + 1].start_mark.line - 1)
    del lines[first:last + 1]


def _set_scalar(lines: list[str], mapping: MappingNode, key: str, value: str) -> None:
    found = _value(mapping, key)
    rendered = yaml.safe_dump(value, default_style=None).splitlines()[0]
    if rendered == "...":
        rendered = value
    if found is None:
        column = mapping.value[0][0].start_mark.column
        at = _last_line(mapping) + 1
        lines[at:at] = [" " * column + f"{key}: {rendered}"]
        return
    node = found[1]
    if node.start_mark.line != node.end_mark.line:
        raise EditError(f"{key} spans several lines")
    line = lines[node.start_mark.line]
    lines[node.start_mark.line] = line[:node.start_mark.column] + rendered \
        + line[node.end_mark.column:]


# ---------------------------------------------------------------- edits
def _edit(text: str, change_doc: Callable[[dict[str, Any]], None],
          change_lines: Callable[[list[str], Node], None]) -> EditResult:
    """Apply `change_lines` to the text and check it against `change_doc` on the data."""
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict):
        raise EditError("the configuration is not a mapping")
    expected = copy.deepcopy(doc)
    change_doc(expected)
    root = yaml.compose(text)
    lines = text.splitlines()
    try:
        if root is None:
            raise EditError("empty document")
        change_lines(lines, root)
        edited = "\n".join(lines) + "\n"
        if yaml.safe_load(edited) == expected:
            return EditResult(edited, False)
    except (EditError, yaml.YAMLError, ValueError, IndexError):
        pass
    return EditResult(yaml.safe_dump(expected, sort_keys=False, default_flow_style=False,
                                     width=100), True)


def _doc_target(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for t in doc.get("targets") or []:
        if isinstance(t, dict) and str(t.get("name", "")).lower() == name.lower():
            return t
    raise EditError(f"no target {name}")


def _doc_luns(doc: dict[str, Any], target: str) -> list[Any]:
    t = _doc_target(doc, target)
    luns = t.get("luns")
    if luns is None:
        luns = t["luns"] = []
    if not isinstance(luns, list):
        raise EditError(f"target {target}: luns is not a list")
    return luns


def _doc_lun_index(doc: dict[str, Any], target: str, lun: int) -> int:
    for i, item in enumerate(_doc_luns(doc, target)):
        if isinstance(item, dict) and item.get("id") == lun:
            return i
    raise EditError(f"target {target} has no LUN {lun}")


def add_lun(text: str, target: str, lun: dict[str, Any]) -> EditResult:
    def on_doc(doc: dict[str, Any]) -> None:
        _doc_luns(doc, target).append(lun)

    def on_lines(lines: list[str], root: Node) -> None:
        node = _target(root, target)
        found = _value(node, "luns")
        if found is None or not isinstance(found[1], SequenceNode):
            raise EditError("no luns list")
        _append_item(lines, found[1], found[0], lun)

    return _edit(text, on_doc, on_lines)


def remove_lun(text: str, target: str, lun: int) -> EditResult:
    def on_doc(doc: dict[str, Any]) -> None:
        del _doc_luns(doc, target)[_doc_lun_index(doc, target, lun)]

    def on_lines(lines: list[str], root: Node) -> None:
        node = _target(root, target)
        found = _value(node, "luns")
        assert found is not None and isinstance(found[1], SequenceNode)
        _remove_item(lines, found[1], found[0], _lun(node, lun))

    return _edit(text, on_doc, on_lines)


def set_lun_size(text: str, target: str, lun: int, size: str) -> EditResult:
    def on_doc(doc: dict[str, Any]) -> None:
        _doc_luns(doc, target)[_doc_lun_index(doc, target, lun)]["size"] = size

    def on_lines(lines: list[str], root: Node) -> None:
        _set_scalar(lines, _lun(_target(root, target), lun), "size", size)

    return _edit(text, on_doc, on_lines)


def add_target(text: str, target: dict[str, Any]) -> EditResult:
    def on_doc(doc: dict[str, Any]) -> None:
        targets = doc.get("targets")
        if not isinstance(targets, list):
            targets = doc["targets"] = []
        targets.append(target)

    def on_lines(lines: list[str], root: Node) -> None:
        found = _value(root, "targets")
        if found is None or not isinstance(found[1], SequenceNode):
            raise EditError("no targets list")
        _append_item(lines, found[1], found[0], target)

    return _edit(text, on_doc, on_lines)


def remove_target(text: str, name: str) -> EditResult:
    def on_doc(doc: dict[str, Any]) -> None:
        doc["targets"].remove(_doc_target(doc, name))

    def on_lines(lines: list[str], root: Node) -> None:
        found = _value(root, "targets")
        assert found is not None and isinstance(found[1], SequenceNode)
        _remove_item(lines, found[1], found[0], _target(root, name))

    return _edit(text, on_doc, on_lines)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` (same permissions) so that a crash leaves the old or the new
    file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
