"""Persistent reservations driven through `LogicalUnit.execute`: every service action, the
SPC-4 5.13.1 / SBC-3 4.17 access tables, generation counting, unit attentions, SPEC_I_PT,
ALL_TG_PT, REGISTER AND MOVE, PREEMPT AND ABORT, SPC-2 RESERVE interplay and APTPL state."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from pytarget.backstore.file import FileBackstore
from pytarget.copy import commands as copy_commands
from pytarget.core.policy import Flag, Pr
from pytarget.core.sense import Asc, SenseError, SenseKey, Status
from pytarget.core.table import Opcode
from pytarget.core.task import Nexus, ScsiTask
from pytarget.scsi import pr as P
from pytarget.scsi.device import LogicalUnit, LuConfig
from pytarget.scsi.opcodes import lu_table

TARGET = "iqn.2026-11.io.pytarget:pr"
NAME_A = "iqn.2026-11.io.pytarget.test:a"
NAME_B = "iqn.2026-11.io.pytarget.test:b"
NAME_C = "iqn.2026-11.io.pytarget.test:c"
OBSERVER = "iqn.2026-11.io.pytarget.test:observer"  # reads PR state without touching UAs
ISID_1 = bytes.fromhex("23d000000001")
ISID_2 = bytes.fromhex("23d000000002")
BLOCK = 512

WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
ALL_TYPES = (WE, EA, WE_RO, EA_RO, WE_AR, EA_AR)
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE, \
    REGISTER_AND_MOVE = range(8)
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)
CONFLICT = Status.RESERVATION_CONFLICT
SBC_TABLE = lu_table(True, copy_commands.ROWS)


# ------------------------------------------------------------------------------ harness
def run_async(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))
    return wrapper


class Directory:
    def visible_luns(self, nexus: Nexus) -> list[int]:
        return [0]


class Source:
    """Data-Out already at hand, or (data None) Data-Out that never arrives."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data

    def fetch_data_out(self, task: ScsiTask, length: int) -> asyncio.Future[memoryview]:
        fut: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
        if self.data is not None:
            fut.set_result(memoryview(self.data)[:length])
        return fut


def nexus(name: str = NAME_A, isid: bytes = ISID_1, tpgt: int = 1, port: int = 1) -> Nexus:
    return Nexus(name, isid, TARGET, tpgt, port)


def make_lu(directory: Path, aptpl: bool = True, name: str = "lun0.img") -> LogicalUnit:
    path = directory / name
    if not path.exists():
        FileBackstore.create(str(path), 1 << 20)
    state = str(directory / f"{name}.pr.json") if aptpl else None
    config = LuConfig(lun=0, naa=bytes.fromhex("3000000000000001"), pr_state_path=state)
    return LogicalUnit(config, FileBackstore(str(path)), Directory())


@pytest.fixture
def lu(tmp_path: Path) -> LogicalUnit:
    return make_lu(tmp_path)


_tags = iter(range(1, 1 << 30))


async def execute(lu: LogicalUnit, n: Nexus, cdb: bytes, data: bytes | None = b"",
                  internal: bool = False) -> ScsiTask:
    while lu.take_unit_attention(n) is not None:
        pass
    task = ScsiTask(cdb, 0, next(_tags), n, expected_out=len(data or b""), source=Source(data))
    task.internal = internal
    await lu.execute(task)
    return task


def sense_of(task: ScsiTask) -> tuple[int, int, bytes]:
    assert task.status == Status.CHECK_CONDITION, task.status
    s = task.sense
    assert s is not None and s[0] & 0x7F == 0x70
    return s[2] & 0x0F, s[12] << 8 | s[13], bytes(s[15:18])


def field_pointer(in_cdb: bool, byte: int, bit: int | None) -> bytes:
    b0 = 0x80 | (0x40 if in_cdb else 0) | (0x08 | bit if bit is not None else 0)
    return bytes((b0,)) + byte.to_bytes(2, "big")


def expect_sense(task: ScsiTask, key: SenseKey, asc: Asc,
                 field: tuple[bool, int, int | None] | None = None) -> None:
    k, a, sks = sense_of(task)
    assert (SenseKey(k), Asc(a)) == (key, asc)
    if field is not None:
        assert sks == field_pointer(*field)


def prin_cdb(sa: int, alloc: int = 8192) -> bytes:
    return bytes((0x5E, sa, 0, 0, 0, 0, 0)) + alloc.to_bytes(2, "big") + b"\0"


def prout_cdb(sa: int, rtype: int = 0, scope: int = 0, length: int = 24) -> bytes:
    return bytes((0x5F, sa, scope << 4 | rtype, 0, 0)) + length.to_bytes(4, "big") + b"\0"


