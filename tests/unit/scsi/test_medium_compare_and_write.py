"""COMPARE AND WRITE on a medium that offers its own (`caps.compare_and_write_max`, as RBD
does): the device server uses `acompare_and_write`, advertises only the whole blocks the medium
does atomically, and offers no COMPARE AND WRITE when not one block fits; UNMAP joins adjacent
descriptors into one deallocation."""

from __future__ import annotations

import struct
from typing import Any

from pytarget.scsi.device import LogicalUnit, LuConfig

from ..backstore.memory import MemoryBackstore
from .harness import Directory, run

MiB = 1 << 20


def memory_lu(block_size: int, caw_max: int, boundary: int = 0) -> LogicalUnit:
    store = MemoryBackstore(8 * MiB)
    store.caps.compare_and_write_max = caw_max
    store.caps.compare_and_write_boundary = boundary
    directory = Directory()
    lu = LogicalUnit(LuConfig(lun=0, block_size=block_size), store, directory)
    directory.luns[0] = lu
    return lu


def caw(lba: int, blocks: int) -> bytes:
    return bytes((0x89, 0)) + lba.to_bytes(8, "big") + bytes(3) + bytes((blocks, 0, 0))


def max_caw(lu: LogicalUnit) -> int:
    page = run(lu, bytes((0x12, 1, 0xB0, 0, 64, 0))).data
    return page[5]


def supported(lu: LogicalUnit, opcode: int) -> int:
    """REPORT SUPPORTED OPERATION CODES, one command: the SUPPORT field."""
    cdb = bytes((0xA3, 0x0C, 0x01, opcode, 0, 0)) + struct.pack(">I", 64) + bytes(2)
    return run(lu, cdb).data[1] & 0x07


def test_one_sector_medium_on_512_byte_blocks(monkeypatch: Any) -> None:
    lu = memory_lu(512, 512, 512)
    assert max_caw(lu) == 1 and supported(lu, 0x89) == 3
    store = lu.backstore
    assert isinstance(store, MemoryBackstore)
    calls: list[int] = []
    medium = store.acompare_and_write

    async def counted(compare: memoryview, data: memoryview, offset: int) -> int | None:
        calls.append(offset)
        return await medium(compare, data, offset)
    monkeypatch.setattr(store, "acompare_and_write", counted)
    old, new = bytes(range(256)) * 2, b"\x5a" * 512
    assert run(lu, bytes((0x8A, 0)) + (9).to_bytes(8, "big") + (1).to_bytes(4, "big")
               + bytes(2), old).ok()
    stale = bytearray(old)
    stale[200] ^= 1
    miscompare = run(lu, caw(9, 1), bytes(stale) + new)
    assert miscompare.key == 0x0E and miscompare.information == 200
    assert run(lu, caw(9, 1), old + new).ok()
    assert calls == [9 * 512, 9 * 512]
    assert store.data[9 * 512:10 * 512] == new
    too_long = run(lu, caw(0, 2), bytes(2048))
    assert too_long.key == 0x05 and too_long.asc == 0x2400


def test_no_compare_and_write_where_no_block_is_atomic() -> None:
    lu = memory_lu(4096, 512, 512)
    assert max_caw(lu) == 0 and supported(lu, 0x89) == 1  # not supported
    result = run(lu, caw(0, 1), bytes(8192))
    assert result.key == 0x05 and result.asc == 0x2000  # INVALID COMMAND OPERATION CODE


def test_the_medium_bounds_the_advertised_length() -> None:
    assert max_caw(memory_lu(512, 1 * MiB)) == 128  # the device server's own limit
    assert max_caw(memory_lu(512, 4096, 2048)) == 4  # one boundary unit
    assert max_caw(memory_lu(4096, 1 * MiB)) == 128


def test_unmap_joins_adjacent_descriptors(monkeypatch: Any) -> None:
    lu = memory_lu(512, 512, 512)
    store = lu.backstore
    assert isinstance(store, MemoryBackstore)
    calls: list[tuple[int, int]] = []
    medium = store.adeallocate

    async def counted(offset: int, length: int) -> None:
        calls.append((offset // 512, length // 512))
        await medium(offset, length)
    monkeypatch.setattr(store, "adeallocate", counted)
    pairs = [(lba, 1) for lba in range(100, 0, -1)] + [(50, 80), (500, 3), (503, 2)]
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in pairs)
    data = struct.pack(">HH4x", 6 + len(body), len(body)) + body
    assert run(lu, struct.pack(">BB4xBHB", 0x42, 0, 0, len(data), 0), data).ok()
    assert calls == [(1, 129), (500, 5)]
