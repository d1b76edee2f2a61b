"""`backstore: rbd` LUNs in the configuration: their keys, errors naming the key, and the
parameters the assembly hands the backstore (no cluster needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pytarget import assembly
from pytarget.config import ConfigError, load


def write(tmp_path: Path, *luns: dict[str, Any]) -> Path:
    (tmp_path / "ceph.conf").write_text("[global]\n")
    (tmp_path / "keyring").write_text("")
    doc = {"portals": ["127.0.0.1:0"],
           "targets": [{"name": "iqn.2026-11.io.pytarget:rbd", "luns": list(luns)}]}
    path = tmp_path / "pytarget.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def rbd(lun: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": lun, "backstore": "rbd", "pool": "rbd", "image": f"img{lun}", **extra}


def test_rbd_lun_parameters(tmp_path: Path) -> None:
    config = load(write(tmp_path, rbd(conf="ceph.conf", keyring=str(tmp_path / "keyring"),
                                      client_id="iscsi", object_size="64KiB", size="1GiB")))
    [lc] = config.targets[0].luns
    assert lc.path is None and lc.backstore == "rbd" and lc.size == 1 << 30
    assert lc.location == "rbd/img0"
    assert assembly.backstore_params(lc) == {
        "pool": "rbd", "image": "img0", "conf": str(tmp_path / "ceph.conf"),
        "keyring": str(tmp_path / "keyring"), "client_id": "iscsi", "object_size": 65536}
    assert assembly.pr_state_path(config, lc) == tmp_path / "rbd.rbd.img0.pr.json"


@pytest.mark.parametrize(("lun", "key", "message"), [
    ({"id": 0, "backstore": "rbd", "image": "a"}, "luns[0].pool", "missing"),
    ({"id": 0, "backstore": "rbd", "pool": "rbd"}, "luns[0].image", "missing"),
    (rbd(path="x.img"), "luns[0].path", "unknown key"),
    (rbd(pool=""), "luns[0].pool", "non-empty string"),
    (rbd(image=7), "luns[0].image", "non-empty string"),
    (rbd(object_size="3KiB"), "luns[0].object_size", "power of two"),
    (rbd(object_size="lots"), "luns[0].object_size", "size"),
    (rbd(conf="absent.conf"), "luns[0].conf", "not a readable file"),
    (rbd(keyring="/nonexistent/keyring"), "luns[0].keyring", "not a readable file"),
    ({"id": 0, "path": "a.img", "size": "1MiB", "pool": "rbd"}, "luns[0].pool", "unknown key"),
])
def test_rbd_errors_name_the_key(tmp_path: Path, lun: dict[str, Any], key: str,
                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(write(tmp_path, lun))
    assert info.value.key == f"targets[0].{key}"


def test_two_luns_on_one_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="same image as targets\\[0\\].luns\\[0\\]") as info:
        load(write(tmp_path, rbd(0), {**rbd(1), "image": "img0"}))
    assert info.value.key == "targets[0].luns[1].image"


def test_an_unknown_kind_names_the_key(tmp_path: Path) -> None:
    config = load(write(tmp_path, {"id": 0, "path": "a.img", "size": "1MiB",
                                   "backstore": "nbd"}))
    with pytest.raises(ConfigError, match="one of file, rbd") as info:
        assembly.check(config)
    assert info.value.key == "targets[0].luns[0].backstore"