def params(rk: int = 0, sark: int = 0, spec_i_pt: bool = False, all_tg_pt: bool = False,
           aptpl: bool = False) -> bytes:
    flags = (0x08 if spec_i_pt else 0) | (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
    return rk.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes(4) + bytes((flags, 0, 0, 0))


def tid(name: str, isid: bytes | None) -> bytes:
    return P.encode_transport_id(P.InitiatorPort(name, isid))


def spec_i_pt_list(rk: int, sark: int, tids: list[bytes], all_tg_pt: bool = False) -> bytes:
    body = b"".join(tids)
    return params(rk, sark, spec_i_pt=True, all_tg_pt=all_tg_pt)[:24] + \
        len(body).to_bytes(4, "big") + body


def move_list(rk: int, sark: int, transport_id: bytes, rtpi: int = 1, unreg: bool = False,
              aptpl: bool = False) -> bytes:
    flags = (0x02 if unreg else 0) | (0x01 if aptpl else 0)
    return rk.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes((0, flags)) + \
        rtpi.to_bytes(2, "big") + len(transport_id).to_bytes(4, "big") + transport_id


async def prout(lu: LogicalUnit, n: Nexus, sa: int, data: bytes, rtype: int = 0,
                scope: int = 0) -> ScsiTask:
    return await execute(lu, n, prout_cdb(sa, rtype, scope, len(data)), data)


async def register(lu: LogicalUnit, n: Nexus, key: int, aptpl: bool = False,
                   all_tg_pt: bool = False) -> None:
    task = await prout(lu, n, REGISTER_IGNORE, params(0, key, aptpl=aptpl, all_tg_pt=all_tg_pt))
    assert task.status == Status.GOOD, task.sense


async def reserve(lu: LogicalUnit, n: Nexus, key: int, rtype: int) -> ScsiTask:
    return await prout(lu, n, RESERVE, params(key), rtype)


async def prin(lu: LogicalUnit, n: Nexus, sa: int, alloc: int = 8192) -> bytes:
    task = await execute(lu, n, prin_cdb(sa, alloc))
    assert task.status == Status.GOOD, task.sense
    return bytes(task.data_in or b"")


async def read_keys(lu: LogicalUnit, n: Nexus | None = None) -> tuple[int, list[int]]:
    data = await prin(lu, n or nexus(OBSERVER), READ_KEYS)
    generation, length = struct.unpack_from(">II", data)
    assert length == len(data) - 8
    return generation, [int.from_bytes(data[i:i + 8], "big") for i in range(8, len(data), 8)]


async def read_reservation(lu: LogicalUnit) -> tuple[int, int] | None:
    data = await prin(lu, nexus(OBSERVER), READ_RESERVATION)
    if struct.unpack_from(">I", data, 4)[0] == 0:
        return None
    return int.from_bytes(data[8:16], "big"), data[21]


def parse_full_status(data: bytes) -> list[dict[str, Any]]:
    generation, length = struct.unpack_from(">II", data)
    assert length == len(data) - 8
    out = []
    at = 8
    while at < len(data):
        tid_len = struct.unpack_from(">I", data, at + 20)[0]
        transport_id = data[at + 24:at + 24 + tid_len]
        text = transport_id[4:].split(b"\0")[0].decode()
        out.append({"key": int.from_bytes(data[at:at + 8], "big"),
                    "all_tg_pt": bool(data[at + 12] & 2), "holder": bool(data[at + 12] & 1),
                    "scope_type": data[at + 13],
                    "rtpi": struct.unpack_from(">H", data, at + 18)[0],
                    "format": transport_id[0] >> 6, "protocol": transport_id[0] & 0x0F,
                    "tid_length": struct.unpack_from(">H", transport_id, 2)[0] + 4,
                    "port": text})
        at += 24 + tid_len
    return out


def pending_uas(lu: LogicalUnit, n: Nexus) -> list[Asc]:
    return list(lu.ua.get(n.key, ()))


def read10(lba: int = 1) -> bytes:
    return bytes((0x28, 0)) + lba.to_bytes(4, "big") + bytes((0, 0, 1, 0))


def write10(lba: int = 1) -> bytes:
    return bytes((0x2A, 0)) + lba.to_bytes(4, "big") + bytes((0, 0, 1, 0))


# -------------------------------------------------------------------------- PERSISTENT RESERVE IN
@run_async
async def test_read_keys_empty_and_truncated(lu: LogicalUnit) -> None:
    assert await read_keys(lu) == (0, [])
    await register(lu, nexus(NAME_A), 0xA1)
    await register(lu, nexus(NAME_B), 0xB2)
    data = await prin(lu, nexus(NAME_A), READ_KEYS, alloc=8)
    assert data == struct.pack(">II", 2, 16)  # ADDITIONAL LENGTH is not cut to fit


@run_async
async def test_report_capabilities(lu: LogicalUnit) -> None:
    data = await prin(lu, nexus(), REPORT_CAPABILITIES)
    # LENGTH 8; CRH 0, SIP_C, ATP_C, PTPL_C; TMV, ALLOW COMMANDS 011b, PTPL_A 0; all six types
    assert data == bytes((0, 8, 0x0D, 0xB0, 0xEA, 0x01, 0, 0))
    await register(lu, nexus(), 1, aptpl=True)
    assert (await prin(lu, nexus(), REPORT_CAPABILITIES))[3] == 0xB1  # PTPL_A


@run_async
async def test_report_capabilities_without_state_file(tmp_path: Path) -> None:
    lu = make_lu(tmp_path, aptpl=False)
    data = await prin(lu, nexus(), REPORT_CAPABILITIES)
    assert data[2] == 0x0C  # no PTPL_C
    task = await prout(lu, nexus(), REGISTER, params(0, 1, aptpl=True))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 20, 0))


@pytest.mark.parametrize("sa", [4, 5, 0x10, 0x1F])
@run_async
async def test_prin_unsupported_service_action(lu: LogicalUnit, sa: int) -> None:
    task = await execute(lu, nexus(), prin_cdb(sa))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, (True, 1, 4))


@run_async
async def test_read_reservation_and_full_status(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B, ISID_2)
    await register(lu, a, 0xA1)
    await register(lu, b, 0xB2, all_tg_pt=True)
    assert await read_reservation(lu) is None
    assert (await reserve(lu, a, 0xA1, EA_RO)).status == Status.GOOD
    assert await read_reservation(lu) == (0xA1, EA_RO)
    status = parse_full_status(await prin(lu, a, READ_FULL_STATUS))
    assert status == [
        {"key": 0xA1, "all_tg_pt": False, "holder": True, "scope_type": EA_RO, "rtpi": 1,
         "format": 1, "protocol": 5, "tid_length": 52, "port": f"{NAME_A},i,0x23d000000001"},
        {"key": 0xB2, "all_tg_pt": True, "holder": False, "scope_type": 0, "rtpi": 1,
         "format": 1, "protocol": 5, "tid_length": 52, "port": f"{NAME_B},i,0x23d000000002"},
    ]


@run_async
async def test_all_registrants_reservation_reports_key_zero(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA1)
    await register(lu, b, 0xB2)
    assert (await reserve(lu, a, 0xA1, WE_AR)).status == Status.GOOD
    assert await read_reservation(lu) == (0, WE_AR)
    status = parse_full_status(await prin(lu, a, READ_FULL_STATUS))
    assert [(s["holder"], s["scope_type"]) for s in status] == [(True, WE_AR), (True, WE_AR)]


# ------------------------------------------------------------------------------ REGISTER
@run_async
async def test_register_reregister_and_unregister(lu: LogicalUnit) -> None:
    a = nexus()
    assert (await prout(lu, a, REGISTER, params(0, 0x11))).status == Status.GOOD
    assert await read_keys(lu) == (1, [0x11])
    # libiscsi ProutRegister.Simple: RK 0 from a registered nexus conflicts
    assert (await prout(lu, a, REGISTER, params(0, 0x12))).status == CONFLICT
    assert (await prout(lu, a, REGISTER, params(0x99, 0x12))).status == CONFLICT
    assert (await prout(lu, a, REGISTER, params(0x11, 0x12))).status == Status.GOOD
    assert await read_keys(lu) == (2, [0x12])
    assert (await prout(lu, a, REGISTER, params(0x12, 0))).status == Status.GOOD
    assert await read_keys(lu) == (3, [])


@run_async
async def test_register_from_unregistered_nexus(lu: LogicalUnit) -> None:
    a = nexus()
    assert (await prout(lu, a, REGISTER, params(0x5, 0x6))).status == CONFLICT
    assert (await prout(lu, a, REGISTER, params(0, 0))).status == Status.GOOD  # does nothing
    assert (await prout(lu, a, REGISTER_IGNORE, params(0x77, 0))).status == Status.GOOD
    assert await read_keys(lu) == (0, [])


@run_async
async def test_register_and_ignore_existing_key(lu: LogicalUnit) -> None:
    a = nexus()
    await register(lu, a, 0x1)
    assert (await prout(lu, a, REGISTER_IGNORE, params(0xDEAD, 0x2))).status == Status.GOOD
    assert await read_keys(lu) == (2, [0x2])
    assert (await prout(lu, a, REGISTER_IGNORE, params(0xDEAD, 0))).status == Status.GOOD
    assert await read_keys(lu) == (3, [])


@run_async
async def test_same_key_on_many_nexuses(lu: LogicalUnit) -> None:
    await register(lu, nexus(NAME_A), 0x5)
    await register(lu, nexus(NAME_B), 0x5)
    assert (await read_keys(lu))[1] == [0x5, 0x5]


