"""The NBD keys: `nbd` at the top level, `nbd_allow` in targets and LUNs (docs/nbd.md)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pytarget.assembly import build_exports, build_registry, prepare_backing_files
from pytarget.config import ConfigError, parse

IQN = "iqn.2026-11.io.pytarget:disk"


def config_text(nbd: str | None, target_allow: str = "", lun_allow: str = "") -> str:
    head = f'nbd: "{nbd}"\n' if nbd is not None else ""
    return head + f"""\
targets:
  - name: {IQN}
{target_allow}    luns:
      - {{id: 0, path: d0.img, size: 1MiB}}
      - {{id: 1, path: d1.img, size: 1MiB{lun_allow}}}
"""


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1", ("127.0.0.1", 10809)), ("127.0.0.1:10900", ("127.0.0.1", 10900)),
    ("::1", ("::1", 10809)), ("[::1]:0", ("::1", 0)), ("[::1]", ("::1", 10809)),
])
def test_nbd_address(tmp_path: Path, text: str, address: tuple[str, int]) -> None:
    config = parse(config_text(text), "t.yaml", tmp_path)
    assert config.nbd is not None and config.nbd.address == address


def test_off_by_default(tmp_path: Path) -> None:
    assert parse(config_text(None), "t.yaml", tmp_path).nbd is None


@pytest.mark.parametrize(("text", "key"), [
    (config_text("127.0.0.1:99999"), "nbd"),
    ('nbd: 5\n' + config_text(None), "nbd"),
    (config_text(None, target_allow='    nbd_allow: ["10.0.0.0/8"]\n'), "targets[0].nbd_allow"),
    (config_text("127.0.0.1", target_allow='    nbd_allow: ["not-an-address"]\n'),
     "targets[0].nbd_allow[0]"),
    (config_text("127.0.0.1", lun_allow=", nbd_allow: 10.0.0.1"), "targets[0].luns[1].nbd_allow"),
])
def test_bad_nbd_settings_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(text, "t.yaml", tmp_path)
    assert err.value.key == key


def test_exports_follow_the_allow_lists(tmp_path: Path) -> None:
    text = config_text("127.0.0.1", target_allow='    nbd_allow: ["192.0.2.0/24"]\n',
                       lun_allow=', nbd_allow: ["198.51.100.7", "::1"]')
    config = parse(text, "t.yaml", tmp_path)
    prepare_backing_files(config)
    registry = build_registry(config)
    try:
        table = build_exports(registry, config)
        assert [e.name for e in table.visible("192.0.2.9")] == [f"{IQN}/0"]
        assert [e.name for e in table.visible("::1")] == [f"{IQN}/1"]
        assert table.visible("127.0.0.1") == []
        export = table.lookup(f"{IQN}/1", "198.51.100.7")
        node = registry.target(IQN)
        assert export is not None and node is not None and export.unit() is node.luns[1]
        assert table.lookup(f"{IQN}/1", "192.0.2.9") is None
        assert export.allow == (ipaddress.ip_network("198.51.100.7/32"),
                                ipaddress.ip_network("::1/128"))
        # without nbd_allow: loopback only; the empty name is the one visible export
        plain = build_exports(registry, parse(config_text("127.0.0.1"), "t.yaml", tmp_path))
        assert len(plain.visible("127.0.0.5")) == 2 and plain.visible("192.0.2.9") == []
        assert plain.lookup("", "127.0.0.1") is None
    finally:
        for node in registry.targets.values():
            for lu in node.luns.values():
                lu.close()


def test_nbd_tls_paths_and_errors(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    good = config_text("127.0.0.1") + "nbd_tls: {cert: c.pem, key: k.pem, required: false}\n"
    tls = parse(good, "t.yaml", tmp_path).nbd.tls  # type: ignore[union-attr]
    assert tls is not None and tls.cert == tmp_path / "c.pem" and tls.ca is None
    assert not tls.required
    for text, key in ((config_text("127.0.0.1") + "nbd_tls: {cert: c.pem, key: none.pem}\n",
                       "nbd_tls.key"),
                      (config_text(None) + "nbd_tls: {cert: c.pem, key: k.pem}\n", "nbd_tls"),
                      (config_text("127.0.0.1") + "nbd_tls: {cert: c.pem}\n", "nbd_tls.key")):
        with pytest.raises(ConfigError) as err:
            parse(text, "t.yaml", tmp_path)
        assert err.value.key == key
