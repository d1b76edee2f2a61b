"""Configuration file edits: the intended change, nothing else, comments kept."""

from __future__ import annotations

import difflib

import yaml

from pytarget import confedit

CONFIG = """\
# lab target
portals: ["0.0.0.0:3260"]   # every address
targets:
  - name: iqn.2026-11.io.pytarget:a    # first
    alias: lab
    luns:
      - id: 0
        path: a0.img   # system disk
        size: 1GiB
      # the data disk
      - id: 1
        path: a1.img
        size: 2GiB
  - name: iqn.2026-11.io.pytarget:b
    luns: []
"""
A = "iqn.2026-11.io.pytarget:a"
B = "iqn.2026-11.io.pytarget:b"


def diff(old: str, new: str) -> tuple[list[str], list[str]]:
    """The lines a line diff removes and adds, in order."""
    lines = list(difflib.ndiff(old.splitlines(), new.splitlines()))
    return [x[2:] for x in lines if x[0] == "-"], [x[2:] for x in lines if x[0] == "+"]


def test_add_lun_appends_after_the_last_one() -> None:
    result = confedit.add_lun(CONFIG, A, {"id": 2, "path": "a2.img", "size": "10GiB"})
    assert not result.rewritten
    removed, added = diff(CONFIG, result.text)
    assert removed == []
    assert added == ["      - id: 2", "        path: a2.img", "        size: 10GiB"]
    assert result.text.index("size: 2GiB") < result.text.index("id: 2") \
        < result.text.index("name: iqn.2026-11.io.pytarget:b")


def test_add_lun_to_an_empty_flow_list() -> None:
    result = confedit.add_lun(CONFIG, B, {"id": 0, "path": "b0.img", "size": "1GiB"})
    assert not result.rewritten
    assert result.text.endswith(
        "    luns:\n      - id: 0\n        path: b0.img\n        size: 1GiB\n")
    assert "# the data disk" in result.text and "# every address" in result.text


def test_remove_lun_keeps_the_next_ones_comment() -> None:
    result = confedit.remove_lun(CONFIG, A, 0)
    assert not result.rewritten
    removed, added = diff(CONFIG, result.text)
    assert removed == ["      - id: 0", "        path: a0.img   # system disk",
                       "        size: 1GiB"]
    assert added == []
    assert "      # the data disk\n      - id: 1" in result.text


def test_remove_the_last_lun_leaves_an_empty_list() -> None:
    once = confedit.remove_lun(CONFIG, A, 1).text
    twice = confedit.remove_lun(once, A, 0)
    assert not twice.rewritten
    assert yaml.safe_load(twice.text)["targets"][0]["luns"] == []
    assert "    luns: []" in twice.text


def test_set_size_in_place_and_when_missing() -> None:
    result = confedit.set_lun_size(CONFIG, A, 1, "4GiB")
    assert diff(CONFIG, result.text) == (["        size: 2GiB"], ["        size: 4GiB"])
    no_size = CONFIG.replace("        size: 1GiB\n", "")
    result = confedit.set_lun_size(no_size, A, 0, "8GiB")
    assert not result.rewritten
    assert "        path: a0.img   # system disk\n        size: 8GiB\n" in result.text


def test_add_and_remove_targets() -> None:
    result = confedit.add_target(CONFIG, {"name": "iqn.2026-11.io.pytarget:c", "luns": []})
    assert not result.rewritten
    assert diff(CONFIG, result.text) == ([], ["  - name: iqn.2026-11.io.pytarget:c",
                                              "    luns: []"])
    gone = confedit.remove_target(result.text, A)
    assert not gone.rewritten
    names = [t["name"] for t in yaml.safe_load(gone.text)["targets"]]
    assert names == [B, "iqn.2026-11.io.pytarget:c"]
    assert gone.text.startswith("# lab target\n")


def test_unusual_layout_falls_back_to_a_whole_rewrite() -> None:
    flow = ('targets: [{name: "iqn.2026-11.io.pytarget:a", '
            'luns: [{id: 0, path: a.img, size: 1GiB}]}]  # one line\n')
    result = confedit.add_lun(flow, A, {"id": 1, "path": "b.img", "size": "1GiB"})
    doc = yaml.safe_load(result.text)
    assert [lun["id"] for lun in doc["targets"][0]["luns"]] == [0, 1]
    assert result.rewritten == ("# one line" not in result.text)


def test_unknown_target_or_lun() -> None:
    import pytest

    with pytest.raises(confedit.EditError):
        confedit.add_lun(CONFIG, "iqn.2026-11.io.pytarget:zz", {"id": 0, "path": "x"})
    with pytest.raises(confedit.EditError):
        confedit.remove_lun(CONFIG, A, 9)