@run_async
async def test_nexus_identity(lu: LogicalUnit) -> None:
    a = nexus(NAME_A, ISID_1)
    await register(lu, a, 0xA)
    assert (await reserve(lu, a, 0xA, WE)).status == Status.GOOD
    relogin_same_isid = Nexus(NAME_A.upper(), ISID_1, TARGET.upper(), 1, 1)
    assert lu.pr.registration(relogin_same_isid) is not None
    new_isid = nexus(NAME_A, ISID_2)
    assert lu.pr.registration(new_isid) is None
    assert (await execute(lu, new_isid, write10(), bytes(BLOCK))).status == CONFLICT
    other_port = nexus(NAME_A, ISID_1, tpgt=2)
    assert lu.pr.registration(other_port) is None
    # logout, I_T nexus loss and resets leave registrations and the reservation alone
    lu.nexus_lost(a)
    await lu.reset(a)
    assert await read_keys(lu) == (1, [0xA])
    assert await read_reservation(lu) == (0xA, WE)
    assert (await execute(lu, relogin_same_isid, write10(), bytes(BLOCK))).status == Status.GOOD


@run_async
async def test_insufficient_registration_resources(lu: LogicalUnit,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_REGISTRATIONS", 2)
    await register(lu, nexus(NAME_A), 1)
    await register(lu, nexus(NAME_B), 2)
    task = await prout(lu, nexus(NAME_C), REGISTER, params(0, 3))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INSUFFICIENT_REGISTRATION_RESOURCES)
    assert await read_keys(lu) == (2, [1, 2])


# ------------------------------------------------------------------------------ parameter list
@run_async
async def test_parameter_list_length_errors(lu: LogicalUnit) -> None:
    a = nexus()
    for length in (0, 8, 23, 25, 32):
        data = params(0, 1) + bytes(max(0, length - 24))
        task = await execute(lu, a, prout_cdb(REGISTER, length=length), data[:length])
        expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    task = await execute(lu, a, prout_cdb(REGISTER, length=P.limits.MAX_PARAMETER_LIST + 1))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, (True, 5, 7))
    assert await read_keys(lu) == (0, [])


@pytest.mark.parametrize("flags,bit", [(0x80, 7), (0x10, 4), (0x02, 1)])
@run_async
async def test_reserved_bits_in_parameter_list(lu: LogicalUnit, flags: int, bit: int) -> None:
    data = bytearray(params(0, 1))
    data[20] |= flags
    task = await prout(lu, nexus(), REGISTER, bytes(data))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 20, bit))


@pytest.mark.parametrize("sa", [RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT,
                                REGISTER_IGNORE])
@run_async
async def test_spec_i_pt_only_with_register(lu: LogicalUnit, sa: int) -> None:
    await register(lu, nexus(), 1)
    task = await prout(lu, nexus(), sa, spec_i_pt_list(1, 2, [tid(NAME_B, ISID_1)]), WE)
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 20, 3))


@pytest.mark.parametrize("sa", [RESERVE, PREEMPT, PREEMPT_AND_ABORT])
@pytest.mark.parametrize("rtype", [0, 2, 4, 9, 15])
@run_async
async def test_unsupported_type(lu: LogicalUnit, sa: int, rtype: int) -> None:
    await register(lu, nexus(), 1)
    task = await prout(lu, nexus(), sa, params(1, 1), rtype)
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, (True, 2, 3))


@pytest.mark.parametrize("sa", [RESERVE, RELEASE, PREEMPT, PREEMPT_AND_ABORT])
@run_async
async def test_scope_other_than_lu(lu: LogicalUnit, sa: int) -> None:
    await register(lu, nexus(), 1)
    task = await prout(lu, nexus(), sa, params(1, 1), WE, scope=2)
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, (True, 2, 7))


# ------------------------------------------------------------------------------ RESERVE / RELEASE
@run_async
async def test_reserve_rules(lu: LogicalUnit) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    assert (await reserve(lu, c, 0, WE)).status == CONFLICT  # not registered
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await reserve(lu, a, 0xB, WE)).status == CONFLICT  # not its key
    generation = (await read_keys(lu))[0]
    assert (await reserve(lu, a, 0xA, WE)).status == Status.GOOD
    assert (await reserve(lu, a, 0xA, WE)).status == Status.GOOD  # same type: no change
    assert (await reserve(lu, a, 0xA, EA)).status == CONFLICT  # holder changing type
    assert (await reserve(lu, b, 0xB, WE)).status == CONFLICT  # another holder
    assert await read_reservation(lu) == (0xA, WE)
    assert (await read_keys(lu))[0] == generation  # RESERVE never counts


@run_async
async def test_all_registrants_share_the_reservation(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await reserve(lu, a, 0xA, EA_AR)).status == Status.GOOD
    assert (await reserve(lu, b, 0xB, EA_AR)).status == Status.GOOD  # b holds it too
    assert (await reserve(lu, b, 0xB, WE_AR)).status == CONFLICT
    assert (await prout(lu, b, RELEASE, params(0xB), EA_AR)).status == Status.GOOD
    assert await read_reservation(lu) is None
    assert pending_uas(lu, a) == [Asc.RESERVATIONS_RELEASED]


@run_async
async def test_release_rules(lu: LogicalUnit) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    assert (await prout(lu, c, RELEASE, params(0), WE)).status == CONFLICT
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await prout(lu, a, RELEASE, params(0xA), WE)).status == Status.GOOD  # none held
    assert (await reserve(lu, a, 0xA, WE)).status == Status.GOOD
    generation = (await read_keys(lu))[0]
    assert (await prout(lu, a, RELEASE, params(0xB), WE)).status == CONFLICT
    assert (await prout(lu, b, RELEASE, params(0xB), WE)).status == Status.GOOD  # not holder
    assert await read_reservation(lu) == (0xA, WE)
    task = await prout(lu, a, RELEASE, params(0xA), EA)
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    assert (await prout(lu, a, RELEASE, params(0xA), WE)).status == Status.GOOD
    assert await read_reservation(lu) is None
    assert await read_keys(lu) == (generation, [0xA, 0xB])  # registrations stay, no count


@pytest.mark.parametrize("rtype,ua", [(WE, False), (EA, False), (WE_RO, True), (EA_RO, True),
                                      (WE_AR, True), (EA_AR, True)])
@run_async
async def test_release_unit_attentions(lu: LogicalUnit, rtype: int, ua: bool) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    await execute(lu, c, bytes(6))
    assert (await reserve(lu, a, 0xA, rtype)).status == Status.GOOD
    assert (await prout(lu, a, RELEASE, params(0xA), rtype)).status == Status.GOOD
    assert pending_uas(lu, b) == ([Asc.RESERVATIONS_RELEASED] if ua else [])
    assert pending_uas(lu, a) == []
    assert pending_uas(lu, c) == []  # not registered


# ------------------------------------------------------------------------------ unregistering
@pytest.mark.parametrize("rtype", ALL_TYPES)
@run_async
async def test_holder_unregisters(lu: LogicalUnit, rtype: int) -> None:
    """libiscsi ProutReserve.Ownership*: the reservation goes with a single holder; an All
    Registrants reservation stays while another registrant remains, with no UA."""
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    await execute(lu, c, bytes(6))
    assert (await reserve(lu, a, 0xA, rtype)).status == Status.GOOD
    assert (await prout(lu, a, REGISTER, params(0xA, 0))).status == Status.GOOD
    ro = rtype in (WE_RO, EA_RO)
    ar = rtype in (WE_AR, EA_AR)
    assert await read_reservation(lu) == ((0, rtype) if ar else None)
    assert pending_uas(lu, b) == ([Asc.RESERVATIONS_RELEASED] if ro else [])
    assert pending_uas(lu, c) == []
    if ar:
        assert (await prout(lu, b, RELEASE, params(0xB), rtype)).status == Status.GOOD
        assert await read_reservation(lu) is None


