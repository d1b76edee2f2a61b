"""`pytarget lun ...` and `pytarget target ...` on configuration files, with no target
running: what they write, and what they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pytarget.cli import main
from pytarget.config import load

A = "iqn.2026-11.io.pytarget:a"
B = "iqn.2026-11.io.pytarget:b"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "pytarget.yaml"
    path.parent.mkdir()
    path.write_text(f"# mine\nportals: [\"127.0.0.1:3260\"]\ntargets:\n  - name: {A}\n"
                    "    luns:\n      - id: 0\n        path: a0.img\n        size: 1MiB\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out + out.err


def luns(config: Path, target: str = A) -> list[dict[str, object]]:
    doc = yaml.safe_load(config.read_text())
    return next(t["luns"] for t in doc["targets"] if t["name"] == target)


def test_lun_create_writes_a_path_relative_to_the_config(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    status, out = run(capsys, "lun", "create", "etc/disks/data.img", "--size", "10GiB",
                      "--block-size", "4096", "--config", str(config))
    assert status == 0, out
    assert f"added LUN 1 (disks/data.img, 10GiB) to {A}" in out
    assert "no running target uses this configuration" in out
    assert luns(config)[1] == {"id": 1, "path": "disks/data.img", "size": "10GiB",
                               "block_size": 4096}
    assert config.read_text().startswith("# mine\n")
    loaded = load(config)
    assert loaded.targets[0].luns[1].path == config.parent / "disks" / "data.img"
    assert not (config.parent / "disks").exists()  # created by serve or reload, not here
    outside = tmp_path / "elsewhere.img"
    status, out = run(capsys, "lun", "create", str(outside), "--size", "1MiB", "--id", "7",
                      "--readonly", "--config", str(config))
    assert status == 2 and "read-only LUNs are never created" in out
    status, out = run(capsys, "lun", "create", str(outside), "--size", "1MiB", "--id", "7",
                      "--thick", "--config", str(config))
    assert status == 0, out
    assert luns(config)[2] == {"id": 7, "path": str(outside), "size": "1MiB", "thin": False}


def test_lun_create_refusals(config: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    before = config.read_text()
    existing = tmp_path / "existing.img"
    existing.write_bytes(bytes(1 << 20))
    cases = [
        (["lun", "create", str(tmp_path / "new.img")], "give --size to create it"),
        (["lun", "create", str(existing), "--size", "2MiB"], "omit --size"),
        (["lun", "create", str(tmp_path / "n.img"), "--size", "1MiB", "--id", "0"],
         "already has LUN 0"),
        (["lun", "create", str(tmp_path / "n.img"), "--size", "lots"], "--size"),
        (["lun", "create", str(tmp_path / "n.img"), "--size", "1MiB", "--target", B],
         f"has no target {B}"),
        (["lun", "remove", "5"], "has no LUN 5"),
        (["lun", "resize", "0", "--size", "512KiB"], "LUNs never shrink"),
        (["target", "remove", A], "is the only target"),
        (["target", "create", "not-an-iqn"], "not an iSCSI name"),
        (["target", "create", A], "already has target"),
    ]
    for argv, message in cases:
        (config.parent / "a0.img").write_bytes(bytes(1 << 20))
        status, out = run(capsys, *argv, "--config", str(config))
        assert status == 2 and message in out, (argv, out)
        assert config.read_text() == before
    status, out = run(capsys, "lun", "create", str(existing), "--config", str(config))
    assert status == 0 and "existing file" in out
    assert luns(config)[1] == {"id": 1, "path": str(existing)}


def test_targets_and_a_second_lun(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run(capsys, "target", "create", B, "--alias", "second", "--config",
                      str(config))
    assert status == 0, out
    status, out = run(capsys, "lun", "create", str(config.parent / "b.img"), "--size",
                      "1MiB", "--config", str(config))
    assert status == 2 and "name one with --target" in out
    status, out = run(capsys, "lun", "create", str(config.parent / "b.img"), "--size",
                      "1MiB", "--target", B, "--config", str(config))
    assert status == 0, out
    assert luns(config, B) == [{"id": 0, "path": "b.img", "size": "1MiB"}]
    status, out = run(capsys, "lun", "resize", "0", "--size", "4MiB", "--target", B,
                      "--config", str(config))
    assert status == 0 and "set to 4MiB" in out
    status, out = run(capsys, "lun", "remove", "0", "--target", B, "--config", str(config))
    assert status == 0 and "its backing file is kept" in out
    assert luns(config, B) == []
    status, out = run(capsys, "target", "remove", B, "--config", str(config))
    assert status == 0, out
    assert config.read_text().startswith("# mine\nportals: [\"127.0.0.1:3260\"]\n")
    assert [t.name for t in load(config).targets] == [A]


def test_target_create_makes_a_new_file(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "new.yaml"
    status, out = run(capsys, "target", "create", A, "--portal", "127.0.0.1:3261",
                      "--config", str(path))
    assert status == 0, out
    config = load(path)
    assert config.portals == [("127.0.0.1", 3261)]
    assert [(t.name, t.luns) for t in config.targets] == [(A, [])]
    status, out = run(capsys, "lun", "create", str(tmp_path / "d.img"), "--size", "1MiB",
                      "--config", str(path))
    assert status == 0, out


def test_lun_create_without_config_materialises_the_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    status, out = run(capsys, "lun", "create", "luns/second.img", "--size", "1MiB")
    assert status == 0, out
    config = load("luns/default.yaml")
    assert [(lc.id, lc.path.name) for lc in config.targets[0].luns] == [
        (0, "default.img"), (1, "second.img")]
    assert (tmp_path / "luns" / "default.yaml").read_text().startswith("# pytarget's")
