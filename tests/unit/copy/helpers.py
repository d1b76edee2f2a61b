"""Copy-manager test rig: logical units on target nodes with ACLs, a copy manager over them, and
builders for EXTENDED COPY parameter lists, CDBs and ROD token commands."""

from __future__ import annotations

import struct
from pathlib import Path

from pytarget.assembly import RegistryDomain
from pytarget.backstore.base import Backstore
from pytarget.backstore.file import FileBackstore
from pytarget.copy import commands
from pytarget.copy.manager import CopyManager
from pytarget.core.reservations import SharedDocument
from pytarget.core.task import Nexus
from pytarget.iscsi.node import TargetNode
from pytarget.iscsi.target import TargetRegistry
from pytarget.scsi.device import LogicalUnit, LuConfig

TARGET = "iqn.2026-11.io.pytarget:unit"
OTHER_TARGET = "iqn.2026-11.io.pytarget:other"
INIT_A = "iqn.2026-11.io.pytarget.test:a"
INIT_B = "iqn.2026-11.io.pytarget.test:b"
NEXUS_A = Nexus(INIT_A, bytes.fromhex("800000000001"), TARGET, 1)
NEXUS_A2 = Nexus(INIT_A, bytes.fromhex("800000000003"), TARGET, 1)
NEXUS_B = Nexus(INIT_B, bytes.fromhex("800000000002"), TARGET, 1)


class Rig:
    """Target TARGET (LUNs added with `unit`) and OTHER_TARGET, one registry, one manager."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.registry = TargetRegistry()
        self.registry.portals = [("127.0.0.1", 3260)]
        self.node = TargetNode(TARGET)
        self.other = TargetNode(OTHER_TARGET)
        self.registry.add_target(self.node)
        self.registry.add_target(self.other)
        self.manager = CopyManager(RegistryDomain(self.registry))
        self._naa = 0x3000000000000100

    def unit(self, lun: int, blocks: int = 8192, block_size: int = 512, thin: bool = True,
             node: TargetNode | None = None, readonly: bool = False,
             backstore: Backstore | None = None,
             tokens: SharedDocument | None = None) -> LogicalUnit:
        """A LUN on a new sparse file, or on `backstore` when given; its ROD tokens shared
        through `tokens` when given."""
        node = node or self.node
        self._naa += 1
        if backstore is None:
            path = self.tmp_path / f"{node.name.rsplit(':', 1)[1]}-lun{lun}.img"
            FileBackstore.create(str(path), blocks * block_size)
            backstore = FileBackstore(str(path))
        lu = LogicalUnit(LuConfig(lun=lun, block_size=block_size, thin=thin, readonly=readonly,
                                  serial=f"SER{self._naa:X}",
                                  naa=self._naa.to_bytes(8, "big")),
                         backstore, node, commands.ROWS, tokens=tokens)
        node.luns[lun] = lu
        self.manager.attach(lu)
        return lu


def e4(lu: LogicalUnit, *, nul: bool = False, lu_id_type: int = 0, block_length: int | None = None
       ) -> bytes:
    """Identification CSCD descriptor naming `lu` by its NAA designator."""
    desc = bytearray(32)
    desc[0] = 0xE4
    desc[1] = (lu_id_type << 6) | (0x20 if nul else 0)
    desc[4] = 0x01  # binary
    desc[5] = 0x03  # association LU, type NAA
    desc[7] = len(lu.naa)
    desc[8:8 + len(lu.naa)] = lu.naa
    desc[29:32] = (lu.block_size if block_length is None else block_length).to_bytes(3, "big")
    return bytes(desc)


def b2b(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, *, dc: bool = False
        ) -> bytes:
    return struct.pack(">BBHHH2xHQQ", 0x02, 0x02 if dc else 0, 0x18, src, dst, blocks, src_lba,
                       dst_lba)


def b2b_offset(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, src_off: int,
               dst_off: int) -> bytes:
    return struct.pack(">BBHHH2xHQQHH", 0x0A, 0, 0x1C, src, dst, blocks, src_lba, dst_lba,
                       src_off, dst_off)


def verify(src: int, tur: bool = True) -> bytes:
    return struct.pack(">BBHH2xB3x", 0x07, 0, 0x08, src, 1 if tur else 0)


def lid1(cscds: list[bytes], segments: list[bytes], list_id: int = 1, usage: int = 0b00,
         priority: int = 0) -> bytes:
    c, s = b"".join(cscds), b"".join(segments)
    return struct.pack(">BBH4xII", list_id, (usage << 3) | priority, len(c), len(s), 0) + c + s


def lid4(cscds: list[bytes], segments: list[bytes], list_id: int = 1, usage: int = 0b00,
         immediate: bool = False) -> bytes:
    c, s = b"".join(cscds), b"".join(segments)
    header = bytearray(48)
    header[0] = 0x01
    header[1] = usage << 3
    header[15] = 0x01 if immediate else 0
    struct.pack_into(">I", header, 20, list_id)
    struct.pack_into(">HHH", header, 42, len(c), len(s), 0)
    return bytes(header) + c + s


def xcopy_cdb(length: int, lid4_sa: bool = False) -> bytes:
    return bytes((0x83, 0x01 if lid4_sa else 0x00)) + bytes(8) + length.to_bytes(4, "big") \
        + bytes(2)


def rcr_cdb(sa: int, list_id: int = 0, alloc: int = 4096) -> bytes:
    cdb = bytearray(16)
    cdb[0] = 0x84
    cdb[1] = sa
    if sa in (0x00, 0x01, 0x04):
        cdb[2] = list_id
    elif sa in (0x05, 0x06, 0x07):
        struct.pack_into(">I", cdb, 2, list_id)
    struct.pack_into(">I", cdb, 10, alloc)
    return bytes(cdb)


def abort_cdb(list_id: int) -> bytes:
    return bytes((0x83, 0x1C)) + list_id.to_bytes(4, "big") + bytes(10)


def token_cdb(sa: int, list_id: int, length: int) -> bytes:
    return bytes((0x83, sa)) + bytes(4) + list_id.to_bytes(4, "big") \
        + length.to_bytes(4, "big") + bytes(2)


def ranges(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">QI4x", lba, n) for lba, n in pairs)


def populate_params(*pairs: tuple[int, int], inactivity: int = 0, rod_type: int | None = None
                    ) -> bytes:
    desc = ranges(*pairs)
    flags = 0x02 if rod_type is not None else 0
    body = struct.pack(">BxIIxxH", flags, inactivity, rod_type or 0, len(desc)) + desc
    return struct.pack(">H", len(body)) + body


def write_token_params(token: bytes, *pairs: tuple[int, int], offset: int = 0,
                       delete: bool = False) -> bytes:
    desc = ranges(*pairs)
    body = struct.pack(">B5xQ", 0x02 if delete else 0, offset) + token + bytes(6) \
        + struct.pack(">H", len(desc)) + desc
    return struct.pack(">H", len(body)) + body


ZERO_TOKEN = struct.pack(">I2xH", 0xFFFF0001, 0x01F8) + bytes(504)