@run_async
async def test_last_all_registrants_holder_unregisters(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await reserve(lu, a, 0xA, WE_AR)).status == Status.GOOD
    await prout(lu, b, REGISTER, params(0xB, 0))
    assert await read_reservation(lu) == (0, WE_AR)
    await prout(lu, a, REGISTER, params(0xA, 0))
    assert await read_reservation(lu) is None
    assert pending_uas(lu, a) == pending_uas(lu, b) == []


@run_async
async def test_non_holder_unregisters_without_unit_attention(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await reserve(lu, a, 0xA, EA_RO)).status == Status.GOOD
    assert (await prout(lu, b, REGISTER, params(0xB, 0))).status == Status.GOOD
    assert pending_uas(lu, a) == []
    assert await read_reservation(lu) == (0xA, EA_RO)


@run_async
async def test_holder_changes_key_and_keeps_reservation(lu: LogicalUnit) -> None:
    a = nexus()
    await register(lu, a, 0xA)
    assert (await reserve(lu, a, 0xA, EA)).status == Status.GOOD
    assert (await prout(lu, a, REGISTER, params(0xA, 0xAA))).status == Status.GOOD
    assert await read_reservation(lu) == (0xAA, EA)


# ------------------------------------------------------------------------------ CLEAR
@run_async
async def test_clear(lu: LogicalUnit) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    await execute(lu, c, bytes(6))
    assert (await prout(lu, c, CLEAR, params(0))).status == CONFLICT
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await reserve(lu, b, 0xB, EA)).status == Status.GOOD
    generation = (await read_keys(lu))[0]
    assert (await prout(lu, a, CLEAR, params(0xB))).status == CONFLICT
    assert (await prout(lu, a, CLEAR, params(0xA))).status == Status.GOOD
    assert await read_keys(lu) == (generation + 1, [])
    assert await read_reservation(lu) is None
    assert pending_uas(lu, b) == [Asc.RESERVATIONS_PREEMPTED]
    assert pending_uas(lu, a) == pending_uas(lu, c) == []


# ------------------------------------------------------------------------------ PREEMPT
@run_async
async def test_preempt_without_reservation_removes_registrations(lu: LogicalUnit) -> None:
    """libiscsi ProutPreempt.RemoveRegistration."""
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    generation = (await read_keys(lu))[0]
    assert (await prout(lu, b, PREEMPT, params(0xB, 0xA), EA)).status == Status.GOOD
    assert await read_keys(lu) == (generation + 1, [0xB])
    assert await read_reservation(lu) is None
    assert pending_uas(lu, a) == [Asc.REGISTRATIONS_PREEMPTED]
    assert pending_uas(lu, b) == []


@run_async
async def test_preempt_errors(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    assert (await prout(lu, a, PREEMPT, params(0, 0xB), WE)).status == CONFLICT
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    generation = (await read_keys(lu))[0]
    assert (await prout(lu, a, PREEMPT, params(0xB, 0xB), WE)).status == CONFLICT  # not its key
    assert (await prout(lu, a, PREEMPT, params(0xA, 0x77), WE)).status == CONFLICT  # no such key
    task = await prout(lu, a, PREEMPT, params(0xA, 0), WE)
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 8, 7))
    assert (await reserve(lu, b, 0xB, WE)).status == Status.GOOD
    task = await prout(lu, a, PREEMPT, params(0xA, 0), WE)
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 8, 7))
    assert (await read_keys(lu))[0] == generation


@pytest.mark.parametrize("new_type", [WE, EA_RO])
@run_async
async def test_preempt_the_holder(lu: LogicalUnit, new_type: int) -> None:
    a, b, c, d = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C), nexus(NAME_C, ISID_2)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    await register(lu, c, 0xB)  # shares the holder's key: preempted with it
    await register(lu, d, 0xD)
    assert (await reserve(lu, b, 0xB, WE)).status == Status.GOOD
    generation = (await read_keys(lu))[0]
    assert (await prout(lu, a, PREEMPT, params(0xA, 0xB), new_type)).status == Status.GOOD
    assert await read_keys(lu) == (generation + 1, [0xA, 0xD])
    assert await read_reservation(lu) == (0xA, new_type)
    assert pending_uas(lu, b) == pending_uas(lu, c) == [Asc.REGISTRATIONS_PREEMPTED]
    assert pending_uas(lu, d) == ([Asc.RESERVATIONS_RELEASED] if new_type != WE else [])
    assert pending_uas(lu, a) == []


@run_async
async def test_holder_preempts_itself_to_change_type(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await reserve(lu, a, 0xA, WE)).status == Status.GOOD
    assert (await prout(lu, a, PREEMPT, params(0xA, 0xA), EA)).status == Status.GOOD
    assert await read_reservation(lu) == (0xA, EA)
    assert (await read_keys(lu))[1] == [0xA, 0xB]
    assert pending_uas(lu, b) == [Asc.RESERVATIONS_RELEASED]


@run_async
async def test_preempt_non_holder_key_keeps_reservation(lu: LogicalUnit) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    for n, k in ((a, 0xA), (b, 0xB), (c, 0xC)):
        await register(lu, n, k)
    assert (await reserve(lu, a, 0xA, WE_RO)).status == Status.GOOD
    assert (await prout(lu, b, PREEMPT, params(0xB, 0xC), EA)).status == Status.GOOD
    assert await read_reservation(lu) == (0xA, WE_RO)  # TYPE ignored: only registrations go
    assert (await read_keys(lu))[1] == [0xA, 0xB]
    assert pending_uas(lu, c) == [Asc.REGISTRATIONS_PREEMPTED]
    assert pending_uas(lu, a) == []


@run_async
async def test_preempt_all_registrants_with_zero_key(lu: LogicalUnit) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    for n, k in ((a, 0xA), (b, 0xB), (c, 0xC)):
        await register(lu, n, k)
    assert (await reserve(lu, a, 0xA, EA_AR)).status == Status.GOOD
    assert (await prout(lu, b, PREEMPT, params(0xB, 0), WE)).status == Status.GOOD
    assert (await read_keys(lu))[1] == [0xB]
    assert await read_reservation(lu) == (0xB, WE)
    assert pending_uas(lu, a) == pending_uas(lu, c) == [Asc.REGISTRATIONS_PREEMPTED]


@run_async
async def test_preempt_all_registrants_with_a_key(lu: LogicalUnit) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    for n, k in ((a, 0xA), (b, 0xB), (c, 0xC)):
        await register(lu, n, k)
    assert (await reserve(lu, a, 0xA, WE_AR)).status == Status.GOOD
    assert (await prout(lu, b, PREEMPT, params(0xB, 0xA), EA)).status == Status.GOOD
    assert (await read_keys(lu))[1] == [0xB, 0xC]
    assert await read_reservation(lu) == (0, WE_AR)
    assert pending_uas(lu, a) == [Asc.REGISTRATIONS_PREEMPTED]
    assert pending_uas(lu, c) == []


