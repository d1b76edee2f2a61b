"""Driving a LogicalUnit directly: CDBs in, status/sense/Data-In out, no transport."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pytarget.backstore.file import FileBackstore
from pytarget.core.sense import Status
from pytarget.core.table import OpSpec
from pytarget.core.task import Nexus, ScsiTask
from pytarget.scsi.device import LogicalUnit, LuConfig

_tags = itertools.count(1)


class MemorySource:
    """Data-Out held in memory, handed over when the device server asks for it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requested: list[int] = []

    async def fetch_data_out(self, task: ScsiTask, length: int) -> memoryview:
        self.requested.append(length)
        return memoryview(self.data)[:min(length, len(self.data))]


class Directory:
    def __init__(self) -> None:
        self.luns: dict[int, LogicalUnit] = {}

    def visible_luns(self, nexus: Nexus) -> list[int]:
        return list(self.luns)


@dataclass
class Result:
    status: int
    sense: bytes | None
    data: bytes

    @property
    def key(self) -> int | None:
        if not self.sense:
            return None
        fixed = self.sense[0] & 0x7F in (0x70, 0x71)
        return self.sense[2] & 0x0F if fixed else self.sense[1] & 0x0F

    @property
    def asc(self) -> int | None:
        if not self.sense:
            return None
        if self.sense[0] & 0x7F in (0x70, 0x71):
            return (self.sense[12] << 8) | self.sense[13]
        return (self.sense[2] << 8) | self.sense[3]

    @property
    def field_pointer(self) -> tuple[bool, int, int | None] | None:
        """(in CDB, byte, bit) from fixed-format sense-key-specific bytes."""
        if not self.sense or self.sense[0] & 0x7F != 0x70 or not self.sense[15] & 0x80:
            return None
        sks = self.sense[15]
        bit = sks & 0x07 if sks & 0x08 else None
        return bool(sks & 0x40), (self.sense[16] << 8) | self.sense[17], bit

    @property
    def information(self) -> int | None:
        if not self.sense or not self.sense[0] & 0x80:
            return None
        return int.from_bytes(self.sense[3:7], "big")

    def ok(self) -> bool:
        return self.status == Status.GOOD


NEXUS_A = Nexus("iqn.2026-11.io.pytarget.test:a", bytes.fromhex("800000000001"),
                "iqn.2026-11.io.pytarget:unit", 1)
NEXUS_B = Nexus("iqn.2026-11.io.pytarget.test:b", bytes.fromhex("800000000002"),
                "iqn.2026-11.io.pytarget:unit", 1)


def make_lu(tmp_path: Path, blocks: int = 8192, block_size: int = 512, lun: int = 0,
            directory: Directory | None = None, services: Iterable[OpSpec] = (),
            **config: object) -> LogicalUnit:
    path = tmp_path / f"lun{lun}.img"
    if not path.exists():
        FileBackstore.create(str(path), blocks * block_size)
    backstore = FileBackstore(str(path), readonly=bool(config.get("readonly", False)))
    directory = directory or Directory()
    lu = LogicalUnit(LuConfig(lun=lun, block_size=block_size, serial="UNIT0001",
                              naa=bytes.fromhex("3000000000000001"), **config),  # type: ignore[arg-type]
                     backstore, directory, services)
    directory.luns[lun] = lu
    return lu


def make_task(lu: LogicalUnit, cdb: bytes, data_out: bytes = b"", nexus: Nexus = NEXUS_A,
              expected_in: int = 1 << 24) -> ScsiTask:
    """A task for `cdb` whose Data-Out is `data_out`, as a transport would build it."""
    return ScsiTask(cdb.ljust(16, b"\0") if len(cdb) < 6 else cdb, lu.lun, next(_tags), nexus,
                    expected_in=expected_in, expected_out=len(data_out),
                    source=MemorySource(data_out))


async def run_async(lu: LogicalUnit, cdb: bytes, data_out: bytes = b"",
                    nexus: Nexus = NEXUS_A, expected_in: int = 1 << 24) -> Result:
    task = make_task(lu, cdb, data_out, nexus, expected_in)
    await lu.start(task)
    data = bytes(task.data_in[:task.data_in_len]) if task.data_in is not None else b""
    return Result(task.status, task.sense, data)


def run(lu: LogicalUnit, cdb: bytes, data_out: bytes = b"", nexus: Nexus = NEXUS_A,
        clear_ua: bool = True) -> Result:
    async def go() -> Result:
        if clear_ua:
            lu.ua.setdefault(nexus.key, deque()).clear()
        return await run_async(lu, cdb, data_out, nexus)
    return asyncio.run(go())
