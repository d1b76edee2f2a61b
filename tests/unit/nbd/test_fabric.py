"""The NBD glue against real logical units, in memory: requests become SCSI commands on an NBD
nexus, and reservations, write protection, unit attentions, provisioning and metrics apply."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest

from pytarget.core.sense import Asc
from pytarget.core.task import Nexus, ScsiTask
from pytarget.iscsi.node import TargetNode
from pytarget.nbd.connection import NbdConnection
from pytarget.nbd.exports import Export, ExportTable
from pytarget.nbd.fabric import NbdFabric, nbd_error
from pytarget.nbd.proto import Cmd, Errno, Opt, Rep, TransmissionFlag
from tests.unit.iscsi.harness import BLOCK, BLOCKS, LOOP, HarnessUnit, make_unit, settle

from .test_connection import FIXED, go, option, request

TARGET = "iqn.2026-11.io.pytarget:nbd"
NAME = f"{TARGET}/0"


class Wire:
    def send(self) -> None:
        pass

    def upgrade_tls(self) -> None:
        raise AssertionError("no TLS here")


class Client:
    """An NBD client's side of an in-memory connection to a fabric over one real unit."""

    def __init__(self, unit: HarnessUnit, address: str = "127.0.0.1",
                 allow: tuple[str, ...] = ("127.0.0.0/8",), structured: bool = True,
                 contexts: bool = True) -> None:
        self.unit = unit
        export = Export(NAME, TARGET, 0, lambda: unit, "disk",
                        allow=tuple(ipaddress.ip_network(a) for a in allow))
        self.conn = NbdConnection(0.0)
        self.fabric = NbdFabric(self.conn, ExportTable([export]), address, Wire(), LOOP)
        self.received = bytearray()
        self.pump()
        self.received.clear()
        self.send(FIXED)
        if structured:
            self.send(option(Opt.STRUCTURED_REPLY))
        if contexts:
            q = b"base:allocation"
            body = struct.pack(">I", len(NAME)) + NAME.encode() + struct.pack(">II", 1, len(q))
            self.send(option(Opt.SET_META_CONTEXT, body + q))

    def send(self, data: bytes) -> None:
        self.conn.receive_data(data, 0.0)
        self.pump()

    def pump(self) -> None:
        LOOP.run_until_complete(self._pump())

    async def _pump(self) -> None:
        for _ in range(50):
            self.fabric.process()
            await settle()
            out = self.conn.data_to_send()
            self.received += b"".join(bytes(b) for b in out)
            self.fabric.release_lent()
            if not out and not self.conn.events and not any(
                    not t.done() for t in self.fabric.background):
                return

    def take(self) -> bytes:
        data = bytes(self.received)
        self.received.clear()
        return data

    def open(self) -> dict[int, bytes]:
        """NBD_OPT_GO; the NBD_INFO replies by type."""
        self.take()
        self.send(go(NAME.encode(), 3))
        infos: dict[int, bytes] = {}
        data = self.take()
        at = 0
        while at < len(data):
            _, opt, rep, length = struct.unpack_from(">QIII", data, at)
            body = data[at + 20:at + 20 + length]
            if rep == Rep.INFO:
                infos[struct.unpack_from(">H", body)[0]] = body[2:]
            else:
                infos[-1] = struct.pack(">I", rep) + body
            at += 20 + length
        return infos

    def command(self, cmd: int, offset: int, length: int, flags: int = 0,
                payload: bytes = b"", handle: int = 1) -> list[tuple[int, int, bytes]]:
        """Send one request; its structured chunks (flags, type, payload) or, for a simple
        reply, [(error, -1, data)]."""
        self.send(request(cmd, handle, offset, length, flags) + payload)
        data = self.take()
        if data[:4] == bytes.fromhex("67446698"):
            return [(struct.unpack_from(">I", data, 4)[0], -1, data[16:])]
        chunks = []
        at = 0
        while at < len(data):
            _, fl, kind, h, length_ = struct.unpack_from(">IHHQI", data, at)
            assert h == handle
            chunks.append((fl, kind, data[at + 20:at + 20 + length_]))
            at += 20 + length_
        assert chunks and chunks[-1][0] & 1, "the last chunk is marked DONE"
        return chunks

    def status(self, cmd: int, offset: int, length: int, flags: int = 0,
               payload: bytes = b"") -> int:
        replies = self.command(cmd, offset, length, flags, payload)
        for fl, kind, body in replies:
            if kind == -1:
                return fl
            if kind & 0x8000:
                return struct.unpack_from(">I", body)[0]
        return 0

    def read(self, offset: int, length: int) -> tuple[bytes, list[tuple[int, int]]]:
        """The data of a structured read and its holes (offset, length)."""
        data = bytearray(length)
        holes = []
        for _, kind, body in self.command(Cmd.READ, offset, length):
            assert kind in (0, 1, 2), f"chunk type {kind}"
            if kind == 1:
                (at,) = struct.unpack_from(">Q", body)
                data[at - offset:at - offset + len(body) - 8] = body[8:]
            elif kind == 2:
                at, n = struct.unpack_from(">QI", body)
                holes.append((at, n))
        return bytes(data), holes

    def block_status(self, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
        (chunk,) = self.command(Cmd.BLOCK_STATUS, offset, length, flags)
        assert chunk[1] == 5
        body = chunk[2]
        assert struct.unpack_from(">I", body)[0] == 1  # the context id SET_META_CONTEXT gave
        return [struct.unpack_from(">II", body, at) for at in range(4, len(body), 8)]


@pytest.fixture
def unit() -> Any:
    node: TargetNode[HarnessUnit] = TargetNode(TARGET)
    u = make_unit(node, 0)
    node.luns[0] = u
    yield u
    u.close()


def test_go_reports_the_unit_as_scsi_describes_it(unit: HarnessUnit) -> None:
    infos = Client(unit).open()
    size, flags = struct.unpack(">QH", infos[0])
    assert size == BLOCKS * BLOCK
    assert struct.unpack(">III", infos[3]) == (BLOCK, 4096, 32 << 20)
    wanted = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
              | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
              | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_DF
              | TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE
              | TransmissionFlag.SEND_FAST_ZERO)
    assert flags == wanted
    assert infos[-1] == struct.pack(">I", Rep.ACK)


