"""docs/guides/proxmox-qemu.md run as written: the guide's configuration served by pytarget,
its `<!-- test: shell NAME -->` blocks run with `qemu-img` and libiscsi's tools (only PORTAL
and TARGET are the test's), and the guide's claims about CHAP checked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO, LiveTarget, start_target, write_config

GUIDE = REPO / "docs" / "guides" / "proxmox-qemu.md"
_BLOCK = re.compile(r"^<!-- test: (config|shell)(?: ([\w-]+))? -->\n```\w*\n(.*?)^```$",
                    re.M | re.S)
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "iscsi-ls", "iscsi-inq")),
    reason="qemu-utils (qemu-img, qemu-io) and libiscsi-bin are needed")


def blocks() -> dict[str, str]:
    return {m.group(2) or m.group(1): m.group(3) for m in _BLOCK.finditer(GUIDE.read_text())}


@pytest.fixture(scope="module")
def guide_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("qemu-guide")
    doc = yaml.safe_load(blocks()["config"])
    doc["portals"] = ["127.0.0.1:0"]
    config = directory / "pytarget.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    target = start_target(config)
    target.iqn = doc["targets"][0]["name"]
    yield target
    target.stop()


def shell(name: str, target: LiveTarget, cwd: Path) -> str:
    env = {**os.environ, "PORTAL": target.portal, "TARGET": target.iqn}
    proc = subprocess.run(["bash", "-e", "-c", blocks()[name]], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"guide block {name}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_qemu_guide(guide_target: LiveTarget, tmp_path: Path) -> None:
    target = guide_target
    base = target.config.parent
    out = shell("info", target, tmp_path)
    assert "virtual size: 32 GiB" in out

    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xa5 1M 3M", "-c",
                    "write -P 0x5a 40M 1M", str(raw)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(tmp_path / "disk.qcow2")], check=True)
    with (base / "vm-100-disk-0.img").open("r+b") as lun0:  # stale data the import replaces
        lun0.write(b"\xff" * 8 * MiB)
    shell("import", target, tmp_path)
    image = raw.read_bytes()
    with (base / "vm-100-disk-0.img").open("rb") as lun0:
        assert lun0.read(len(image)) == image
    # holes of the image became holes of the LUN (8 MiB were written before, 4 MiB are data)
    assert (base / "vm-100-disk-0.img").stat().st_blocks * 512 < 6 * MiB

    before = target.log_text().count("copy started: EXTENDED COPY(LID1)")
    shell("clone", target, tmp_path)
    with (base / "vm-101-disk-0.img").open("rb") as lun1:
        assert lun1.read(len(image)) == image
    log = target.log_text()
    assert log.count("copy started: EXTENDED COPY(LID1)") > before
    assert re.search(r"copy started: EXTENDED COPY\(LID1\) list \d+ on "
                     r"iqn\.2026-11\.io\.pytarget:vm LUN 1 by "
                     r"iqn\.2008-11\.org\.linux-kvm:pve1,i,0x", log)

    out = shell("tools", target, tmp_path)
    assert "Lun:0" in out and "Lun:1" in out
    for line in ("maximum compare and write length:128", "maximum transfer length:16384",
                 "maximum unmap lba count:1048576", "optimal unmap granularity:8",
                 "maximum write same length:32768"):
        assert line in out, out


def test_guide_chap_claims(tmp_path: Path) -> None:
    """Mutual CHAP: libiscsi's URL arguments and environment work; QEMU's logins are refused."""
    config = write_config(tmp_path, targets=[{
        "name": "iqn.2026-11.io.pytarget:mutual",
        "auth": {"chap": {"user": "qemu-host", "secret": "qemu-s3cret-value"},
                 "mutual": {"user": "pytarget", "secret": "target-s3cret-value"}},
        "luns": [{"id": 0, "path": "m.img", "size": "8MiB"}]}])
    target = start_target(config)
    try:
        url = (f"iscsi://qemu-host%qemu-s3cret-value@{target.portal}/"
               "iqn.2026-11.io.pytarget:mutual/0")
        mutual = "?target_user=pytarget&target_password=target-s3cret-value"
        assert subprocess.run(["iscsi-inq", url + mutual], capture_output=True,
                              timeout=60).returncode == 0
        env = {**os.environ, "LIBISCSI_CHAP_TARGET_USERNAME": "pytarget",
               "LIBISCSI_CHAP_TARGET_PASSWORD": "target-s3cret-value"}
        assert subprocess.run(["iscsi-inq", url], capture_output=True, env=env,
                              timeout=60).returncode == 0
        assert subprocess.run(["iscsi-inq", url], capture_output=True,
                              timeout=60).returncode != 0
        qemu = subprocess.run(["qemu-img", "info", url], capture_output=True, text=True,
                              env=env, timeout=60)
        assert qemu.returncode != 0 and "Authentication failure" in qemu.stderr
        assert "mutual CHAP is configured but the initiator did not ask for it" \
            in target.log_text()
    finally:
        target.stop()
