"""`pytarget serve` as a user runs it: the built-in default, and clean shutdown."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import INITIATOR1, TARGET_IQN, child_env, start_target, write_config

ISCSI_LS = shutil.which("iscsi-ls")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(ISCSI_LS is None, reason="iscsi-ls (libiscsi-bin) not installed")
def test_default_configuration_serves_on_3260(tmp_path: Path) -> None:
    """With no arguments and no luns/ directory, the built-in luns/default.yaml is served."""
    assert _port_free(3260), "port 3260 is taken by another program"
    log = (tmp_path / "serve.log").open("w")
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-m", "pytarget", "serve"], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out = subprocess.run([ISCSI_LS, "-s", "iscsi://127.0.0.1:3260/"], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "Target:iqn.2026-11.io.pytarget:disk Portal:127.0.0.1:3260,1" in out.stdout
        assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:1023M\)", out.stdout), out.stdout
        image = tmp_path / "luns" / "default.img"
        assert image.stat().st_size == 1 << 30
        assert image.stat().st_blocks * 512 < 1 << 20  # sparse
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_existing_backing_file_is_kept_and_sigterm_flushes(tmp_path: Path) -> None:
    image = tmp_path / "lun0.img"
    content = os.urandom(4096) * 256  # 1 MiB that must survive start and stop untouched
    image.write_bytes(content)
    target = start_target(write_config(tmp_path, luns=[
        {"id": 0, "path": "lun0.img", "size": "64MiB"}]))
    with socket.create_connection((target.host, target.port)):
        pass
    assert target.stop(signal.SIGTERM) == 0
    assert image.read_bytes() == content
    assert "shutting down" in target.log_text()


def test_log_names_the_data_path_it_runs(tmp_path: Path) -> None:
    """The start-up log says whether the data path is compiled (setup.py). tools/test's full
    run points the targets at the compiled build (PYTARGET_CODE): there it must be compiled,
    or that run would test the pure-Python sources twice; elsewhere the sources run."""
    target = start_target(write_config(tmp_path, luns=[
        {"id": 0, "path": "lun0.img", "size": "1MiB"}]))
    try:
        expected = "compiled (mypyc)" if os.environ.get("PYTARGET_CODE") else "pure Python"
        assert re.search(r"pytarget \S+, data path " + re.escape(expected), target.log_text()), \
            target.log_text()
    finally:
        assert target.stop(signal.SIGTERM) == 0


_INITIATOR_SCRIPT = """
import asyncio, os, sys
from pytarget import transport
from pytarget.initiator.client import Initiator

async def main(port, target):
    ini = await Initiator.connect("127.0.0.1", port)
    await ini.login(target, initiator_name=sys.argv[3])
    await ini.clear_unit_attentions(0)
    data = os.urandom(65536)
    (await ini.write(0, 64, data)).check()
    read = await ini.read(0, 64, 128)
    read.check()
    await ini.logout()
    await ini.close()
    print("compiled" if transport.COMPILED else "pure", read.data == data)

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def test_the_packages_initiator_runs_from_the_code_the_targets_run(tmp_path: Path) -> None:
    """The project's own initiator (pytarget.initiator, compiled with the data path by
    setup.py) logs in, writes and reads back, from the code the targets run: the compiled
    build in tools/test's full run, where a compiled class once failed to construct."""
    target = start_target(write_config(tmp_path, luns=[
        {"id": 0, "path": "lun0.img", "size": "1MiB"}]))
    try:
        run = subprocess.run([sys.executable, "-c", _INITIATOR_SCRIPT, str(target.port),
                              TARGET_IQN, INITIATOR1], env=child_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        expected = "compiled" if os.environ.get("PYTARGET_CODE") else "pure"
        assert run.stdout.split() == [expected, "True"], (run.stdout, run.stderr)
    finally:
        assert target.stop(signal.SIGTERM) == 0
