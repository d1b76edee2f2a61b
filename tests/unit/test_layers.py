"""Every import in pytarget/ against the layer table of docs/architecture.md: an import a group
may not make, a cycle in the module graph (imports inside functions and under TYPE_CHECKING
count), a module that belongs to no group and a group that matches no module all fail, so the
drawing cannot drift from the code."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "pytarget"
BEGIN, END = "<!-- layers:begin -->", "<!-- layers:end -->"


# ---------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Group:
    """A row of the table: its modules (`cli`, `__init__` for the package itself, `iscsi/*`
    for a package and everything in it) and the groups it may import besides itself."""

    name: str
    patterns: tuple[str, ...]
    may_import: frozenset[str]

    def matches(self, module: str) -> bool:
        return any(_matches(pattern, module) for pattern in self.patterns)


def _matches(pattern: str, module: str) -> bool:
    """`module` is dotted and relative to the package: "" is the package itself."""
    if pattern == "__init__":
        return module == ""
    if pattern.endswith("/*"):
        stem = pattern[:-2].replace("/", ".")
        return module == stem or module.startswith(stem + ".")
    return module == pattern.replace("/", ".")


def parse_layers(text: str) -> dict[str, Group]:
    """The Markdown table between the layer markers: `| group | modules | may import |`, module
    names in backquotes, the groups it may import separated by commas ("nothing" for none)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no layer table: expected one between {BEGIN} and {END}")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [line.strip() for line in block.splitlines() if line.strip().startswith("|")]
    groups: dict[str, Group] = {}
    for row in rows[2:]:  # the header and its rule
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) != 3:
            raise ValueError(f"a layer row has three cells: {row}")
        name, modules, allowed = cells
        name = name.strip("`* ")
        patterns = tuple(re.findall(r"`([^`]+)`", modules))
        if not patterns:
            raise ValueError(f"group {name} lists no module in backquotes: {row}")
        may = {word.strip("`* ") for word in allowed.split(",")} - {"nothing", ""}
        if name in groups:
            raise ValueError(f"group {name} appears twice")
        groups[name] = Group(name, patterns, frozenset(may))
    unknown = {(g.name, m) for g in groups.values() for m in g.may_import if m not in groups}
    if unknown:
        raise ValueError(f"may-import names no group: {sorted(unknown)}")
    if not groups:
        raise ValueError("the layer table has no rows")
    return groups


# ---------------------------------------------------------------------------------- the imports
@dataclass(frozen=True)
class Import:
    importer: str  # dotted, relative to the package ("" for the package itself)
    line: int
    imported: str


@dataclass
class Tree:
    """The modules of one package on disk and every import between them."""

    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str, path: Path) -> str:
    if path.name == "__init__.py":
        return module
    return module.rpartition(".")[0]


def _within(dotted: str, package: str) -> str | None:
    """`pytarget.scsi.device` -> `scsi.device`; None for anything outside the package."""
    if dotted == package:
        return ""
    if dotted.startswith(package + "."):
        return dotted[len(package) + 1:]
    return None


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base and name else base or name


def _nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, wherever it is: module level, in functions and classes, under
    `if TYPE_CHECKING:`, in try/except."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def scan(root: Path, package: str = PACKAGE) -> Tree:
    """Walk every .py file under `root` (the package directory) and resolve its imports of the
    package's own modules. `from X import name` is an import of X.name when that is a module,
    of X otherwise; parent packages a Python import runs implicitly are not counted."""
    found = Tree()
    for path in sorted(root.rglob("*.py")):
        found.modules[module_name(root, path)] = path
    for module, path in found.modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        here = _package_of(module, path)
        for node in _nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _within(alias.name, package)
                    if target is not None:
                        found.imports.append(Import(module, node.lineno, target))
                continue
            if node.level:
                base = here.split(".") if here else []
                up = node.level - 1
                if up > len(base):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond {package}")
                origin: str | None = _join(".".join(base[:len(base) - up]), node.module or "")
            else:
                origin = _within(node.module or "", package)
            if origin is None:
                continue
            for alias in node.names:
                sub = _join(origin, alias.name)
                target = sub if alias.name != "*" and sub in found.modules else origin
                found.imports.append(Import(module, node.lineno, target))
    return found


# ---------------------------------------------------------------------------------- the checks
def display(module: str, package: str = PACKAGE) -> str:
    return _join(package, module)


def group_of(module: str, groups: dict[str, Group]) -> list[str]:
    return [g.name for g in groups.values() if g.matches(module)]


def unassigned(tree: Tree, groups: dict[str, Group]) -> list[str]:
    """Modules in no group, or in more than one."""
    problems = []
    for module in sorted(tree.modules):
        owners = group_of(module, groups)
        if len(owners) != 1:
            where = "no group" if not owners else f"groups {', '.join(owners)}"
            problems.append(f"{display(module)}: in {where}")
    return problems