def test_write_read_trim_zeroes_and_allocation(unit: HarnessUnit) -> None:
    c = Client(unit)
    c.open()
    pattern = bytes([0xAB]) * 65536
    assert c.status(Cmd.WRITE, 0, 65536, flags=1, payload=pattern) == 0  # FUA
    assert unit.disk[:65536] == pattern
    data, holes = c.read(0, 131072)
    assert data == pattern + bytes(65536)
    assert holes == [(65536, 65536)]  # the unwritten half comes as a hole chunk
    assert c.block_status(0, 131072)[0] == (65536, 0)
    assert c.status(Cmd.TRIM, 4096, 8192) == 0
    assert unit.disk[4096:12288] == bytes(8192)
    extents = c.block_status(0, 65536)
    assert extents[:3] == [(4096, 0), (8192, 3), (65536 - 12288, 0)]  # HOLE|ZERO
    # WRITE_ZEROES deallocates; with NO_HOLE it stays allocated (real zeroes are written)
    assert c.status(Cmd.WRITE, 1 << 20, 65536, payload=pattern) == 0
    assert c.status(Cmd.WRITE_ZEROES, 1 << 20, 32768) == 0
    assert c.status(Cmd.WRITE_ZEROES, (1 << 20) + 32768, 32768, flags=0x02) == 0
    assert unit.disk[1 << 20:(1 << 20) + 65536] == bytes(65536)
    assert c.block_status(1 << 20, 65536) == [(32768, 3), (32768, 0)]
    # REQ_ONE: one extent, no longer than asked
    assert c.block_status(0, 1024, flags=0x08) == [(1024, 0)]


def test_fast_zero_fails_fast_where_zeroing_is_writing(unit: HarnessUnit) -> None:
    c = Client(unit)
    c.open()
    c.status(Cmd.WRITE, 0, 4096, payload=b"\x11" * 4096)
    assert c.status(Cmd.WRITE_ZEROES, 0, 4096, flags=0x02 | 0x10) == Errno.ENOTSUP
    assert unit.disk[:4096] == b"\x11" * 4096  # untouched
    assert c.status(Cmd.WRITE_ZEROES, 0, 4096, flags=0x10) == 0
    assert unit.disk[:4096] == bytes(4096)


def test_flush_cache_and_simple_replies(unit: HarnessUnit) -> None:
    c = Client(unit, structured=False, contexts=False)
    c.open()
    assert c.command(Cmd.WRITE, 512, 512, payload=b"\x22" * 512) == [(0, -1, b"")]
    assert c.command(Cmd.FLUSH, 0, 0) == [(0, -1, b"")]
    assert c.command(Cmd.CACHE, 0, 4096) == [(0, -1, b"")]
    assert c.command(Cmd.READ, 512, 512) == [(0, -1, b"\x22" * 512)]
    # an unaligned read is served from the blocks around it
    assert c.command(Cmd.READ, 510, 4) == [(0, -1, b"\0\0\x22\x22")]


