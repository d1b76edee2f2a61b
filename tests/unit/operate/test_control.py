"""The control socket: file permissions, stale and live sockets, long paths, the JSON protocol;
and the log formats."""

from __future__ import annotations

import asyncio
import grp
import io
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from pytarget import logs
from pytarget.config import parse
from pytarget.control import ControlError, ControlServer, request, socket_path


async def echo(command: str, req: dict[str, Any], uid: int | None) -> Any:
    if command == "fail":
        raise ControlError("as asked")
    return {"command": command, "uid": uid, "extra": req.get("extra")}


def serve_then(path: Path, check: Any, group: str | None = None) -> None:
    """Run a ControlServer at `path` and call `check()` from another thread meanwhile."""

    async def go() -> None:
        server = ControlServer(path, echo, group)
        await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, check)
        finally:
            await server.close()
        assert not path.exists()

    asyncio.run(go())


def test_request_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ctl.sock"

    def check() -> None:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert request(path, "status", extra=1) == {"command": "status", "uid": os.getuid(),
                                                    "extra": 1}
        with pytest.raises(ControlError, match="as asked"):
            request(path, "fail")
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(path))
            raw.sendall(b"not json\n")
            answer = json.loads(raw.makefile().readline())
        assert answer["ok"] is False

    serve_then(path, check)


def test_group_access(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    path = tmp_path / "ctl.sock"

    def check() -> None:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()

    serve_then(path, check, group)


def test_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed target leaves
    serve_then(path, lambda: request(path, "x"))
    path.write_text("not a socket")

    async def refused() -> None:
        with pytest.raises(OSError, match="not a socket"):
            await ControlServer(path, echo).start()
        path.unlink()
        first = ControlServer(path, echo)
        await first.start()
        with pytest.raises(OSError, match="another pytarget answers"):
            await ControlServer(path, echo).start()
        await first.close()

    asyncio.run(refused())


def test_long_paths_work(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = deep / "control.sock"
    assert len(str(path)) > 108

    def check() -> None:
        assert path.exists()
        assert request(path, "status")["command"] == "status"

    serve_then(path, check)


def test_client_errors(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is the target running"):
        request(tmp_path / "none.sock", "status")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(tmp_path / "dead.sock"))
    with pytest.raises(ControlError, match="not running"):
        request(tmp_path / "dead.sock", "status")


def test_default_socket_path(tmp_path: Path) -> None:
    text = 'targets: [{name: "iqn.2026-11.io.pytarget:a", luns: []}]\n'
    config = parse(text, str(tmp_path / "site.yaml"), tmp_path)
    (tmp_path / "site.yaml").write_text(text)
    assert socket_path(config) == tmp_path / "site.sock"
    config = parse(text + "control_socket: run/ctl.sock\n", str(tmp_path / "site.yaml"),
                   tmp_path)
    assert socket_path(config) == tmp_path / "run" / "ctl.sock"


# ---------------------------------------------------------------- logs
def test_json_log_lines_carry_event_fields_and_no_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactSecrets())
    logger = logging.getLogger("pytarget.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("login of %s failed: CHAP_R=0xdeadbeef secret: hunter22hunter22",
                       "iqn.x", extra={"event": "login_failed", "initiator": "iqn.x",
                                       "lun": 3, "other": "not copied"})
    finally:
        logger.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["level"] == "warning" and record["logger"] == "pytarget.test-json"
    assert record["event"] == "login_failed" and record["initiator"] == "iqn.x"
    assert record["lun"] == 3 and "other" not in record
    assert record["time"].endswith("Z")
    assert "deadbeef" not in record["message"] and "hunter22" not in record["message"]
    assert "CHAP_R=<redacted>" in record["message"]


def test_setup_switches_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("debug", "json")
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        assert root.level == logging.DEBUG
        logs.setup("warning", "text")
        assert not isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