@run_async
async def test_preempt_and_abort_ends_the_preempted_tasks(lu: LogicalUnit) -> None:
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    for n in (a, b, c):
        while lu.take_unit_attention(n) is not None:
            pass
    assert (await reserve(lu, a, 0xA, WE_RO)).status == Status.GOOD
    # Writes that wait for Data-Out which never comes
    victims = [ScsiTask(write10(), 0, 1000 + i, a, expected_out=BLOCK, source=Source(None))
               for i in range(2)]
    bystander = ScsiTask(write10(), 0, 2000, c, expected_out=BLOCK, source=Source(None))
    mine = ScsiTask(write10(), 0, 3000, b, expected_out=BLOCK, source=Source(None))
    runners = [lu.start(t) for t in (*victims, bystander, mine)]
    await asyncio.sleep(0)
    assert bystander.status == CONFLICT  # c is not registered
    data = params(0xB, 0xA)
    task = ScsiTask(prout_cdb(PREEMPT_AND_ABORT, EA, length=24), 0, 4000, b, expected_out=24,
                    source=Source(data))
    await lu.start(task)
    assert task.status == Status.GOOD, task.sense
    for victim, runner in zip(victims, runners, strict=False):
        assert runner.done() and victim.aborted and victim.status == Status.TASK_ABORTED
    assert not runners[3].done() and not mine.aborted
    assert await read_reservation(lu) == (0xB, EA)
    assert pending_uas(lu, a) == [Asc.REGISTRATIONS_PREEMPTED,
                                  Asc.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR]
    assert pending_uas(lu, b) == []
    runners[3].cancel()
    await asyncio.gather(runners[3], return_exceptions=True)


@run_async
async def test_preempt_keeps_tasks(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    victim = ScsiTask(write10(), 0, 77, a, expected_out=BLOCK, source=Source(None))
    while lu.take_unit_attention(a) is not None:
        pass
    runner = lu.start(victim)
    await asyncio.sleep(0)
    assert (await prout(lu, b, PREEMPT, params(0xB, 0xA), EA)).status == Status.GOOD
    assert not runner.done() and not victim.aborted
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


# ------------------------------------------------------------------------------ access tables
# (type) -> expected for a nexus that is registered but not the reserving one / not registered
# READ and WRITE as libiscsi ProutReserve.Access* checks them (SPC-4 5.13.1, SBC-3 4.17).
ACCESS = {
    EA: {"reg": (False, False), "unreg": (False, False)},
    WE: {"reg": (True, False), "unreg": (True, False)},
    EA_RO: {"reg": (True, True), "unreg": (False, False)},
    WE_RO: {"reg": (True, True), "unreg": (True, False)},
    EA_AR: {"reg": (True, True), "unreg": (False, False)},
    WE_AR: {"reg": (True, True), "unreg": (True, False)},
}

COMMANDS: list[tuple[str, bytes, bytes, str]] = [
    # name, CDB, Data-Out, class in SPC-4 table 56 / SBC-3 table 13
    ("READ(10)", read10(), b"", "read"),
    ("VERIFY(10)", bytes((0x2F, 0, 0, 0, 0, 1, 0, 0, 1, 0)), b"", "read"),
    ("PRE-FETCH(10)", bytes((0x34, 0, 0, 0, 0, 1, 0, 0, 1, 0)), b"", "read"),
    ("READ DEFECT DATA(10)", bytes((0x37, 0, 0, 0, 0, 0, 0, 0, 8, 0)), b"", "read"),
    ("MODE SENSE(6)", bytes((0x1A, 0, 0x3F, 0, 255, 0)), b"", "read"),
    ("REPORT SUPPORTED OPERATION CODES", bytes((0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)),
     b"", "read"),
    ("WRITE(10)", write10(), bytes(BLOCK), "write"),
    ("WRITE AND VERIFY(10)", bytes((0x2E, 0, 0, 0, 0, 1, 0, 0, 1, 0)), bytes(BLOCK), "write"),
    ("SYNCHRONIZE CACHE(10)", bytes((0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0)), b"", "write"),
    ("MODE SELECT(6)", bytes((0x15, 0x10, 0, 0, 0, 0)), b"", "write"),
    ("PREVENT MEDIUM REMOVAL", bytes((0x1E, 0, 0, 0, 1, 0)), b"", "write"),
    ("ALLOW MEDIUM REMOVAL", bytes((0x1E, 0, 0, 0, 0, 0)), b"", "allowed"),
    ("START STOP UNIT (start)", bytes((0x1B, 0, 0, 0, 1, 0)), b"", "allowed"),
    ("TEST UNIT READY", bytes(6), b"", "allowed"),
    ("INQUIRY", bytes((0x12, 0, 0, 0, 36, 0)), b"", "allowed"),
    ("READ CAPACITY(10)", bytes((0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0)), b"", "allowed"),
    ("READ CAPACITY(16)", bytes((0x9E, 0x10)) + bytes(8) + (32).to_bytes(4, "big") + bytes(2),
     b"", "allowed"),
    ("REPORT LUNS", bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0)), b"", "allowed"),
    ("REQUEST SENSE", bytes((0x03, 0, 0, 0, 18, 0)), b"", "allowed"),
    ("PERSISTENT RESERVE IN", prin_cdb(READ_KEYS), b"", "allowed"),
    ("START STOP UNIT (stop)", bytes((0x1B, 0, 0, 0, 0, 0)), b"", "write"),  # last: stops
]


def expected_allowed(rtype: int, who: str, cls: str) -> bool:
    if who == "holder" or cls == "allowed":
        return True
    read_ok, write_ok = ACCESS[rtype][who]
    return read_ok if cls == "read" else write_ok


@pytest.mark.parametrize("who", ["holder", "reg", "unreg"])
@pytest.mark.parametrize("rtype", ALL_TYPES)
@run_async
async def test_access_table(lu: LogicalUnit, rtype: int, who: str) -> None:
    holder, registered, stranger = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    await register(lu, holder, 0xA)
    await register(lu, registered, 0xB)
    assert (await reserve(lu, holder, 0xA, rtype)).status == Status.GOOD
    n = {"holder": holder, "reg": registered, "unreg": stranger}[who]
    for name, cdb, data, cls in COMMANDS:
        task = await execute(lu, n, cdb, data)
        allowed = expected_allowed(rtype, who, cls)
        assert (task.status != CONFLICT) == allowed, (name, task.status, task.sense)


@pytest.mark.parametrize("rtype", ALL_TYPES)
@run_async
async def test_internal_commands_checked_against_requesting_nexus(lu: LogicalUnit,
                                                                  rtype: int) -> None:
    holder, stranger = nexus(NAME_A), nexus(NAME_C)
    await register(lu, holder, 0xA)
    assert (await reserve(lu, holder, 0xA, rtype)).status == Status.GOOD
    for n, who in ((holder, "holder"), (stranger, "unreg")):
        for cdb, data, cls in ((read10(), b"", "read"), (write10(), bytes(BLOCK), "write")):
            task = await execute(lu, n, cdb, data, internal=True)
            assert (task.status != CONFLICT) == expected_allowed(rtype, who, cls)


@run_async
async def test_no_reservation_no_conflict(lu: LogicalUnit) -> None:
    await register(lu, nexus(NAME_A), 0xA)
    task = await execute(lu, nexus(NAME_C), write10(), bytes(BLOCK))
    assert task.status == Status.GOOD


