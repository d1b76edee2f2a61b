"""READs sent straight from the page cache keep their blocks locked until the socket has taken
them: an initiator that stalls mid-read still gets the data as it was when its command ran,
and a write to those blocks waits. A backing file truncated under data waiting to be sent
costs that connection, not the target; a LUN removed by a reload still delivers what it lent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pytarget.config import load
from pytarget.core.stats import COMMANDS
from pytarget.initiator.client import ConnectionLost, Initiator
from pytarget.server import Server

from ..conftest import INITIATOR1, INITIATOR2, TARGET_IQN, until, write_config

BS = 512
MiB = 1 << 20
READS = 32  # 1 MiB each: far more than loopback socket buffers hold
READ10 = 0x28


async def session(host: str, port: int, name: str, lun: int = 0) -> Initiator:
    ini = await Initiator.connect(host, port)
    await ini.login(TARGET_IQN, initiator_name=name, MaxRecvDataSegmentLength=str(256 * 1024))
    await ini.clear_unit_attentions(lun)
    return ini


async def stalled_reads(server, lu, host: str, port: int, data: bytes
                        ) -> tuple[Initiator, Initiator, list[asyncio.Future]]:
    """A writer session stores `data` at LBA 0 of `lu`; a reader session that takes none of
    the data then reads it back in READS reads of 1 MiB. Once this returns, each READ has run
    on the target and most of their data waits to be sent. Returns (writer, reader, reads)."""
    writer = await session(host, port, INITIATOR2, lu.lun)
    await write_all(writer, data, lu.lun)
    reader = await session(host, port, INITIATOR1, lu.lun)
    reader.pause_reading()
    reads = [asyncio.ensure_future(reader.read(lu.lun, i * MiB // BS, MiB // BS, BS))
             for i in range(READS)]
    done = lu.stats_commands.get(READ10, [0])[COMMANDS]
    await until(lambda: lu.stats_commands.get(READ10, [0])[COMMANDS] == done + READS,
                "every READ executed")
    await until(lambda: server.streams == 1, "the target's output waits for the socket")
    return writer, reader, reads


async def write_all(ini: Initiator, data: bytes, lun: int = 0) -> None:
    for at in range(0, len(data), MiB):
        (await ini.write(lun, at // BS, data[at:at + MiB], block_size=BS)).check()


def serve(tmp_path: Path, scenario) -> None:
    # The target keeps reading commands while its output waits (up to the high-water mark),
    # so every READ of a scenario runs before any of it has to be sent.
    config = write_config(tmp_path, luns=[{"id": 0, "path": "lun0.img", "size": "64MiB"}],
                          limits={"output_high_water": "128MiB"})

    async def go() -> None:
        server = Server(load(config), source=str(config))
        await server.start()
        try:
            node = server.registry.target(TARGET_IQN)
            assert node is not None
            host, port = server.registry.portals[0]
            await scenario(server, node.luns[0], host, port)
        finally:
            await server.stop()

    asyncio.run(go())


def test_stalled_reader_gets_the_data_of_its_command(tmp_path: Path) -> None:
    old = os.urandom(READS * MiB)
    new = os.urandom(MiB)

    async def scenario(server, lu, host, port) -> None:
        writer, reader, reads = await stalled_reads(server, lu, host, port, old)
        last = (READS - 1) * MiB // BS
        write = asyncio.ensure_future(writer.write(0, last, new, block_size=BS))
        await until(lambda: lu.ranges.waiting, "the write queued for its blocks")
        assert not write.done(), "a write went ahead of data still to be sent"
        reader.resume_reading()
        for i, fut in enumerate(reads):
            assert (await fut).check().data == old[i * MiB:(i + 1) * MiB], f"read {i}"
        (await write).check()
        assert (await reader.read(0, last, MiB // BS, BS)).check().data == new
        assert not lu.ranges.busy
        for ini in (reader, writer):
            await ini.logout()
            await ini.close()

    serve(tmp_path, scenario)


def test_peer_gone_with_data_unsent_releases_the_blocks(tmp_path: Path) -> None:
    async def scenario(server, lu, host, port) -> None:
        writer, reader, reads = await stalled_reads(server, lu, host, port,
                                                    os.urandom(READS * MiB))
        assert lu.ranges.busy
        await reader.close()
        await asyncio.gather(*reads, return_exceptions=True)
        await until(lambda: not lu.ranges.busy, "the lent blocks released")
        (await writer.write(0, 0, bytes(MiB), block_size=BS)).check()
        await writer.logout()
        await writer.close()

    serve(tmp_path, scenario)


def test_file_truncated_under_unsent_data_drops_only_that_connection(tmp_path: Path) -> None:
    async def scenario(server, lu, host, port) -> None:
        data = os.urandom(READS * MiB)
        other, reader, reads = await stalled_reads(server, lu, host, port, data)
        size = os.path.getsize(lu.backstore.path)
        os.truncate(lu.backstore.path, 0)  # someone else shrinks the backing file
        reader.resume_reading()
        results = await asyncio.gather(*reads, return_exceptions=True)
        lost = [r for r in results if isinstance(r, ConnectionLost)]
        assert lost, "the connection survived pages that no longer exist"
        for i, r in enumerate(results):
            if not isinstance(r, BaseException):  # sent before the truncation
                assert r.check().data == data[i * MiB:(i + 1) * MiB]
        await until(lambda: not lu.ranges.busy, "the lent blocks released")
        os.truncate(lu.backstore.path, size)
        (await other.write(0, 0, data[:MiB], block_size=BS)).check()
        assert (await other.read(0, 0, MiB // BS, BS)).check().data == data[:MiB]
        await other.logout()
        await other.close()

    serve(tmp_path, scenario)


@pytest.mark.parametrize("digests", [False, True])
def test_reads_are_intact_with_and_without_data_digests(tmp_path: Path, digests: bool) -> None:
    async def scenario(server, lu, host, port) -> None:
        ini = await Initiator.connect(host, port)
        await ini.login(TARGET_IQN, initiator_name=INITIATOR1,
                        DataDigest="CRC32C" if digests else "None",
                        HeaderDigest="CRC32C" if digests else "None")
        await ini.clear_unit_attentions(0)
        data = os.urandom(8 * MiB)
        await write_all(ini, data)
        sizes = [16384, 65536, 65536 + 512, 1 << 20]
        offsets = [0, 7, 129, 4096]  # blocks
        reads = [ini.read(0, lba, size // BS, BS) for lba in offsets for size in sizes]
        results = await asyncio.gather(*reads)
        i = 0
        for lba in offsets:
            for size in sizes:
                assert results[i].check().data == data[lba * BS:lba * BS + size]
                i += 1
        assert not lu.ranges.busy
        await ini.logout()
        await ini.close()

    serve(tmp_path, scenario)


def test_lun_removed_under_unsent_data_still_delivers_it(tmp_path: Path) -> None:
    """A reload that removes the LUN closes its backing file once its commands are done; READ
    data already lent from it is still sent whole."""
    async def scenario(server, lu0, host, port) -> None:
        config = write_config(tmp_path, luns=[{"id": 0, "path": "lun0.img", "size": "64MiB"},
                                              {"id": 1, "path": "lun1.img", "size": "64MiB"}],
                              limits={"output_high_water": "128MiB"})
        await server.reload(load(config))
        lu = server.registry.target(TARGET_IQN).luns[1]
        data = os.urandom(READS * MiB)
        writer, reader, reads = await stalled_reads(server, lu, host, port, data)
        config = write_config(tmp_path, luns=[{"id": 0, "path": "lun0.img", "size": "64MiB"}],
                              limits={"output_high_water": "128MiB"})
        assert any("removed" in change for change in await server.reload(load(config)))
        await until(lambda: lu.closed, "the removed LUN's backing file closed")
        reader.resume_reading()
        for i, fut in enumerate(reads):
            assert (await fut).check().data == data[i * MiB:(i + 1) * MiB], f"read {i}"
        await until(lambda: not lu.ranges.busy, "the lent blocks released")
        for ini in (reader, writer):
            await ini.close()

    serve(tmp_path, scenario)
