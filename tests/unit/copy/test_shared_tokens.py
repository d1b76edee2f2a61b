"""ROD tokens of a logical unit served by two gateways (copy/sharedtokens.py): two copy managers,
each with its own logical unit over one backing file and a handle on one in-memory token
document (tests/unit/scsi/shared_store.py, the contract the RADOS store keeps). A token made
through one gateway is used through the other; writes through either cancel it everywhere;
deletion, inactivity and REPORT ALL ROD TOKENS are cluster-wide; an unreachable document fails
what depends on it with TARGET PORT IN UNAVAILABLE STATE."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from pytarget.backstore.file import FileBackstore
from pytarget.copy.sharedtokens import decode
from pytarget.core.sense import Asc, SenseKey
from pytarget.core.task import Nexus
from pytarget.scsi.device import LogicalUnit

from ..scsi.harness import Result, run_async
from ..scsi.shared_store import SharedObject
from .helpers import (
    NEXUS_A,
    NEXUS_B,
    Rig,
    populate_params,
    rcr_cdb,
    token_cdb,
    write_token_params,
)

BS = 512
DATA = os.urandom(64 * BS)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """Two gateways: LUN 0 on one shared file with shared tokens, LUN 1 a file of each."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.document = SharedObject()
        source = tmp_path / "source.img"
        FileBackstore.create(str(source), 8192 * BS)
        with open(source, "r+b") as f:
            f.write(DATA)
        self.rigs: list[Rig] = []
        for name in ("gw1", "gw2"):
            (tmp_path / name).mkdir()
            rig = Rig(tmp_path / name)
            tokens = rig.manager.tokens
            rig.manager.clock = tokens.clock = tokens.wall = self.clock
            kind = GatedFile if name == "gw2" else FileBackstore
            rig.unit(0, backstore=kind(str(source)),
                     tokens=self.document.handle(name))
            rig.unit(1)
            self.rigs.append(rig)

    def lu(self, gateway: int, lun: int) -> LogicalUnit:
        return self.rigs[gateway - 1].node.luns[lun]

    async def populate(self, gateway: int, *pairs: tuple[int, int], list_id: int = 1,
                       inactivity: int = 0) -> tuple[Result, bytes]:
        """POPULATE TOKEN, then RECEIVE ROD TOKEN INFORMATION, through `gateway`."""
        lu = self.lu(gateway, 0)
        params = populate_params(*pairs, inactivity=inactivity)
        r = await command(lu, token_cdb(0x10, list_id, len(params)), params, NEXUS_A)
        if not r.ok():
            return r, b""
        info = await command(lu, rcr_cdb(0x07, list_id), b"", NEXUS_A)
        d = info.data
        assert d[4] == 0x10 and d[5] == 0x01  # POPULATE TOKEN, completed
        at = 32 + d[13]
        return r, d[at + 6:at + 6 + 512]

    async def write_using_token(self, gateway: int, token: bytes, *pairs: tuple[int, int],
                                lun: int = 1, list_id: int = 2, delete: bool = False) -> Result:
        params = write_token_params(token, *pairs, delete=delete)
        return await command(self.lu(gateway, lun), token_cdb(0x11, list_id, len(params)),
                               params, NEXUS_B)

    async def write(self, gateway: int, lba: int, lun: int = 0) -> Result:
        cdb = bytes((0x2A, 0)) + lba.to_bytes(4, "big") + bytes((0, 0, 1, 0))
        return await command(self.lu(gateway, lun), cdb, os.urandom(BS), NEXUS_B)

    def close(self) -> None:
        for rig in self.rigs:
            for lu in rig.node.luns.values():
                lu.close()


async def command(lu: LogicalUnit, cdb: bytes, data: bytes, nexus: Nexus) -> Result:
    """`cdb` through `lu`, the nexus's power-on unit attention taken as read."""
    lu.ua.setdefault(nexus.key, deque()).clear()
    return await run_async(lu, cdb, data, nexus)