def test_table_rows_match_report_capabilities() -> None:
    """ALLOW COMMANDS 011b promises these pass Write Exclusive reservations; block writers
    must conflict."""
    read_class = {Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10, Opcode.READ_DEFECT_DATA_10,
                  Opcode.READ_DEFECT_DATA_12, Opcode.RECEIVE_COPY_RESULTS}
    for spec in SBC_TABLE.specs:
        if spec.opcode in read_class or (spec.opcode == Opcode.MAINTENANCE_IN
                                         and spec.sa in (0x0C, 0x0D)):
            assert spec.pr is Pr.READ, spec.name
        if spec.flags & Flag.WRITES:
            assert spec.pr is Pr.WRITE, spec.name
        if spec.opcode in (Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT):
            assert spec.pr is Pr.PR and spec.flags & Flag.CONFLICTS_SPC2, spec.name
        if spec.opcode in (Opcode.TEST_UNIT_READY, Opcode.INQUIRY, Opcode.REPORT_LUNS,
                           Opcode.REQUEST_SENSE, Opcode.READ_CAPACITY_10):
            assert spec.pr is Pr.ALLOWED, spec.name


# -------------------------------------------------------------------------- SPEC_I_PT / ALL_TG_PT
@run_async
async def test_spec_i_pt_registers_transport_ids(lu: LogicalUnit) -> None:
    a = nexus(NAME_A)
    tids = [tid(NAME_B, ISID_2), tid(NAME_C, None), tid(NAME_A, ISID_1), tid(NAME_B, ISID_2)]
    task = await prout(lu, a, REGISTER, spec_i_pt_list(0, 0x5, tids))
    assert task.status == Status.GOOD, task.sense
    assert await read_keys(lu) == (1, [0x5, 0x5, 0x5])  # itself and duplicates count once
    assert lu.pr.registration(nexus(NAME_B, ISID_2)) is not None
    assert lu.pr.registration(nexus(NAME_B, ISID_1)) is None
    assert lu.pr.registration(nexus(NAME_C, ISID_1)) is not None  # node: every ISID
    assert lu.pr.registration(nexus(NAME_C, ISID_2)) is not None
    status = parse_full_status(await prin(lu, a, READ_FULL_STATUS))
    assert [(s["format"], s["port"]) for s in status] == [
        (1, f"{NAME_A},i,0x23d000000001"), (1, f"{NAME_B},i,0x23d000000002"), (0, NAME_C)]
    # a TransportID-registered nexus uses its registration like any other
    c2 = nexus(NAME_C, ISID_2)
    assert (await reserve(lu, c2, 0x5, EA)).status == Status.GOOD
    assert (await execute(lu, c2, write10(), bytes(BLOCK))).status == Status.GOOD
    assert (await execute(lu, a, read10())).status == CONFLICT


@run_async
async def test_spec_i_pt_skips_registered_nexuses(lu: LogicalUnit) -> None:
    await register(lu, nexus(NAME_B, ISID_2), 0xB)
    task = await prout(lu, nexus(NAME_A), REGISTER,
                       spec_i_pt_list(0, 0x5, [tid(NAME_B, None), tid(NAME_C, ISID_1)]))
    assert task.status == Status.GOOD
    assert (await read_keys(lu))[1] == [0xB, 0x5, 0x5]


@run_async
async def test_spec_i_pt_errors(lu: LogicalUnit, monkeypatch: pytest.MonkeyPatch) -> None:
    a = nexus(NAME_A)

    async def expect(data: bytes, asc: Asc, field: tuple[bool, int, int | None] | None) -> None:
        task = await prout(lu, a, REGISTER, data)
        expect_sense(task, SenseKey.ILLEGAL_REQUEST, asc, field)
        assert await read_keys(lu) == (0, [])

    good = tid(NAME_B, ISID_1)
    fc = bytes((0x00, 0)) + good[2:]  # Fibre Channel protocol identifier
    await expect(spec_i_pt_list(0, 5, [fc]), Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 28, 3))
    bad_format = bytes((0x85,)) + good[1:]
    await expect(spec_i_pt_list(0, 5, [good, bad_format]), Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 28 + len(good), 7))
    short_length = good[:2] + (16).to_bytes(2, "big") + good[4:20]
    await expect(spec_i_pt_list(0, 5, [short_length]), Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 30, 7))
    no_separator = P.encode_transport_id(P.InitiatorPort(NAME_B, None))
    no_separator = bytes((0x45,)) + no_separator[1:]
    await expect(spec_i_pt_list(0, 5, [no_separator]), Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 32, 7))
    bad_isid = tid(NAME_B, ISID_1).replace(b"23d000000001", b"23d00000000g")
    await expect(spec_i_pt_list(0, 5, [bad_isid]), Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 32 + len(NAME_B) + 5, 7))
    truncated = spec_i_pt_list(0, 5, [good])[:-4]
    truncated = truncated[:24] + (len(good) - 4).to_bytes(4, "big") + truncated[28:]
    await expect(truncated, Asc.PARAMETER_LIST_LENGTH_ERROR, None)
    beyond = spec_i_pt_list(0, 5, [good])
    beyond = beyond[:24] + (len(good) + 4).to_bytes(4, "big") + beyond[28:]
    await expect(beyond, Asc.PARAMETER_LIST_LENGTH_ERROR, None)
    await expect(params(0, 5, spec_i_pt=True), Asc.PARAMETER_LIST_LENGTH_ERROR, None)
    monkeypatch.setattr(P, "MAX_REGISTRATIONS", 2)
    await expect(spec_i_pt_list(0, 5, [good, tid(NAME_C, ISID_1)]),
                 Asc.INSUFFICIENT_REGISTRATION_RESOURCES, None)


@run_async
async def test_spec_i_pt_from_registered_nexus(lu: LogicalUnit) -> None:
    a = nexus(NAME_A)
    await register(lu, a, 0xA)
    task = await prout(lu, a, REGISTER, spec_i_pt_list(0xA, 0xA, [tid(NAME_B, ISID_1)]))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 20, 3))


@run_async
async def test_all_tg_pt(lu: LogicalUnit) -> None:
    a = nexus(NAME_A)
    await register(lu, a, 0xA, all_tg_pt=True)
    other_port = nexus(NAME_A, ISID_1, tpgt=2, port=2)
    assert lu.pr.registration(other_port) is not None
    assert lu.pr.registration(nexus(NAME_A, ISID_2)) is None
    assert (await reserve(lu, other_port, 0xA, EA)).status == Status.GOOD
    assert (await execute(lu, a, write10(), bytes(BLOCK))).status == Status.GOOD
    status = parse_full_status(await prin(lu, a, READ_FULL_STATUS))
    assert status[0]["all_tg_pt"] and status[0]["holder"]


# ------------------------------------------------------------------------------ REGISTER AND MOVE
@pytest.mark.parametrize("unreg", [False, True])
@run_async
async def test_register_and_move(lu: LogicalUnit, unreg: bool) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B, ISID_2)
    await register(lu, a, 0xA)
    assert (await reserve(lu, a, 0xA, EA_RO)).status == Status.GOOD
    generation = (await read_keys(lu))[0]
    task = await prout(lu, a, REGISTER_AND_MOVE, move_list(0xA, 0xB, tid(NAME_B, ISID_2),
                                                           unreg=unreg))
    assert task.status == Status.GOOD, task.sense
    assert await read_reservation(lu) == (0xB, EA_RO)
    assert await read_keys(lu) == (generation + 1, [0xB] if unreg else [0xA, 0xB])
    assert (await execute(lu, b, write10(), bytes(BLOCK))).status == Status.GOOD
    assert (await execute(lu, a, write10(), bytes(BLOCK))).status == \
        (CONFLICT if unreg else Status.GOOD)


