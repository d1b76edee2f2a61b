"""Configuration: validation errors name the key and file, nothing is created or resized."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytarget.assembly import prepare_backing_files
from pytarget.config import ConfigError, load, parse_portal, parse_size

GOOD = """\
portals: ["127.0.0.1:3260"]
targets:
  - name: iqn.2026-11.io.pytarget:disk
    luns:
      - id: 0
        path: disk0.img
        size: 1GiB
        block_size: 512
        readonly: false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_good_config(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    lun = config.targets[0].luns[0]
    assert lun.path == tmp_path / "disk0.img" and lun.size == 1 << 30 and lun.thin
    assert config.portals == [("127.0.0.1", 3260)]


@pytest.mark.parametrize("text,key", [
    (GOOD.replace("readonly: false", "readonly: false\n        colour: blue"),
     "targets[0].luns[0].colour"),
    (GOOD.replace("1GiB", "1XB"), "targets[0].luns[0].size"),
    (GOOD.replace("1GiB", "1000"), "targets[0].luns[0].size"),  # not a multiple of 512
    (GOOD.replace("block_size: 512", "block_size: 1024"), "targets[0].luns[0].block_size"),
    (GOOD + "      - id: 0\n        path: other.img\n        size: 1MiB\n",
     "targets[0].luns[1].id"),
    (GOOD.replace("iqn.2026-11.io.pytarget:disk", "not-an-iqn"), "targets[0].name"),
    (GOOD.replace("portals:", "portal:"), "portal"),
    (GOOD.replace('"127.0.0.1:3260"', '"127.0.0.1:99999"'), "portals[0]"),
    (GOOD.replace("readonly: false", "readonly: maybe"), "targets[0].luns[0].readonly"),
    (GOOD.replace("        size: 1GiB\n", ""), "targets[0].luns[0].size"),
    (GOOD + "busy_poll_us: -1\n", "busy_poll_us"),
    (GOOD + "busy_poll_us: 20000\n", "busy_poll_us"),
    (GOOD + "busy_poll_us: fast\n", "busy_poll_us"),
    (GOOD + "        sanitize_rate: fast\n", "targets[0].luns[0].sanitize_rate"),
    (GOOD + "        atomic_write_size: 12KiB\n", "targets[0].luns[0].atomic_write_size"),
    (GOOD + "        atomic_write_size: 256\n", "targets[0].luns[0].atomic_write_size"),
])
def test_errors_name_the_key_and_create_nothing(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == key
    assert str(path) in str(info.value)
    assert not (tmp_path / "disk0.img").exists()


def test_sanitize_and_atomic_write_keys(tmp_path: Path) -> None:
    lun = load(write(tmp_path, GOOD + "        sanitize_rate: 200MiB\n"
                                      "        atomic_write_size: 64KiB\n")).targets[0].luns[0]
    assert (lun.sanitize_rate, lun.atomic_write_size) == (200 << 20, 64 << 10)
    default = load(write(tmp_path, GOOD)).targets[0].luns[0]
    assert (default.sanitize_rate, default.atomic_write_size) == (0, None)


def test_busy_poll_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(write(tmp_path, GOOD + "busy_poll_us: 0\n")).poll_window() == 0.0
    assert load(write(tmp_path, GOOD + "busy_poll_us: 250\n")).poll_window() == 0.00025
    default = load(write(tmp_path, GOOD))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default.poll_window() == 0.0001
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default.poll_window() == 0.0  # one CPU: polling would take it from the initiator


def test_unusable_backing_path(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a directory")
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, GOOD.replace("path: disk0.img", "path: plain/disk0.img")))
    assert info.value.key == "targets[0].luns[0].path"


def test_directory_as_backing_file(tmp_path: Path) -> None:
    (tmp_path / "disk0.img").mkdir()
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, GOOD))
    assert info.value.key == "targets[0].luns[0].path"


def test_existing_file_is_never_resized(tmp_path: Path) -> None:
    image = tmp_path / "disk0.img"
    image.write_bytes(b"x" * 8192)
    config = load(write(tmp_path, GOOD))
    assert prepare_backing_files(config) == []
    assert image.read_bytes() == b"x" * 8192


def test_missing_file_is_created_sparse(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    assert prepare_backing_files(config) == [tmp_path / "disk0.img"]
    st = os.stat(tmp_path / "disk0.img")
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20


def test_sizes_and_portals() -> None:
    assert parse_size("4K") == 4096 and parse_size("1GiB") == 1 << 30 and parse_size(512) == 512
    for bad in ("", "-1", "1.5G", True, 0, "12 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_portal("[::1]:3261") == ("::1", 3261)
    assert parse_portal("10.0.0.1") == ("10.0.0.1", 3260)


def test_cli_reports_one_line_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("1GiB", "lots"))
    proc = subprocess.run([sys.executable, "-m", "pytarget", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "targets[0].luns[0].size" in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "disk0.img").exists()


def test_builtin_default_matches_luns_default() -> None:
    repo = Path(__file__).resolve().parents[3]
    from importlib import resources
    assert resources.files("pytarget").joinpath("default.yaml").read_text() == \
        (repo / "luns" / "default.yaml").read_text()


def with_reservations(body: str) -> str:
    return GOOD + "        reservations:\n" + "".join(
        f"          {line}\n" for line in body.splitlines())


def test_shared_reservations(tmp_path: Path) -> None:
    (tmp_path / "ceph.conf").write_text("[global]\n")
    (tmp_path / "keyring").write_text("")
    config = load(write(tmp_path, with_reservations(
        "store: rados\npool: rbd\nconf: ceph.conf\nkeyring: keyring\nclient_id: gw")))
    rc = config.targets[0].luns[0].reservations
    assert rc is not None
    assert (rc.store, rc.pool, rc.object, rc.client_id) == ("rados", "rbd", None, "gw")
    assert rc.conf == tmp_path / "ceph.conf" and rc.keyring == tmp_path / "keyring"
    assert load(write(tmp_path, GOOD)).targets[0].luns[0].reservations is None


@pytest.mark.parametrize("body,key", [
    ("store: etcd\npool: rbd\nconf: ceph.conf", "store"),
    ("store: rados\nconf: ceph.conf", "pool"),
    ("store: rados\npool: ''\nconf: ceph.conf", "pool"),
    ("store: rados\npool: 7\nconf: ceph.conf", "pool"),
    ("store: rados\npool: rbd\nconf: missing.conf", "conf"),
    ("store: rados\npool: rbd\nconf: ceph.conf\nkeyring: missing", "keyring"),
    ("store: rados\npool: rbd\nconf: ceph.conf\nwatch: 5", "watch"),
])
def test_shared_reservations_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    (tmp_path / "ceph.conf").write_text("[global]\n")
    path = write(tmp_path, with_reservations(body))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == f"targets[0].luns[0].reservations.{key}"
    assert not (tmp_path / "disk0.img").exists()