def read(lu: LogicalUnit, lba: int, blocks: int) -> bytes:
    assert lu.backstore is not None
    buf = bytearray(blocks * BS)
    lu.backstore.read_into(memoryview(buf), lba * BS)
    return bytes(buf)


def cluster_test(body: Callable[[Cluster], Awaitable[None]]
                 ) -> Callable[[Path], None]:
    def test(tmp_path: Path) -> None:
        cluster = Cluster(tmp_path)

        async def go() -> None:
            await asyncio.wait_for(body(cluster), 30)
        try:
            asyncio.run(go())
        finally:
            cluster.close()
    test.__name__ = body.__name__
    test.__doc__ = body.__doc__
    return test


@cluster_test
async def test_made_on_one_gateway_used_on_the_other(c: Cluster) -> None:
    r, token = await c.populate(1, (0, 16), (32, 16))
    assert r.ok() and len(token) == 512
    assert (await c.write_using_token(2, token, (100, 8), (200, 24))).ok()
    assert read(c.lu(2, 1), 100, 8) == DATA[:8 * BS]
    assert read(c.lu(2, 1), 200, 24) == DATA[8 * BS:16 * BS] + DATA[32 * BS:48 * BS]
    assert (await c.write_using_token(1, token, (0, 32))).ok()  # and still on its own gateway
    assert read(c.lu(1, 1), 0, 32) == DATA[:16 * BS] + DATA[32 * BS:48 * BS]
    records, _ = decode(c.document.document)
    [record] = records.values()
    assert record.users == 0 and record.ranges == ((0, 16), (32, 16))
    assert token[128:].hex() not in (c.document.document or b"").decode()  # no secret in it


@cluster_test
async def test_a_write_through_the_other_gateway_cancels_it_everywhere(c: Cluster) -> None:
    _, token = await c.populate(1, (0, 16))
    assert (await c.write(2, 500)).ok()  # outside the ranges
    assert (await c.write_using_token(2, token, (0, 8))).ok()  # gateway 2 knows it now
    assert (await c.write(2, 15)).ok()
    for gateway in (1, 2):
        r = await c.write_using_token(gateway, token, (300, 8), list_id=gateway + 10)
        assert (r.key, r.asc) == (SenseKey.ILLEGAL_REQUEST,
                                  Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED), gateway
        assert read(c.lu(gateway, 1), 300, 8) == bytes(8 * BS)
    assert decode(c.document.document)[0] == {}


@cluster_test
async def test_a_write_on_the_making_gateway_cancels_it_for_a_gateway_that_never_saw_it(
        c: Cluster) -> None:
    _, token = await c.populate(1, (0, 16))
    assert (await c.write(1, 3)).ok()
    r = await c.write_using_token(2, token, (0, 8))
    assert (r.key, r.asc) == (SenseKey.ILLEGAL_REQUEST,
                              Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED)


@cluster_test
async def test_a_gateway_that_knows_the_token_cancels_without_reading_first(c: Cluster) -> None:
    _, token = await c.populate(1, (0, 16))
    assert (await c.write_using_token(2, token, (0, 8))).ok()
    loads = c.document.watchers[1].loads
    assert (await c.write(2, 4)).ok()
    assert c.document.watchers[1].loads == loads  # its copy was current: it only updated
    r = await c.write_using_token(1, token, (0, 8))
    assert r.asc == Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED


@cluster_test
async def test_delete_through_one_gateway_is_seen_through_the_other(c: Cluster) -> None:
    _, token = await c.populate(1, (0, 8))
    assert (await c.write_using_token(2, token, (0, 8), delete=True)).ok()
    r = await c.write_using_token(1, token, (0, 8))
    assert r.asc == Asc.INVALID_TOKEN_OPERATION_TOKEN_DELETED