def empty_groups(tree: Tree, groups: dict[str, Group]) -> list[str]:
    problems = []
    for g in groups.values():
        for pattern in g.patterns:
            if not any(_matches(pattern, module) for module in tree.modules):
                problems.append(f"group {g.name}: `{pattern}` matches no module in {PACKAGE}/")
    return problems


def violations(tree: Tree, groups: dict[str, Group]) -> list[str]:
    """(module, line, imported module, why) for every import its group may not make."""
    problems: list[str] = []
    for imp in dict.fromkeys(tree.imports):
        if imp.imported not in tree.modules:
            problems.append(f"{display(imp.importer)}:{imp.line} imports {display(imp.imported)}"
                            f": no such module in {PACKAGE}/")
            continue
        mine, theirs = group_of(imp.importer, groups), group_of(imp.imported, groups)
        if len(mine) != 1 or len(theirs) != 1:
            continue  # reported by unassigned()
        source, target = groups[mine[0]], theirs[0]
        if target == source.name or target in source.may_import:
            continue
        allowed = ", ".join(sorted(source.may_import)) or "nothing"
        problems.append(f"{display(imp.importer)}:{imp.line} imports {display(imp.imported)}: "
                        f"{source.name} may not import {target} ({source.name} may import: "
                        f"{allowed})")
    return problems


def cycles(tree: Tree) -> list[str]:
    """Cycles of the module graph, each edge with the line of the import that makes it: for
    every strongly connected component, the shortest cycle through each of its modules that no
    cycle printed before passes through."""
    edges: dict[str, dict[str, int]] = {m: {} for m in tree.modules}
    for imp in tree.imports:
        if imp.imported in edges:
            edges[imp.importer].setdefault(imp.imported, imp.line)
    problems = []
    for component in _components(edges):
        inside = set(component)
        if len(component) == 1 and component[0] not in edges[component[0]]:
            continue
        covered: set[str] = set()
        for start in component:
            if start in covered:
                continue
            path = _cycle_through(start, edges, inside)
            covered.update(path)
            steps = [f"{display(a)}:{edges[a][b]}" for a, b in zip(path, path[1:], strict=False)]
            problems.append(" -> ".join([*steps, display(path[-1])]))
    return problems


