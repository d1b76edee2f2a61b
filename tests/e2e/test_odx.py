"""Windows-style ODX over iSCSI with pytarget's own initiator: POPULATE TOKEN, RECEIVE ROD TOKEN
INFORMATION, WRITE USING TOKEN (to the same and another LUN), the zero token, invalidation by a
write, expiry with an injected clock, bad tokens, and a second initiator without access."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytarget.initiator.client import CommandResult, Initiator

from ..conftest import (
    INITIATOR1,
    INITIATOR2,
    TARGET_IQN,
    LiveTarget,
    run,
    start_target,
    write_config,
)

ZERO_TOKEN = struct.pack(">I2xH", 0xFFFF0001, 0x01F8) + bytes(504)
BS = 512


@pytest.fixture(scope="module")
def odx_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("odx")
    config = write_config(directory, targets=[{
        "name": TARGET_IQN,
        "luns": [{"id": 0, "path": "lun0.img", "size": "64MiB"},
                 {"id": 1, "path": "lun1.img", "size": "64MiB"},
                 {"id": 2, "path": "lun2.img", "size": "64MiB"}],
    }])
    target = start_target(config)
    yield target
    target.stop()


def cdb(sa: int, list_id: int, length: int) -> bytes:
    return bytes((0x83, sa)) + bytes(4) + list_id.to_bytes(4, "big") \
        + length.to_bytes(4, "big") + bytes(2)


def rrti(list_id: int) -> bytes:
    return bytes((0x84, 0x07)) + list_id.to_bytes(4, "big") + bytes(4) \
        + (4096).to_bytes(4, "big") + bytes(2)


def ranges(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">QI4x", lba, n) for lba, n in pairs)


def populate_params(*pairs: tuple[int, int], inactivity: int = 0) -> bytes:
    desc = ranges(*pairs)
    body = struct.pack(">BxIIxxH", 0, inactivity, 0, len(desc)) + desc
    return struct.pack(">H", len(body)) + body


def wut_params(token: bytes, *pairs: tuple[int, int], offset: int = 0) -> bytes:
    desc = ranges(*pairs)
    body = struct.pack(">B5xQ", 0, offset) + token + bytes(6) + struct.pack(">H", len(desc)) \
        + desc
    return struct.pack(">H", len(body)) + body


async def session(target: LiveTarget, initiator: str = INITIATOR1) -> Initiator:
    ini = await Initiator.connect(target.host, target.port)
    await ini.login(TARGET_IQN, initiator_name=initiator)
    for lun in (0, 1, 2):
        await ini.clear_unit_attentions(lun)
    return ini


async def populate(ini: Initiator, lun: int, list_id: int, *pairs: tuple[int, int],
                   inactivity: int = 0) -> bytes:
    params = populate_params(*pairs, inactivity=inactivity)
    (await ini.command(lun, cdb(0x10, list_id, len(params)), params)).check()
    info = (await ini.command(lun, rrti(list_id), read_length=4096)).check().data
    assert info[4] == 0x10 and info[5] == 0x01
    at = 32 + info[13]
    assert struct.unpack_from(">I", info, at)[0] == 514
    return info[at + 6:at + 6 + 512]


async def write_using_token(ini: Initiator, lun: int, list_id: int, token: bytes,
                            *pairs: tuple[int, int], offset: int = 0) -> CommandResult:
    params = wut_params(token, *pairs, offset=offset)
    return await ini.command(lun, cdb(0x11, list_id, len(params)), params)


def test_populate_and_write_using_token(odx_target: LiveTarget) -> None:
    async def go() -> None:
        ini = await session(odx_target)
        data = os.urandom(256 * BS)
        (await ini.write(0, 1000, data)).check()
        token = await populate(ini, 0, 1, (1000, 256))
        assert struct.unpack_from(">I2xH", token) == (0x00010000, 0x01F8)
        (await write_using_token(ini, 1, 2, token, (0, 128), (5000, 128))).check()
        assert (await ini.read(1, 0, 128)).check().data == data[:128 * BS]
        assert (await ini.read(1, 5000, 128)).check().data == data[128 * BS:]
        (await write_using_token(ini, 0, 3, token, (9000, 64), offset=192)).check()
        assert (await ini.read(0, 9000, 64)).check().data == data[192 * BS:]
        status = (await ini.command(1, rrti(2), read_length=4096)).check().data
        assert status[4] == 0x11 and status[5] == 0x01 and status[15] == 0xF1
        assert struct.unpack_from(">Q", status, 16)[0] == 256
        await ini.logout()
    run(go())


def test_zero_token(odx_target: LiveTarget) -> None:
    async def go() -> None:
        ini = await session(odx_target)
        (await ini.write(2, 64, b"\xCC" * (64 * BS))).check()
        (await write_using_token(ini, 2, 4, ZERO_TOKEN, (64, 64))).check()
        assert (await ini.read(2, 64, 64)).check().data == bytes(64 * BS)
        await ini.logout()
    run(go())


def test_write_to_source_invalidates_token(odx_target: LiveTarget) -> None:
    async def go() -> None:
        ini = await session(odx_target)
        token = await populate(ini, 0, 5, (2000, 16))
        (await ini.write(0, 2008, b"\x01" * BS)).check()
        r = await write_using_token(ini, 1, 6, token, (2000, 16))
        assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x23, 0x08)  # TOKEN CANCELLED
        await ini.logout()
    run(go())


def test_bad_tokens(odx_target: LiveTarget) -> None:
    async def go() -> None:
        ini = await session(odx_target)
        token = await populate(ini, 0, 7, (3000, 8))
        forged = bytearray(token)
        forged[300] ^= 0xFF
        r = await write_using_token(ini, 1, 8, bytes(forged), (0, 8))
        assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x23, 0x05)  # TOKEN CORRUPT
        unknown = bytearray(token)
        unknown[8:16] = os.urandom(8)
        r = await write_using_token(ini, 1, 9, bytes(unknown), (0, 8))
        assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x23, 0x04)  # TOKEN UNKNOWN
        garbage = os.urandom(512)
        r = await write_using_token(ini, 1, 10, garbage, (0, 8))
        assert (r.sense_key, r.asc) == (0x05, 0x23)
        await ini.logout()
    run(go())


def test_token_expiry(odx_target: LiveTarget) -> None:
    """The shortest inactivity timeout (1 s) over the wire; longer timers are unit-tested with
    an injected clock (tests/unit/copy/test_tokens.py)."""
    async def go() -> None:
        ini = await session(odx_target)
        token = await populate(ini, 0, 11, (4000, 8), inactivity=1)
        (await write_using_token(ini, 1, 12, token, (100, 8))).check()
        await asyncio.sleep(1.2)
        r = await write_using_token(ini, 1, 13, token, (100, 8))
        assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x23, 0x07)  # TOKEN EXPIRED
        await ini.logout()
    run(go())


def test_token_from_another_initiator_session(odx_target: LiveTarget) -> None:
    """Tokens are for the data, not the session: another nexus with access may use them."""
    async def go() -> None:
        one = await session(odx_target, INITIATOR1)
        two = await session(odx_target, INITIATOR2)
        data = os.urandom(8 * BS)
        (await one.write(0, 6000, data)).check()
        token = await populate(one, 0, 14, (6000, 8))
        (await write_using_token(two, 1, 15, token, (6000, 8))).check()
        assert (await two.read(1, 6000, 8)).check().data == data
        await one.logout()
        await two.logout()
    run(go())
