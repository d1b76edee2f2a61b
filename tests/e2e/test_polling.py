"""The target on a polling event loop, as `pytarget serve` runs it: data stays intact, and a
connection counts as mid-transfer (no polling) exactly while a PDU is part-received or its
output waits for the socket."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from pytarget.config import load
from pytarget.initiator.client import Initiator
from pytarget.server import Server
from pytarget.transport import PollingSelector

from ..conftest import INITIATOR1, TARGET_IQN, until, write_config

BS = 512
MiB = 1 << 20


def test_streams_are_counted_and_released(tmp_path: Path) -> None:
    config = write_config(tmp_path, luns=[{"id": 0, "path": "lun0.img", "size": "64MiB"}])
    poller = PollingSelector(0.0001)

    async def go() -> None:
        server = Server(load(config), source=str(config))
        server.use_poller(poller)
        await server.start()
        try:
            host, port = server.registry.portals[0]
            ini = await Initiator.connect(host, port)
            await ini.login(TARGET_IQN, initiator_name=INITIATOR1, ImmediateData="No",
                            InitialR2T="Yes", MaxBurstLength=str(256 * 1024))
            await ini.clear_unit_attentions(0)
            data = os.urandom(4 * MiB)
            writes = [ini.write(0, i * 8192, data, block_size=BS) for i in range(4)]
            for result in await asyncio.gather(*writes):
                result.check()
            for i in range(4):
                assert (await ini.read(0, i * 8192, len(data) // BS, BS)).check().data == data
            await until(lambda: server.streams == 0, "streams back to 0 after I/O")
            assert poller.quiet()

            # Half a PDU header: the connection is mid-transfer until the peer goes away.
            raw = socket.create_connection((host, port))
            raw.sendall(bytes([0x03, 0x87]) + bytes(20))
            await until(lambda: server.streams == 1, "a part-received header is counted")
            assert not poller.quiet()
            raw.close()
            await until(lambda: server.streams == 0, "a closed connection is released")
            await ini.logout()
            await ini.close()
        finally:
            await server.stop()

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(poller)) as runner:
        runner.run(go())