@cluster_test
async def test_inactivity_counts_uses_on_every_gateway(c: Cluster) -> None:
    _, token = await c.populate(1, (0, 8), inactivity=5)
    c.clock.now += 4
    assert (await c.write_using_token(2, token, (0, 8))).ok()  # restarts the timer everywhere
    c.clock.now += 4.5
    assert (await c.write_using_token(1, token, (0, 8))).ok()
    c.clock.now += 5
    for gateway in (2, 1):
        r = await c.write_using_token(gateway, token, (0, 8))
        assert (r.key, r.asc) == (SenseKey.ILLEGAL_REQUEST,
                                  Asc.INVALID_TOKEN_OPERATION_TOKEN_EXPIRED), gateway


@cluster_test
async def test_report_all_rod_tokens_on_the_other_gateway(c: Cluster) -> None:
    _, token = await c.populate(1, (0, 8))
    await c.write_using_token(2, token, (0, 8))
    r = await command(c.lu(2, 0), rcr_cdb(0x08), b"", NEXUS_A)
    assert struct.unpack_from(">I", r.data)[0] == len(r.data) - 4
    assert r.data[8:] == token[:96]


@cluster_test
async def test_an_unreachable_document_fails_what_depends_on_it(c: Cluster) -> None:
    _, token = await c.populate(1, (0, 16))
    handle = c.document.handle("gw2")
    second = c.lu(2, 0)
    handle_of_gw2 = second.token_store
    assert handle_of_gw2 is not None and handle is not handle_of_gw2
    handle_of_gw2.reachable = False  # type: ignore[attr-defined]
    for r in (await c.write(2, 100), await c.write_using_token(2, token, (0, 8)),
              (await c.populate(2, (0, 8), list_id=7))[0]):
        assert (r.key, r.asc) == (SenseKey.NOT_READY,
                                  Asc.LUN_NOT_ACCESSIBLE_TARGET_PORT_UNAVAILABLE)
    assert (await c.write(2, 100, lun=1)).ok()  # a unit without shared tokens: unaffected
    assert (await c.write(1, 100)).ok()  # the other gateway: unaffected
    handle_of_gw2.reachable = True  # type: ignore[attr-defined]
    assert (await c.write_using_token(2, token, (0, 8))).ok()
    assert read(c.lu(2, 1), 0, 8) == DATA[:8 * BS]


class GatedFile(FileBackstore):
    """A file whose next copy (the first thing a copy asks is the source's extents, on the I/O
    thread) waits, once armed, until the test lets it go."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.armed = False
        self.entered = threading.Event()
        self.go = threading.Event()

    def extents(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        if self.armed:
            self.armed = False
            self.entered.set()
            self.go.wait(10)
        return super().extents(offset, length)


@cluster_test
async def test_a_cancel_waits_for_the_chunk_another_gateway_is_copying(c: Cluster) -> None:
    """Gateway 2 is copying from the token (its chunk has passed the token check and is
    reading the source) when a write through gateway 1 cancels it: gateway 2 acknowledges the
    cancellation only once the chunk is done, so the write changes the source after the chunk
    read it, and the copy holds the data from before the write."""
    _, token = await c.populate(1, (0, 64))
    source = c.lu(2, 0).backstore
    assert isinstance(source, GatedFile)
    source.armed = True
    copy = asyncio.ensure_future(c.write_using_token(2, token, (1000, 64)))
    assert await asyncio.to_thread(source.entered.wait, 10)
    write = asyncio.ensure_future(c.write(1, 1))
    mirrored = c.rigs[1].manager.tokens.tokens[token[8:16]]
    while mirrored.invalid is None:  # gateway 2 has the cancellation notice
        await asyncio.sleep(0.001)
    done, _ = await asyncio.wait({write}, timeout=0.2)
    assert not done  # the write waits for gateway 2's chunk
    source.go.set()
    assert (await copy).ok()
    assert (await write).ok()
    assert read(c.lu(2, 1), 1000, 64) == DATA[:64 * BS]
    assert read(c.lu(2, 0), 1, 1) != DATA[BS:2 * BS]
