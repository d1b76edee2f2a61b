"""SANITIZE (SBC-4 4.11, 5.30): OVERWRITE and BLOCK ERASE, the parameter list, IMMED with the
progress indication, commands refused while it runs, what a reset does not stop, failure mode and
EXIT FAILURE MODE, the state a restart finds, reservations and write protection.

Expectations are written out from SBC-4 and SPC-4: CDB bytes, sense bytes, progress values."""

from __future__ import annotations

import asyncio
import json
import struct
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from pytarget.backstore.file import FileBackstore
from pytarget.core.sense import Status
from pytarget.scsi.device import LogicalUnit

from .harness import NEXUS_A, NEXUS_B, make_lu, make_task, run, run_async

BLOCKS = 8192  # 4 MiB of 512-byte blocks: four 1 MiB chunks per OVERWRITE pass
BS = 512
TUR = bytes(6)
INQUIRY = bytes((0x12, 0, 0, 0, 96, 0))
REQUEST_SENSE = bytes((0x03, 0, 0, 0, 252, 0))


def sanitize_cdb(action: int, length: int = 0, immed: bool = False, ause: bool = False) -> bytes:
    return bytes((0x48, (0x80 if immed else 0) | (0x20 if ause else 0) | action, 0, 0, 0, 0, 0,
                  length >> 8, length & 0xFF, 0))


def overwrite_list(pattern: bytes, count: int = 1, invert: bool = False, test: int = 0) -> bytes:
    return bytes(((0x80 if invert else 0) | test << 5 | count, 0)) + \
        struct.pack(">H", len(pattern)) + pattern


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def sense_fixed(key: int, asc: int, ascq: int, sks: bytes = bytes(3)) -> bytes:
    """Fixed-format sense (SPC-4 4.5.3) with no INFORMATION."""
    return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0)) + sks


@pytest.fixture
def lu(tmp_path: Path) -> LogicalUnit:
    return make_lu(tmp_path, blocks=BLOCKS,
                   sanitize_state_path=str(tmp_path / "lun0.img.sanitize.json"))


def fill(lu: LogicalUnit, byte: int) -> None:
    assert run(lu, write16(0, 2048), bytes((byte,)) * 2048 * BS).ok()
    assert run(lu, write16(BLOCKS - 2048, 2048), bytes((byte,)) * 2048 * BS).ok()


def medium(lu: LogicalUnit) -> bytes:
    result = run(lu, read16(0, BLOCKS))
    assert result.ok()
    return result.data


class Gate:
    """Holds the backstore's writes after the first `free` ones until opened."""

    def __init__(self, lu: LogicalUnit, free: int) -> None:
        assert lu.backstore is not None
        self.inner = lu.backstore.awrite
        self.free = free
        self.writes = 0
        self.opened = asyncio.Event()
        self.waiting = asyncio.Event()
        lu.backstore.awrite = self.awrite  # type: ignore[method-assign]

    async def awrite(self, data: memoryview, offset: int) -> None:
        self.writes += 1
        if self.writes > self.free:
            self.waiting.set()
            await self.opened.wait()
        await self.inner(data, offset)


def clear_ua(lu: LogicalUnit, *nexuses: Any) -> None:
    for nexus in nexuses or (NEXUS_A,):
        lu.ua.setdefault(nexus.key, deque()).clear()


# -- the rows and CDB fields

