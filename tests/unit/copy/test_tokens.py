"""ODX: POPULATE TOKEN, WRITE USING TOKEN, RECEIVE ROD TOKEN INFORMATION, REPORT ALL ROD TOKENS;
point-in-time invalidation, inactivity expiry, deletion, the zero token, forged tokens."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pytarget.core import limits
from pytarget.core.sense import Asc, SenseKey
from pytarget.iscsi.node import AclEntry

from ..scsi.harness import Result, run
from .helpers import (
    INIT_B,
    NEXUS_A,
    NEXUS_B,
    ZERO_TOKEN,
    Rig,
    populate_params,
    rcr_cdb,
    token_cdb,
    write_token_params,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    rig = Rig(tmp_path)
    rig.clock = Clock()  # type: ignore[attr-defined]
    rig.manager.clock = rig.manager.tokens.clock = rig.clock  # type: ignore[attr-defined]
    src = rig.unit(0)
    rig.unit(1)
    src.backstore.write(memoryview(DATA), 0)
    return rig


DATA = os.urandom(64 * 512)


def populate(rig: Rig, *pairs: tuple[int, int], list_id: int = 1, nexus=NEXUS_A,  # type: ignore[no-untyped-def]
             **kw: int) -> tuple[Result, bytes]:
    lu = rig.node.luns[0]
    params = populate_params(*pairs, **kw)
    r = run(lu, token_cdb(0x10, list_id, len(params)), params, nexus)
    if not r.ok():
        return r, b""
    info = run(lu, rcr_cdb(0x07, list_id), b"", nexus)
    d = info.data
    assert d[4] == 0x10 and d[5] == 0x01  # POPULATE TOKEN, completed
    assert d[15] == 0xF1  # transfer count in logical blocks
    sense_len = d[13]
    at = 32 + sense_len
    assert struct.unpack_from(">I", d, at)[0] == 514
    return r, d[at + 6:at + 6 + 512]


def write(rig: Rig, token: bytes, *pairs: tuple[int, int], lun: int = 1, nexus=NEXUS_A,  # type: ignore[no-untyped-def]
          list_id: int = 2, **kw: object) -> Result:
    lu = rig.node.luns[lun]
    params = write_token_params(token, *pairs, **kw)  # type: ignore[arg-type]
    return run(lu, token_cdb(0x11, list_id, len(params)), params, nexus)


def read(lu, lba: int, blocks: int) -> bytes:  # type: ignore[no-untyped-def]
    buf = bytearray(blocks * 512)
    lu.backstore.read_into(memoryview(buf), lba * 512)
    return bytes(buf)


def test_populate_and_write_using_token(rig: Rig) -> None:
    r, token = populate(rig, (0, 16), (32, 16))
    assert r.ok() and len(token) == 512
    assert struct.unpack_from(">I2xH", token) == (0x00010000, 0x01F8)
    assert int.from_bytes(token[48:64], "big") == 32 * 512
    assert write(rig, token, (100, 8), (200, 24)).ok()
    dst = rig.node.luns[1]
    assert read(dst, 100, 8) == DATA[:8 * 512]
    assert read(dst, 200, 24) == DATA[8 * 512:16 * 512] + DATA[32 * 512:48 * 512]
    # with an offset into the ROD, to the same logical unit
    assert write(rig, token, (1000, 8), lun=0, offset=20).ok()
    assert read(rig.node.luns[0], 1000, 8) == DATA[36 * 512:44 * 512]
    status = run(dst, rcr_cdb(0x05, 2), b"", NEXUS_A)
    assert status.ok() and status.data[4] == 0x11 and status.data[5] == 0x01


def test_tokens_are_unique_and_random(rig: Rig) -> None:
    _, a = populate(rig, (0, 8), list_id=1)
    _, b = populate(rig, (0, 8), list_id=3)
    assert a != b and a[8:16] != b[8:16] and a[-64:] != b[-64:]


def test_write_to_the_source_invalidates_the_token(rig: Rig) -> None:
    _, token = populate(rig, (0, 16))
    src = rig.node.luns[0]
    unrelated = bytes((0x8A, 0)) + (500).to_bytes(8, "big") + (1).to_bytes(4, "big") + bytes(2)
    assert run(src, unrelated, b"x" * 512, NEXUS_B).ok()  # outside the ranges: still valid
    assert write(rig, token, (0, 8)).ok()
    inside = bytes((0x8A, 0)) + (15).to_bytes(8, "big") + (1).to_bytes(4, "big") + bytes(2)
    assert run(src, inside, b"y" * 512, NEXUS_B).ok()
    r = write(rig, token, (300, 8))
    assert (r.key, r.asc, r.field_pointer) == (
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED, (False, 16, None))
    assert read(rig.node.luns[1], 300, 8) == bytes(4096)


@pytest.mark.parametrize("command", [
    bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0)),  # UNMAP
    bytes((0x93, 0x08)) + (4).to_bytes(8, "big") + (2).to_bytes(4, "big") + bytes(2),  # WS16
])
def test_unmap_and_write_same_invalidate_too(rig: Rig, command: bytes) -> None:
    _, token = populate(rig, (0, 16))
    data = struct.pack(">HH4xQI4x", 22, 16, 3, 1) if command[0] == 0x42 else b"\0" * 512
    assert run(rig.node.luns[0], command, data, NEXUS_A).ok()
    r = write(rig, token, (0, 8))
    assert r.asc == Asc.INVALID_TOKEN_OPERATION_TOKEN_CANCELLED


def test_inactivity_timeout_expires_the_token(rig: Rig) -> None:
    _, token = populate(rig, (0, 8), inactivity=5)
    rig.clock.now += 4  # type: ignore[attr-defined]
    assert write(rig, token, (0, 8)).ok()  # use restarts the timer
    rig.clock.now += 4.5  # type: ignore[attr-defined]
    assert write(rig, token, (0, 8)).ok()
    rig.clock.now += 5  # type: ignore[attr-defined]
    r = write(rig, token, (0, 8))
    assert (r.key, r.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.INVALID_TOKEN_OPERATION_TOKEN_EXPIRED)


def test_default_and_maximum_inactivity_timeout(rig: Rig) -> None:
    _, token = populate(rig, (0, 8))
    rig.clock.now += limits.DEFAULT_INACTIVITY_TIMEOUT - 1  # type: ignore[attr-defined]
    assert write(rig, token, (0, 8)).ok()
    r, _ = populate(rig, (0, 8), inactivity=limits.MAX_INACTIVITY_TIMEOUT + 1, list_id=5)
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 4, 7))


def test_delete_token_after_use(rig: Rig) -> None:
    _, token = populate(rig, (0, 8))
    assert write(rig, token, (0, 8), delete=True).ok()
    r = write(rig, token, (0, 8))
    assert r.asc == Asc.INVALID_TOKEN_OPERATION_TOKEN_DELETED


def test_forged_and_foreign_tokens(rig: Rig) -> None:
    _, token = populate(rig, (0, 8))
    corrupt = bytearray(token)
    corrupt[-1] ^= 1
    assert write(rig, bytes(corrupt), (0, 8)).asc == Asc.INVALID_TOKEN_OPERATION_TOKEN_CORRUPT
    unknown = bytearray(token)
    unknown[8:16] = bytes(8)
    assert write(rig, bytes(unknown), (0, 8)).asc == Asc.INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN
    other_type = bytearray(token)
    other_type[0:4] = (0x00800000).to_bytes(4, "big")
    assert write(rig, bytes(other_type), (0, 8)).asc == \
        Asc.INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE
    short = bytearray(token)
    short[6:8] = (0x100).to_bytes(2, "big")
    assert write(rig, bytes(short), (0, 8)).asc == \
        Asc.INVALID_TOKEN_OPERATION_INVALID_TOKEN_LENGTH
    remote = bytearray(token)
    name = b"iqn.2026-11.example:elsewhere\0\0\0"
    remote[128:128 + 4 + len(name)] = bytes((0x03, 0x28, 0, len(name))) + name
    assert write(rig, bytes(remote), (0, 8)).asc == \
        Asc.INVALID_TOKEN_OPERATION_REMOTE_TOKEN_USAGE_NOT_SUPPORTED
    assert read(rig.node.luns[1], 0, 8) == bytes(4096)


def test_token_unusable_by_an_initiator_without_access(rig: Rig) -> None:
    _, token = populate(rig, (0, 8))
    rig.node.acl = [AclEntry(NEXUS_A.initiator_name, None), AclEntry(INIT_B, frozenset({1}))]
    r = write(rig, token, (0, 8), nexus=NEXUS_B)
    assert r.asc == Asc.INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN
    assert read(rig.node.luns[1], 0, 8) == bytes(4096)
    assert write(rig, token, (0, 8), nexus=NEXUS_A).ok()


def test_zero_token_deallocates(rig: Rig) -> None:
    dst = rig.node.luns[1]
    dst.backstore.write(memoryview(b"\xAB" * (1 << 20)), 0)
    os.fsync(dst.backstore.fd)
    before = dst.backstore.allocated_bytes()
    assert write(rig, ZERO_TOKEN, (0, 2048), (4096, 8)).ok()
    assert read(dst, 0, 2048) == bytes(1 << 20)
    os.fsync(dst.backstore.fd)
    assert dst.backstore.allocated_bytes() <= before - (1 << 20) + 8192


def test_range_checks(rig: Rig) -> None:
    lu = rig.node.luns[0]
    r, _ = populate(rig, (8190, 8))
    assert (r.key, r.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    r, _ = populate(rig, (0, 8), (4, 8))
    assert (r.key, r.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    r, _ = populate(rig, *[(i * 2, 1) for i in range(limits.MAX_ROD_RANGES + 1)])
    assert r.key == SenseKey.ILLEGAL_REQUEST
    _, token = populate(rig, (0, 8))
    r = write(rig, token, (0, 16))  # more than the ROD holds
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_PARAMETER_LIST, (False, 8, 7))
    r = write(rig, token, (8190, 8))
    assert r.asc == Asc.LBA_OUT_OF_RANGE
    assert lu.copy_service is not None


def test_report_all_rod_tokens_hides_the_secret(rig: Rig) -> None:
    _, token = populate(rig, (0, 8))
    lu = rig.node.luns[0]
    r = run(lu, rcr_cdb(0x08), b"", NEXUS_A)
    assert struct.unpack_from(">I", r.data)[0] == len(r.data) - 4
    listed = r.data[8:]
    assert len(listed) == 96 and listed == token[:96]
    assert token[200:] not in r.data
