"""`qemu:dirty-bitmap:NAME` contexts: listed and set per checkpoint, block status from the
checkpoint's bitmap, and NBD WRITE, TRIM and WRITE_ZEROES marking it like any other write."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest

from pytarget.iscsi.node import TargetNode
from pytarget.nbd.connection import NbdConnection
from pytarget.nbd.exports import Export, ExportTable
from pytarget.nbd.fabric import NbdFabric
from pytarget.nbd.proto import DIRTY_BITMAP, Cmd, Opt, Rep
from pytarget.scsi.cbt import bitmaps
from tests.unit.iscsi.harness import LOOP, HarnessUnit, make_unit

from .test_connection import FIXED, option
from .test_fabric import NAME, TARGET, Client, Wire

G = 64 << 10


class BitmapClient(Client):
    """A client whose export offers the unit's checkpoints, selecting `queries`."""

    def __init__(self, unit: HarnessUnit, queries: tuple[str, ...]) -> None:
        self.unit = unit
        lu = unit.lu
        export = Export(NAME, TARGET, 0, lambda: unit, "disk",
                        allow=(ipaddress.ip_network("127.0.0.0/8"),),
                        contexts=lambda: {DIRTY_BITMAP + n: s
                                          for n, s in bitmaps(lu.checkpoints).items()})
        self.conn = NbdConnection(0.0)
        self.fabric = NbdFabric(self.conn, ExportTable([export]), "127.0.0.1", Wire(), LOOP)
        self.received = bytearray()
        self.pump()
        self.received.clear()
        self.send(FIXED)
        self.send(option(Opt.STRUCTURED_REPLY))
        self.replies = self.meta(Opt.SET_META_CONTEXT, queries)

    def meta(self, opt: int, queries: tuple[str, ...]) -> list[tuple[int, str]]:
        """(context id, name) of each NBD_REP_META_CONTEXT answer."""
        self.take()
        body = struct.pack(">I", len(NAME)) + NAME.encode() + struct.pack(">I", len(queries))
        for q in queries:
            body += struct.pack(">I", len(q)) + q.encode()
        self.send(option(opt, body))
        data = self.take()
        out = []
        at = 0
        while at < len(data):
            _, _, rep, length = struct.unpack_from(">QIII", data, at)
            if rep == Rep.META_CONTEXT:
                out.append((struct.unpack_from(">I", data, at + 20)[0],
                            data[at + 24:at + 20 + length].decode()))
            at += 20 + length
        return out

    def statuses(self, offset: int, length: int) -> dict[int, list[tuple[int, int]]]:
        out = {}
        for _, kind, body in self.command(Cmd.BLOCK_STATUS, offset, length):
            assert kind == 5
            (context,) = struct.unpack_from(">I", body)
            out[context] = [struct.unpack_from(">II", body, at) for at in range(4, len(body), 8)]
        return out


@pytest.fixture
def unit() -> Any:
    node: TargetNode[HarnessUnit] = TargetNode(TARGET)
    u = make_unit(node, 0)
    node.luns[0] = u
    yield u
    u.close()


def test_contexts_are_listed_per_checkpoint(unit: HarnessUnit) -> None:
    unit.lu.create_checkpoint("monday")
    unit.lu.create_checkpoint("tuesday")
    c = BitmapClient(unit, ())
    listed = c.meta(Opt.LIST_META_CONTEXT, ("qemu:dirty-bitmap:",))
    assert [name for _, name in listed] == ["qemu:dirty-bitmap:monday",
                                            "qemu:dirty-bitmap:tuesday"]
    assert [name for _, name in c.meta(Opt.LIST_META_CONTEXT, ())] == [
        "base:allocation", "qemu:dirty-bitmap:monday", "qemu:dirty-bitmap:tuesday"]
    assert c.meta(Opt.SET_META_CONTEXT, ("qemu:dirty-bitmap:friday",)) == []


def test_nbd_writes_trims_and_zeroes_are_dirty_since_the_checkpoint(unit: HarnessUnit) -> None:
    unit.lu.create_checkpoint("c1")
    c = BitmapClient(unit, ("base:allocation", "qemu:dirty-bitmap:c1"))
    assert c.replies == [(1, "base:allocation"), (2, "qemu:dirty-bitmap:c1")]
    c.open()
    assert c.statuses(0, 8 * G)[2] == [(8 * G, 0)]
    assert c.status(Cmd.WRITE, G, 4096, payload=b"\1" * 4096) == 0
    assert c.status(Cmd.TRIM, 3 * G, 2 * G) == 0
    assert c.status(Cmd.WRITE_ZEROES, 6 * G + 512, 512) == 0
    assert c.status(Cmd.WRITE_ZEROES, 7 * G, 4096, flags=0x02) == 0  # NO_HOLE: a WRITE
    assert c.statuses(0, 8 * G)[2] == [(G, 0), (G, 1), (G, 0), (2 * G, 1), (G, 0), (2 * G, 1)]
    # a read marks nothing; a second checkpoint starts clean
    c.read(0, 8 * G)
    unit.lu.create_checkpoint("c2")
    assert c.statuses(0, 8 * G)[2] == [(G, 0), (G, 1), (G, 0), (2 * G, 1), (G, 0), (2 * G, 1)]


def test_a_deleted_checkpoint_is_an_error_not_a_clean_answer(unit: HarnessUnit) -> None:
    unit.lu.create_checkpoint("c1")
    c = BitmapClient(unit, ("qemu:dirty-bitmap:c1",))
    c.open()
    unit.lu.delete_checkpoint("c1")
    assert c.status(Cmd.BLOCK_STATUS, 0, G) != 0