@run_async
async def test_register_and_move_to_registered_nexus(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    assert (await reserve(lu, a, 0xA, WE)).status == Status.GOOD
    task = await prout(lu, a, REGISTER_AND_MOVE, move_list(0xA, 0xBB, tid(NAME_B, ISID_1)))
    assert task.status == Status.GOOD
    assert await read_reservation(lu) == (0xBB, WE)
    assert (await read_keys(lu))[1] == [0xA, 0xBB]


@run_async
async def test_register_and_move_errors(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    to_b = tid(NAME_B, ISID_1)
    assert (await prout(lu, a, REGISTER_AND_MOVE, move_list(0, 0xB, to_b))).status == CONFLICT
    await register(lu, a, 0xA)
    await register(lu, b, 0xB)
    # no reservation, then a reservation a does not hold
    assert (await prout(lu, a, REGISTER_AND_MOVE, move_list(0xA, 5, to_b))).status == CONFLICT
    assert (await reserve(lu, b, 0xB, WE)).status == Status.GOOD
    assert (await prout(lu, a, REGISTER_AND_MOVE, move_list(0xA, 5, to_b))).status == CONFLICT
    assert (await prout(lu, b, RELEASE, params(0xB), WE)).status == Status.GOOD
    assert (await reserve(lu, a, 0xA, WE_AR)).status == Status.GOOD
    assert (await prout(lu, a, REGISTER_AND_MOVE, move_list(0xA, 5, to_b))).status == CONFLICT
    assert (await prout(lu, a, RELEASE, params(0xA), WE_AR)).status == Status.GOOD
    assert (await reserve(lu, a, 0xA, EA)).status == Status.GOOD
    generation = (await read_keys(lu))[0]
    assert (await prout(lu, a, REGISTER_AND_MOVE, move_list(0xB, 5, to_b))).status == CONFLICT
    cases: list[tuple[bytes, Asc, tuple[bool, int, int | None] | None]] = [
        (move_list(0xA, 0, to_b), Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 8, 7)),
        (move_list(0xA, 5, tid(NAME_A, ISID_1)), Asc.INVALID_FIELD_IN_PARAMETER_LIST,
         (False, 24, 7)),
        (move_list(0xA, 5, tid(NAME_A, None)), Asc.INVALID_FIELD_IN_PARAMETER_LIST,
         (False, 24, 7)),
        (move_list(0xA, 5, to_b, rtpi=9), Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 18, 7)),
        (move_list(0xA, 5, to_b)[:-4], Asc.PARAMETER_LIST_LENGTH_ERROR, None),
        (move_list(0xA, 5, to_b)[:20], Asc.PARAMETER_LIST_LENGTH_ERROR, None),
        (move_list(0xA, 5, bytes((0x04,)) + to_b[1:]), Asc.INVALID_FIELD_IN_PARAMETER_LIST,
         (False, 24, 3)),
    ]
    for data, asc, field in cases:
        task = await prout(lu, a, REGISTER_AND_MOVE, data)
        expect_sense(task, SenseKey.ILLEGAL_REQUEST, asc, field)
    reserved = bytearray(move_list(0xA, 5, to_b))
    reserved[17] |= 0x80
    task = await prout(lu, a, REGISTER_AND_MOVE, bytes(reserved))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                 (False, 17, 7))
    assert await read_reservation(lu) == (0xA, EA)
    assert (await read_keys(lu))[0] == generation