def test_reservation_of_another_initiator_applies(unit: HarnessUnit) -> None:
    c = Client(unit)
    c.open()
    other = Nexus("iqn.2026-11.io.pytarget.unit:other", b"\0" * 6, TARGET, 1)
    for cdb in (bytes(6), bytes([0x16]) + bytes(5)):  # TEST UNIT READY (its UA), RESERVE(6)
        task = ScsiTask(cdb, 0, 99, other)
        LOOP.run_until_complete(unit.lu.execute(task))
    assert task.status == 0
    assert c.status(Cmd.WRITE, 0, 512, payload=bytes(512)) == Errno.EPERM
    assert c.status(Cmd.READ, 0, 512) == Errno.EPERM


def test_unit_attention_is_retried_and_the_nexus_is_released(unit: HarnessUnit) -> None:
    c = Client(unit)
    c.open()
    unit.lu.establish_ua(Asc.MODE_PARAMETERS_CHANGED)
    assert c.status(Cmd.WRITE, 0, 512, payload=b"\x01" * 512) == 0
    assert unit.disk[:512] == b"\x01" * 512
    nexuses = [k for k in unit.lu.ua if k[0].startswith("nbd:")]
    assert nexuses
    c.fabric.connection_lost()
    c.pump()
    assert not [k for k in unit.lu.ua if k[0].startswith("nbd:")]


def test_commands_count_in_the_units_metrics(unit: HarnessUnit) -> None:
    c = Client(unit)
    c.open()
    before = unit.lu.stats_commands.get(0x8A, [0])[0]
    c.status(Cmd.WRITE, 0, 4096, payload=bytes(4096))
    assert unit.lu.stats_commands[0x8A][0] == before + 1


def test_write_protected_unit_is_read_only(unit: HarnessUnit) -> None:
    unit.lu.readonly = True
    c = Client(unit)
    infos = c.open()
    assert struct.unpack(">QH", infos[0])[1] & TransmissionFlag.READ_ONLY
    assert c.status(Cmd.WRITE, 0, 512, payload=bytes(512)) == Errno.EPERM


def test_clients_outside_the_allowed_networks_see_nothing(unit: HarnessUnit) -> None:
    c = Client(unit, address="192.0.2.7", structured=False, contexts=False)
    c.take()
    c.send(option(Opt.LIST))
    assert c.take() == bytes.fromhex("0003e889045565a9") + struct.pack(">III", 3, Rep.ACK, 0)
    infos = c.open()
    assert struct.unpack_from(">I", infos[-1])[0] == Rep.ERR_UNKNOWN
    assert c.fabric.export is None


def test_meta_context_list_and_default_export(unit: HarnessUnit) -> None:
    c = Client(unit, contexts=False)
    c.take()
    body = struct.pack(">I", 0) + struct.pack(">II", 1, 5) + b"base:"  # "" is the default
    c.send(option(Opt.LIST_META_CONTEXT, body))
    data = c.take()
    assert data[24:24 + 15] == b"base:allocation"
    assert struct.unpack_from(">III", data, 8) == (Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, 19)


@pytest.mark.parametrize(("status", "sense", "error"), [
    (0x18, None, Errno.EPERM),
    (0x02, bytes([0x70, 0, 0x05] + [0] * 9 + [0x21, 0x00]), Errno.EINVAL),
    (0x02, bytes([0x72, 0x07, 0x27, 0x00]), Errno.EPERM),
    (0x02, bytes([0x72, 0x07, 0x27, 0x07]), Errno.ENOSPC),
    (0x02, bytes([0x70, 0, 0x03] + [0] * 9 + [0x11, 0x00]), Errno.EIO),
    (0x02, bytes([0x70, 0, 0x05] + [0] * 9 + [0x20, 0x00]), Errno.ENOTSUP),
    (0x08, None, Errno.EIO),
])
def test_scsi_errors_map_to_nbd_errors(status: int, sense: bytes | None, error: Errno) -> None:
    assert nbd_error(status, sense)[0] == error


def test_requests_to_a_removed_export_get_eshutdown(unit: HarnessUnit) -> None:
    c = Client(unit)
    c.open()
    served: list[HarnessUnit | None] = [unit]
    assert c.fabric.export is not None
    object.__setattr__(c.fabric.export, "unit", lambda: served[0])
    served[0] = None  # a reload took the LUN away
    assert c.status(Cmd.READ, 0, 512) == Errno.ESHUTDOWN
    assert c.status(Cmd.WRITE, 0, 512, payload=bytes(512)) == Errno.ESHUTDOWN