def test_report_supported_operation_codes_lists_exactly_the_actions_implemented(lu) -> None:
    def one(sa: int) -> bytes:
        cdb = bytes((0xA3, 0x0C, 0x02, 0x48)) + struct.pack(">HIBB", sa, 512, 0, 0)
        return run(lu, cdb).data
    for sa in (0x01, 0x02, 0x1F):
        # SUPPORT 011b, CDB SIZE 10, usage: IMMED and AUSE and the action, PARAMETER LIST LENGTH
        assert one(sa) == bytes((0, 0x03, 0, 10, 0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
    assert one(0x03)[:2] == bytes((0, 0x01))  # CRYPTOGRAPHIC ERASE: not supported


def test_cryptographic_erase_is_an_unsupported_service_action(lu) -> None:
    result = run(lu, sanitize_cdb(0x03))
    assert result.sense == sense_fixed(0x05, 0x24, 0x00, bytes((0xCC, 0, 1)))  # byte 1, bit 4


@pytest.mark.parametrize("action", [0x00, 0x04, 0x10, 0x1E])
def test_unknown_service_actions_are_rejected(lu, action: int) -> None:
    assert run(lu, sanitize_cdb(action)).sense == sense_fixed(0x05, 0x24, 0x00,
                                                               bytes((0xCC, 0, 1)))


# -- OVERWRITE

def test_overwrite_writes_the_pattern_in_every_block(lu) -> None:
    fill(lu, 0x61)
    result = run(lu, sanitize_cdb(0x01, BS + 4), overwrite_list(b"\xaa" * BS))
    assert result.status == Status.GOOD and result.sense is None
    assert medium(lu) == b"\xaa" * BLOCKS * BS


def test_a_short_pattern_is_repeated_to_fill_each_block(lu) -> None:
    assert run(lu, sanitize_cdb(0x01, 3 + 4), overwrite_list(b"abc")).ok()
    block = (b"abc" * 171)[:BS]  # each block starts with the pattern again
    assert medium(lu) == block * BLOCKS


def test_invert_alternates_the_pattern_between_passes(lu) -> None:
    assert run(lu, sanitize_cdb(0x01, 8), overwrite_list(b"\x0f\xf0\x00\xff", count=2,
                                                         invert=True)).ok()
    assert medium(lu) == b"\xf0\x0f\xff\x00" * (BLOCKS * BS // 4)  # two passes: inverted
    assert run(lu, sanitize_cdb(0x01, 8), overwrite_list(b"\x0f\xf0\x00\xff", count=3,
                                                         invert=True)).ok()
    assert medium(lu) == b"\x0f\xf0\x00\xff" * (BLOCKS * BS // 4)


@pytest.mark.parametrize("length", [0, 1, 4, BS + 5])
def test_parameter_list_length_outside_5_to_block_size_plus_4(lu, length: int) -> None:
    result = run(lu, sanitize_cdb(0x01, length), bytes(length))
    assert result.sense == sense_fixed(0x05, 0x24, 0x00, bytes((0xCF, 0, 7)))  # CDB byte 7


@pytest.mark.parametrize(("data", "byte", "bit"), [
    (overwrite_list(b"\xaa" * 4, count=0), 0, 4),  # OVERWRITE COUNT 0
    (overwrite_list(b"\xaa" * 4, test=1), 0, 6),  # TEST: vendor specific, none here
    (bytes((1, 0, 0, 0)) + b"\xaa" * 4, 2, 7),  # INITIALIZATION PATTERN LENGTH 0
    (bytes((1, 0, 0, 5)) + b"\xaa" * 4, 2, 7),  # longer than the list holds
])
def test_parameter_list_fields(lu, data: bytes, byte: int, bit: int) -> None:
    result = run(lu, sanitize_cdb(0x01, len(data)), data)
    assert result.sense == sense_fixed(0x05, 0x26, 0x00, bytes((0x88 | bit, 0, byte)))


# -- BLOCK ERASE

def test_block_erase_of_a_thin_lun_deallocates_everything(lu) -> None:
    fill(lu, 0x61)
    assert run(lu, sanitize_cdb(0x02)).ok()
    assert medium(lu) == bytes(BLOCKS * BS)
    status = run(lu, bytes((0x9E, 0x12)) + struct.pack(">QIBB", 0, 1024, 0, 0))
    # one descriptor: LBA 0, every block, PROVISIONING STATUS 1 (deallocated)
    assert status.data == struct.pack(">I4xQIB3x", 20, 0, BLOCKS, 1)
    assert lu.backstore is not None and lu.backstore.allocated_bytes() == 0


def test_block_erase_of_a_thick_lun_zeroes_in_place(tmp_path: Path) -> None:
    lu = make_lu(tmp_path, blocks=BLOCKS, thin=False)
    fill(lu, 0x61)
    assert run(lu, sanitize_cdb(0x02)).ok()
    assert medium(lu) == bytes(BLOCKS * BS)


def test_block_erase_takes_no_parameter_list(lu) -> None:
    result = run(lu, sanitize_cdb(0x02, 8), bytes(8))
    assert result.sense == sense_fixed(0x05, 0x24, 0x00, bytes((0xCF, 0, 7)))


def test_block_device_characteristics_say_reads_after_block_erase_succeed(lu) -> None:
    page = run(lu, bytes((0x12, 0x01, 0xB1, 0, 64, 0))).data
    assert page[7] >> 6 == 0b01  # WABEREQ
    assert page[7] >> 4 & 0x03 == 0  # WACEREQ: no CRYPTOGRAPHIC ERASE


# -- IMMED, progress, what runs during a sanitize

def test_immed_returns_at_once_and_progress_is_reported(lu) -> None:
    async def go() -> None:
        gate = Gate(lu, free=1)
        clear_ua(lu)
        result = await run_async(lu, sanitize_cdb(0x01, 8, immed=True),
                                 overwrite_list(b"\x5a" * 4))
        assert result.ok()
        await gate.waiting.wait()
        # one 1 MiB chunk of 4 MiB written: PROGRESS INDICATION 4000h of 10000h
        in_progress = sense_fixed(0x02, 0x04, 0x1B, bytes((0x80, 0x40, 0x00)))
        assert (await run_async(lu, REQUEST_SENSE)).data == in_progress
        for cdb in (TUR, read16(0, 1), write16(0, 1), bytes((0x1B, 0, 0, 0, 1, 0))):
            refused = await run_async(lu, cdb, bytes(BS) if cdb[0] == 0x8A else b"")
            assert refused.status == Status.CHECK_CONDITION and refused.sense == in_progress
        assert (await run_async(lu, INQUIRY)).ok()
        assert (await run_async(lu, bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)))).ok()
        again = await run_async(lu, sanitize_cdb(0x02))
        assert again.sense == in_progress
        gate.opened.set()
        run_ = lu.sanitize.run
        assert run_ is not None
        assert await run_.finished
        assert (await run_async(lu, TUR)).ok()
        assert (await run_async(lu, REQUEST_SENSE)).data == sense_fixed(0, 0, 0)
    asyncio.run(go())
    assert medium(lu) == b"\x5a" * BLOCKS * BS


def test_descriptor_sense_carries_the_progress_in_its_descriptor(lu) -> None:
    async def go() -> None:
        gate = Gate(lu, free=2)
        clear_ua(lu)
        assert (await run_async(lu, sanitize_cdb(0x01, 8, immed=True),
                                overwrite_list(b"\x5a" * 4))).ok()
        await gate.waiting.wait()
        sense = (await run_async(lu, bytes((0x03, 0x01, 0, 0, 252, 0)))).data
        # 72h, NOT READY, 04h/1Bh, then the sense key specific descriptor (02h): 8000h of 10000h
        assert sense == bytes((0x72, 0x02, 0x04, 0x1B, 0, 0, 0, 8,
                               0x02, 0x06, 0, 0, 0x80, 0x80, 0x00, 0))
        gate.opened.set()
        assert lu.sanitize.run is not None and await lu.sanitize.run.finished
    asyncio.run(go())


def test_aborts_and_resets_do_not_stop_a_sanitize(lu) -> None:
    fill(lu, 0x61)

    async def go() -> None:
        gate = Gate(lu, free=1)
        clear_ua(lu, NEXUS_A, NEXUS_B)
        task = make_task(lu, sanitize_cdb(0x01, 8), overwrite_list(b"\x33" * 4))
        runner = lu.start(task)
        await gate.waiting.wait()
        assert await lu.abort_task(NEXUS_A, task.tag)
        await runner
        assert task.status == Status.TASK_ABORTED
        await lu.abort_task_set(None, issuer=NEXUS_B)
        await lu.reset(NEXUS_B)
        lu.nexus_lost(NEXUS_A)
        run_ = lu.sanitize.run
        assert run_ is not None and not run_.finished.done()
        clear_ua(lu, NEXUS_B)
        refused = await run_async(lu, TUR, nexus=NEXUS_B)
        assert refused.sense is not None and refused.sense[12:14] == bytes((0x04, 0x1B))
        gate.opened.set()
        assert await run_.finished
    asyncio.run(go())
    assert medium(lu) == b"\x33" * BLOCKS * BS


def test_a_sanitize_is_a_writer_of_the_whole_medium(lu) -> None:
    seen: list[tuple[int, int]] = []
    lu.write_observers.append(lambda lba, count: seen.append((lba, count)))
    assert run(lu, sanitize_cdb(0x02)).ok()
    assert seen == [(0, BLOCKS)]


# -- failure mode

def failing_writes(lu: LogicalUnit) -> None:
    assert lu.backstore is not None

    async def awrite(data: memoryview, offset: int) -> None:
        raise OSError(5, "Input/output error")
    lu.backstore.awrite = awrite  # type: ignore[method-assign]


def test_a_failed_sanitize_leaves_failure_mode_until_exit_with_ause(lu, tmp_path: Path) -> None:
    inner = lu.backstore.awrite if lu.backstore is not None else None
    failing_writes(lu)
    failed = sense_fixed(0x03, 0x31, 0x03)
    assert run(lu, sanitize_cdb(0x01, 8, ause=True), overwrite_list(b"\x11" * 4)).sense == failed
    assert run(lu, read16(0, 1)).sense == failed
    assert run(lu, TUR).sense == failed
    assert run(lu, REQUEST_SENSE).data == failed
    assert run(lu, INQUIRY).ok()
    state = json.loads((tmp_path / "lun0.img.sanitize.json").read_text())
    assert state == {"state": "failed", "service_action": "OVERWRITE", "ause": True}
    assert run(lu, sanitize_cdb(0x1F, 8), bytes(8)).sense == \
        sense_fixed(0x05, 0x24, 0x00, bytes((0xCF, 0, 7)))
    assert run(lu, sanitize_cdb(0x1F)).ok()
    assert run(lu, read16(0, 1)).ok()
    assert not (tmp_path / "lun0.img.sanitize.json").exists()
    assert inner is not None


def test_without_ause_only_a_successful_sanitize_leaves_failure_mode(lu) -> None:
    assert lu.backstore is not None
    inner = lu.backstore.awrite
    failing_writes(lu)
    assert run(lu, sanitize_cdb(0x01, 8), overwrite_list(b"\x11" * 4)).status == \
        Status.CHECK_CONDITION
    # EXIT FAILURE MODE after a sanitize without AUSE (SBC-4 5.30.2): ILLEGAL REQUEST, the AUSE
    # and service action byte
    assert run(lu, sanitize_cdb(0x1F)).sense == sense_fixed(0x05, 0x24, 0x00,
                                                            bytes((0xCC, 0, 1)))
    lu.backstore.awrite = inner  # type: ignore[method-assign]
    assert run(lu, sanitize_cdb(0x02)).ok()
    assert run(lu, read16(0, 1)).ok()


def test_exit_failure_mode_outside_failure_mode_is_good(lu) -> None:
    assert run(lu, sanitize_cdb(0x1F)).ok()


def test_a_restart_finds_an_interrupted_sanitize_in_failure_mode(lu, tmp_path: Path) -> None:
    state_path = tmp_path / "lun0.img.sanitize.json"

    async def go() -> None:
        gate = Gate(lu, free=1)
        clear_ua(lu)
        assert (await run_async(lu, sanitize_cdb(0x01, 8, immed=True, ause=True),
                                overwrite_list(b"\x44" * 4))).ok()
        await gate.waiting.wait()
        assert json.loads(state_path.read_text()) == \
            {"state": "in-progress", "service_action": "OVERWRITE", "ause": True}
        lu.close()  # the target stops: the operation is interrupted
        await asyncio.sleep(0)
        gate.opened.set()
    asyncio.run(go())
    assert json.loads(state_path.read_text())["state"] == "in-progress"
    restarted = make_lu(tmp_path, blocks=BLOCKS, sanitize_state_path=str(state_path))
    assert run(restarted, read16(0, 1)).sense == sense_fixed(0x03, 0x31, 0x03)
    assert run(restarted, sanitize_cdb(0x1F)).ok()  # it was started with AUSE=1
    assert run(restarted, read16(0, 1)).ok() and not state_path.exists()


# -- policy

def test_reservation_conflict_and_write_protection(lu, tmp_path: Path) -> None:
    assert run(lu, bytes((0x16, 0, 0, 0, 0, 0)), nexus=NEXUS_B).ok()  # RESERVE(6)
    for cdb, data in ((sanitize_cdb(0x01, 8), overwrite_list(b"\x11" * 4)),
                      (sanitize_cdb(0x02), b""), (sanitize_cdb(0x1F), b"")):
        assert run(lu, cdb, data).status == Status.RESERVATION_CONFLICT
    (tmp_path / "ro").mkdir()
    FileBackstore.create(str(tmp_path / "ro" / "lun0.img"), BLOCKS * BS)
    readonly = make_lu(tmp_path / "ro", blocks=BLOCKS, readonly=True)
    for cdb, data in ((sanitize_cdb(0x01, 8), overwrite_list(b"\x11" * 4)),
                      (sanitize_cdb(0x02), b"")):
        result = run(readonly, cdb, data)
        assert result.sense == sense_fixed(0x07, 0x27, 0x00)  # DATA PROTECT, WRITE PROTECTED


def test_status_reports_the_state(lu) -> None:
    assert lu.sanitize.describe() == {"state": "idle", "completed": 0}
    assert run(lu, sanitize_cdb(0x02)).ok()
    assert lu.sanitize.describe() == {"state": "idle", "completed": 1}