def _components(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
    return found


def _cycle_through(start: str, edges: dict[str, dict[str, int]], inside: set[str]) -> list[str]:
    """The shortest path start -> ... -> start within one component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges[node]):
                if nxt not in inside:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def report(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n" + "\n".join(f"  {p}" for p in problems)


# ---------------------------------------------------------------------------------- pytarget
@pytest.fixture(scope="module")
def layers() -> dict[str, Group]:
    return parse_layers((REPO / "docs" / "architecture.md").read_text())


@pytest.fixture(scope="module")
def pytarget_tree() -> Tree:
    return scan(REPO / PACKAGE)


def test_imports_follow_the_layers(layers: dict[str, Group], pytarget_tree: Tree) -> None:
    problems = violations(pytarget_tree, layers)
    if problems:
        pytest.fail(report("imports the layer table of docs/architecture.md forbids", problems),
                    pytrace=False)


def test_no_import_cycle(pytarget_tree: Tree) -> None:
    problems = cycles(pytarget_tree)
    if problems:
        pytest.fail(report("import cycles (module:line of each import)", problems), pytrace=False)


def test_every_module_is_in_one_group(layers: dict[str, Group], pytarget_tree: Tree) -> None:
    problems = unassigned(pytarget_tree, layers)
    if problems:
        pytest.fail(report("modules the layer table does not place", problems), pytrace=False)


def test_every_group_names_modules(layers: dict[str, Group], pytarget_tree: Tree) -> None:
    problems = empty_groups(pytarget_tree, layers)
    if problems:
        pytest.fail(report("layer table entries without a module", problems), pytrace=False)


# ---------------------------------------------------------------------------------- the checker
TABLE = f"""
{BEGIN}
| group | modules | may import |
|---|---|---|
| entry | `__init__`, `cli` | top, low |
| top | `top`, `shop/*` | low |
| low | `low/*` | nothing |
{END}
"""


def fake(tmp_path: Path, files: dict[str, str]) -> Tree:
    root = tmp_path / PACKAGE
    for name, text in {"__init__.py": "", "cli.py": "", "top.py": "", "shop/__init__.py": "",
                       "low/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan(root)


def test_parse_layers() -> None:
    groups = parse_layers(TABLE)
    assert list(groups) == ["entry", "top", "low"]
    assert groups["entry"].patterns == ("__init__", "cli")
    assert groups["top"].may_import == {"low"} and groups["low"].may_import == set()
    assert groups["top"].matches("shop") and groups["top"].matches("shop.cart")
    assert not groups["top"].matches("shopping") and groups["entry"].matches("")
    with pytest.raises(ValueError, match="no layer table"):
        parse_layers("| a | `b` | nothing |")
    with pytest.raises(ValueError, match="names no group"):
        parse_layers(TABLE.replace("| top, low |", "| top, lower |"))


def test_clean_tree_passes(tmp_path: Path) -> None:
    tree = fake(tmp_path, {
        "cli.py": "from . import top\nfrom .low import disk\nimport pytarget.low.disk\n",
        "top.py": "from .low.disk import read\nfrom .shop import cart\n",
        "shop/cart.py": "from .. import low\nfrom ..low import disk\n",
        "low/disk.py": "import os\nfrom collections import deque\n",
    })
    groups = parse_layers(TABLE)
    assert violations(tree, groups) == []
    assert cycles(tree) == []
    assert unassigned(tree, groups) == []
    assert empty_groups(tree, groups) == []
    assert {(i.importer, i.imported) for i in tree.imports} == {
        ("cli", "top"), ("cli", "low.disk"), ("top", "low.disk"), ("top", "shop.cart"),
        ("shop.cart", "low"), ("shop.cart", "low.disk")}


def test_an_upward_import_is_reported_with_its_line(tmp_path: Path) -> None:
    tree = fake(tmp_path, {"low/disk.py": "import os\n\n\ndef f():\n    from ..shop import cart\n",
                           "shop/cart.py": ""})
    assert violations(tree, parse_layers(TABLE)) == [
        "pytarget.low.disk:5 imports pytarget.shop.cart: low may not import top "
        "(low may import: nothing)"]


def test_absolute_and_star_imports_are_resolved(tmp_path: Path) -> None:
    tree = fake(tmp_path, {"low/disk.py": "from pytarget.top import *\nimport pytarget.cli\n"})
    assert violations(tree, parse_layers(TABLE)) == [
        "pytarget.low.disk:1 imports pytarget.top: low may not import top "
        "(low may import: nothing)",
        "pytarget.low.disk:2 imports pytarget.cli: low may not import entry "
        "(low may import: nothing)"]


def test_a_type_checking_cycle_is_caught(tmp_path: Path) -> None:
    tree = fake(tmp_path, {
        "low/a.py": "from typing import TYPE_CHECKING\nfrom . import b\n",
        "low/b.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import A\n",
    })
    assert violations(tree, parse_layers(TABLE)) == []
    assert cycles(tree) == ["pytarget.low.a:2 -> pytarget.low.b:4 -> pytarget.low.a"]


def test_a_function_level_cycle_is_caught(tmp_path: Path) -> None:
    tree = fake(tmp_path, {
        "top.py": "from .shop import cart\n",
        "shop/cart.py": "import os\n\n\nclass Cart:\n    def pay(self):\n"
                        "        from .. import top\n        return top\n",
    })
    assert cycles(tree) == ["pytarget.shop.cart:6 -> pytarget.top:1 -> pytarget.shop.cart"]


def test_a_longer_cycle_and_a_self_import(tmp_path: Path) -> None:
    tree = fake(tmp_path, {
        "low/a.py": "from . import b\n", "low/b.py": "from . import c\n",
        "low/c.py": "from .a import thing\n", "low/d.py": "from pytarget.low import d\n",
    })
    assert cycles(tree) == [
        "pytarget.low.a:1 -> pytarget.low.b:1 -> pytarget.low.c:1 -> pytarget.low.a",
        "pytarget.low.d:1 -> pytarget.low.d"]


def test_a_package_importing_its_submodules_is_no_cycle(tmp_path: Path) -> None:
    tree = fake(tmp_path, {"low/__init__.py": "from .disk import read\n",
                           "low/disk.py": "from . import tape\n", "low/tape.py": ""})
    assert cycles(tree) == []


def test_unplaced_modules_and_empty_groups(tmp_path: Path) -> None:
    tree = fake(tmp_path, {"stray.py": "", "low/x.py": ""})
    table = TABLE.replace("`top`, `shop/*`", "`top`, `shop/*`, `gone`")
    groups = parse_layers(table)
    assert unassigned(tree, groups) == ["pytarget.stray: in no group"]
    assert empty_groups(tree, groups) == ["group top: `gone` matches no module in pytarget/"]
    overlapping = parse_layers(TABLE.replace("`low/*`", "`low/*`, `top`"))
    assert unassigned(tree, overlapping) == ["pytarget.stray: in no group",
                                             "pytarget.top: in groups top, low"]


def test_an_import_of_a_missing_module_is_reported(tmp_path: Path) -> None:
    tree = fake(tmp_path, {"top.py": "from .gone import x\n"})
    assert violations(tree, parse_layers(TABLE)) == [
        "pytarget.top:1 imports pytarget.gone: no such module in pytarget/"]
