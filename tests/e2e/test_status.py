"""`pytarget status` against a live target: sessions with their negotiated parameters, and an
EXTENDED COPY whose progress moves while the command line polls the control socket.

The target runs in the test's own event loop so that the copy manager's chunk delay can be
set: each 8 MiB chunk of the copy waits a little, until the command line has seen the copy at
three different points, however slowly the machine runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

from pytarget.config import load
from pytarget.initiator.client import Initiator
from pytarget.server import Server

from ..conftest import INITIATOR1, TARGET_IQN, write_config
from ..unit.copy.helpers import b2b, e4, lid1, xcopy_cdb
from .test_reload import pytarget

MiB = 1 << 20
BS = 4096
COPY_MIB = 64


def test_status_follows_an_extended_copy(tmp_path: Path) -> None:
    config = write_config(tmp_path, luns=[
        {"id": 0, "path": "src.img", "size": f"{COPY_MIB}MiB", "block_size": BS},
        {"id": 1, "path": "dst.img", "size": f"{COPY_MIB}MiB", "block_size": BS}])

    async def go() -> None:
        server = Server(load(config), source=str(config))
        await server.start()
        try:
            chunks = asyncio.Semaphore(0)  # one chunk moves per status sample
            server.copy_manager.chunk_gate = chunks.acquire
            sock = tmp_path / "pytarget.sock"
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            host, port = server.registry.portals[0]
            ini = await Initiator.connect(host, port)
            await ini.login(TARGET_IQN, initiator_name=INITIATOR1, header_digest=True)
            for lun in (0, 1):
                await ini.clear_unit_attentions(lun)
            data = os.urandom(MiB)
            for i in range(COPY_MIB):
                (await ini.write(0, i * MiB // BS, data, block_size=BS)).check()

            status, out = await pytarget("status", "--json", "--config", str(config))
            assert status == 0, out
            doc = json.loads(out)
            (session,) = doc["sessions"]
            assert session["initiator"] == INITIATOR1 and session["target"] == TARGET_IQN
            assert session["isid"] == ini.conn.isid.hex()  # type: ignore[union-attr]
            (conn,) = session["connections"]
            assert conn["portal"] == f"{host}:{port}"
            assert conn["header_digest"] == "CRC32C" and conn["data_digest"] == "None"
            assert conn["target_max_recv_data_segment_length"] > 0
            luns = doc["targets"][0]["luns"]
            assert [lu["size_bytes"] for lu in luns] == [COPY_MIB * MiB] * 2
            assert luns[0]["allocated_bytes"] >= COPY_MIB * MiB
            assert doc["copies"] == []

            node = server.registry.target(TARGET_IQN)
            assert node is not None
            src, dst = node.luns[0], node.luns[1]
            blocks = COPY_MIB * MiB // BS
            params = lid1([e4(src), e4(dst)], [b2b(0, 1, blocks, 0, 0)], list_id=7)
            copy = asyncio.create_task(ini.command(0, xcopy_cdb(len(params)), params,
                                                   timeout=120))
            samples = []
            table = ""
            while not copy.done():
                status, out = await pytarget("status", "--json", "--config", str(config))
                assert status == 0, out
                samples += json.loads(out)["copies"]
                if samples and not table:
                    status, table = await pytarget("status", "--config", str(config))
                if len({s["bytes_done"] for s in samples}) >= 3:
                    server.copy_manager.chunk_gate = None  # seen it move: let it finish
                    for _ in range(COPY_MIB):
                        chunks.release()
                else:
                    chunks.release()
            (await copy).check()
        finally:
            await server.stop()
        assert len(samples) >= 3, samples
        for sample in samples:
            assert sample["operation"] == "EXTENDED COPY(LID1)" and sample["list_id"] == 7
            assert sample["initiator"].startswith(INITIATOR1 + ",i,0x")
            assert sample["bytes_total"] == COPY_MIB * MiB
            assert 0 <= sample["percent"] <= 100
        done = [s["bytes_done"] for s in samples]
        assert any(s["percent"] < 100 for s in samples)
        assert done == sorted(done) and len(set(done)) >= 2, done
        assert any(s["bytes_per_second"] > 0 for s in samples)
        assert "Copy operations in progress:" in table and "EXTENDED COPY(LID1)" in table
        assert INITIATOR1 in table and "CRC32C/None" in table
        assert (tmp_path / "dst.img").read_bytes()[:MiB] == data
        assert not (tmp_path / "pytarget.sock").exists()

    asyncio.run(go())


def test_status_without_a_running_target(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    status, out = asyncio.run(pytarget("status", "--config", str(config)))
    assert status == 1
    assert "is the target running" in out


def test_json_log_lines(tmp_path: Path) -> None:
    """`serve --log-format json`: every line is one JSON object; login, logout and session end
    carry the initiator as a field."""
    from ..conftest import start_target

    target = start_target(write_config(tmp_path), "--log-format", "json")
    try:
        async def go() -> None:
            ini = await Initiator.connect(target.host, target.port)
            await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
            await ini.logout()
            await ini.close()

        asyncio.run(go())
    finally:
        assert target.stop() == 0
    records = [json.loads(line) for line in target.log_text().splitlines()]
    events = {r.get("event"): r for r in records}
    for event in ("login", "logout", "session_end"):
        assert events[event]["initiator"] == INITIATOR1 and events[event]["level"] == "info"
    assert events["login"]["target"] == TARGET_IQN
    assert records[-1]["message"] == "shutting down"