# ------------------------------------------------------------------------------ generation
@run_async
async def test_generation_counts_each_changing_prout_once(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    steps = [
        (a, REGISTER, params(0, 0xA), 0, 1),
        (b, REGISTER_IGNORE, params(0, 0xB), 0, 1),
        (a, RESERVE, params(0xA), WE, 0),
        (a, RELEASE, params(0xA), WE, 0),
        (a, RESERVE, params(0xA), EA, 0),
        (b, PREEMPT, params(0xB, 0xA), WE, 1),
        (b, PREEMPT_AND_ABORT, params(0xB, 0xB), EA, 1),
        (a, REGISTER, params(0, 0xA), 0, 1),
        (b, REGISTER_AND_MOVE, move_list(0xB, 0xAA, tid(NAME_A, ISID_1)), 0, 1),
        (a, CLEAR, params(0xAA), 0, 1),
        (a, REGISTER, params(0, 0), 0, 0),  # does nothing
        (a, REGISTER, params(7, 1), 0, 0),  # conflict
    ]
    generation = 0
    for n, sa, data, rtype, step in steps:
        await prout(lu, n, sa, data, rtype)
        generation += step
        assert (await read_keys(lu))[0] == generation, (sa, data)


# ------------------------------------------------------------------------------ SPC-2 interplay
@run_async
async def test_spc2_reserve_and_persistent_reservations(lu: LogicalUnit) -> None:
    a, b = nexus(NAME_A), nexus(NAME_B)
    reserve6, release6 = bytes((0x16, 0, 0, 0, 0, 0)), bytes((0x17, 0, 0, 0, 0, 0))
    await register(lu, a, 0xA)
    assert (await execute(lu, b, reserve6)).status == CONFLICT  # a registration exists
    assert (await execute(lu, a, reserve6)).status == CONFLICT  # CRH=0
    assert (await execute(lu, b, release6)).status == CONFLICT
    assert (await prout(lu, a, REGISTER, params(0xA, 0))).status == Status.GOOD
    assert (await execute(lu, b, reserve6)).status == Status.GOOD
    # every PERSISTENT RESERVE IN/OUT conflicts while a RESERVE is held (SPC-2 5.5.1)
    for n in (a, b):
        assert (await execute(lu, n, prin_cdb(READ_KEYS))).status == CONFLICT
        assert (await prout(lu, n, REGISTER, params(0, 1))).status == CONFLICT
    assert (await execute(lu, b, release6)).status == Status.GOOD
    assert (await prout(lu, a, REGISTER, params(0, 1))).status == Status.GOOD


# ------------------------------------------------------------------------------ APTPL
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "lun0.img.pr.json"


@run_async
async def test_aptpl_persists_and_restores(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)
    a, b, c = nexus(NAME_A), nexus(NAME_B, ISID_2), nexus(NAME_C)
    await register(lu, a, 0xA, aptpl=True)
    await register(lu, b, 0xB, aptpl=True, all_tg_pt=True)
    task = await prout(lu, a, REGISTER, spec_i_pt_list(0, 0xC, [tid(NAME_C, None)]))
    assert task.status == CONFLICT  # a is registered: RK must be its key
    assert (await reserve(lu, a, 0xA, WE_RO)).status == Status.GOOD
    doc = json.loads(state_file(tmp_path).read_text())
    assert doc["reservation"] == {"type": WE_RO, "scope": 0, "holder": 0}
    assert [r["key"] for r in doc["registrations"]] == ["0x" + "0" * 15 + "a",
                                                        "0x" + "0" * 15 + "b"]
    before = parse_full_status(await prin(lu, a, READ_FULL_STATUS))
    lu.close()

    again = make_lu(tmp_path)
    assert parse_full_status(await prin(again, a, READ_FULL_STATUS)) == before
    assert await read_keys(again) == (0, [0xA, 0xB])  # PRGENERATION restarts at zero
    assert (await prin(again, a, REPORT_CAPABILITIES))[3] & 0x01  # PTPL_A
    assert (await execute(again, c, write10(), bytes(BLOCK))).status == CONFLICT
    assert (await execute(again, b, write10(), bytes(BLOCK))).status == Status.GOOD
    # APTPL=0 in a later REGISTER: nothing survives a restart any more
    assert (await prout(again, b, REGISTER, params(0xB, 0xBB))).status == Status.GOOD
    assert not state_file(tmp_path).exists()
    assert not (await prin(again, a, REPORT_CAPABILITIES))[3] & 0x01
    again.close()
    assert await read_keys(make_lu(tmp_path)) == (0, [])


@run_async
async def test_aptpl_tracks_every_change(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA, aptpl=True)
    await register(lu, b, 0xB, aptpl=True)
    for sa, n, data, rtype in ((RESERVE, a, params(0xA), EA),
                               (PREEMPT, b, params(0xB, 0xA), WE),
                               (REGISTER_AND_MOVE, b,
                                move_list(0xB, 0xAA, tid(NAME_A, ISID_1), aptpl=True), 0),
                               (RELEASE, a, params(0xAA), WE),
                               (CLEAR, a, params(0xAA), 0)):
        assert (await prout(lu, n, sa, data, rtype)).status == Status.GOOD
        restored = make_lu(tmp_path)
        assert await prin(restored, a, READ_FULL_STATUS) == \
            (0).to_bytes(4, "big") + (await prin(lu, a, READ_FULL_STATUS))[4:], sa
        restored.close()


@run_async
async def test_aptpl_write_failure_rolls_back(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lu = make_lu(tmp_path)
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(lu, a, 0xA, aptpl=True)
    saved = state_file(tmp_path).read_bytes()
    keys = await read_keys(lu)

    def fail(errno_: int) -> Callable[..., None]:
        def store(*args: Any) -> None:
            raise OSError(errno_, os.strerror(errno_))
        return store

    monkeypatch.setattr(P, "store_state_file", fail(errno.EIO))
    task = await prout(lu, b, REGISTER, params(0, 0xB, aptpl=True))
    expect_sense(task, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
    task = await reserve(lu, a, 0xA, EA)
    expect_sense(task, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
    monkeypatch.setattr(P, "store_state_file", fail(errno.ENOSPC))
    task = await prout(lu, a, REGISTER, params(0xA, 0xAB, aptpl=True))
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INSUFFICIENT_REGISTRATION_RESOURCES)
    task = await prout(lu, a, REGISTER, params(0xA, 0xAB))  # APTPL=0: the removal fails too
    expect_sense(task, SenseKey.ILLEGAL_REQUEST, Asc.INSUFFICIENT_REGISTRATION_RESOURCES)
    assert await read_keys(lu) == keys
    assert await read_reservation(lu) is None
    assert lu.pr.state.aptpl
    assert state_file(tmp_path).read_bytes() == saved
    assert (await execute(lu, b, write10(), bytes(BLOCK))).status == Status.GOOD


@run_async
async def test_failure_after_rename_puts_previous_file_back(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    lu = make_lu(tmp_path)
    await register(lu, nexus(NAME_A), 0xA, aptpl=True)
    saved = state_file(tmp_path).read_bytes()
    real = P._fsync_directory
    calls = {"n": 0}

    def flaky(directory: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "injected")
        real(directory)

    monkeypatch.setattr(P, "_fsync_directory", flaky)
    task = await prout(lu, nexus(NAME_B), REGISTER, params(0, 0xB, aptpl=True))
    expect_sense(task, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
    assert state_file(tmp_path).read_bytes() == saved
    assert not Path(str(state_file(tmp_path)) + ".tmp").exists()
    assert await read_keys(lu) == (1, [0xA])


@run_async
async def test_interrupted_write_leaves_state_file_intact(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    lu = make_lu(tmp_path)
    await register(lu, nexus(NAME_A), 0xA, aptpl=True)
    saved = state_file(tmp_path).read_bytes()

    def torn_write(fd: int, data: Any) -> int:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "write", torn_write)
    task = await prout(lu, nexus(NAME_B), REGISTER, params(0, 0xB, aptpl=True))
    monkeypatch.undo()
    expect_sense(task, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
    assert state_file(tmp_path).read_bytes() == saved
    # a crash between writing the temporary file and renaming it
    Path(str(state_file(tmp_path)) + ".tmp").write_bytes(b"{ half a stat")
    restored = make_lu(tmp_path)
    assert await read_keys(restored) == (0, [0xA])
    assert not Path(str(state_file(tmp_path)) + ".tmp").exists()


@run_async
async def test_write_to_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)
    lu.pr.path = str(tmp_path / "gone" / "lun0.img.pr.json")
    task = await prout(lu, nexus(), REGISTER, params(0, 0xA, aptpl=True))
    expect_sense(task, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
    assert await read_keys(lu) == (0, [])


@pytest.mark.parametrize("content", [
    b"not json",
    b'{"format": "something else"}',
    b'{"format": "pytarget-persistent-reservations", "version": 99}',
])
def test_unusable_state_file_refuses_to_start(tmp_path: Path, content: bytes) -> None:
    state_file(tmp_path).write_bytes(content)
    with pytest.raises(P.PrStateError):
        make_lu(tmp_path)


@run_async
async def test_state_file_of_another_unit_refuses_to_start(tmp_path: Path) -> None:
    lu = make_lu(tmp_path)
    await register(lu, nexus(), 0xA, aptpl=True)
    doc = json.loads(state_file(tmp_path).read_text())
    doc["naa"] = "3000000000000002"
    state_file(tmp_path).write_text(json.dumps(doc))
    with pytest.raises(P.PrStateError, match="NAA"):
        make_lu(tmp_path)


# ------------------------------------------------------------------------------ parser fuzzing
@given(sa=hs.integers(0, 7), data=hs.binary(max_size=400))
def test_parameter_list_parser_raises_only_sense(sa: int, data: bytes) -> None:
    try:
        P.parse_prout_parameters(sa, data, True)
    except SenseError:
        pass


@given(sa=hs.sampled_from([REGISTER, REGISTER_AND_MOVE]), tids=hs.binary(max_size=300),
       declared=hs.integers(0, 400), flags=hs.integers(0, 255))
def test_transport_id_lists_raise_only_sense(sa: int, tids: bytes, declared: int,
                                             flags: int) -> None:
    if sa == REGISTER:
        data = bytes(20) + bytes((flags | 0x08, 0, 0, 0)) + declared.to_bytes(4, "big") + tids
    else:
        data = bytes(17) + bytes((flags & 3,)) + (1).to_bytes(2, "big") + \
            declared.to_bytes(4, "big") + tids
    try:
        params = P.parse_prout_parameters(sa, data, True)
    except SenseError:
        return
    for port in params.transport_ids:
        again, _ = P.parse_transport_id(P.encode_transport_id(port), 0, 1 << 16)
        assert (again.name.lower(), again.isid) == (port.name.lower(), port.isid)
