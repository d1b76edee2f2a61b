"""RECEIVE COPY RESULTS formats, held status per I_T nexus, COPY OPERATION ABORT, and the
discovery data (INQUIRY 3PC, VPD 8Fh and 85h, REPORT SUPPORTED OPERATION CODES)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pytarget.copy import discovery
from pytarget.core import limits
from pytarget.core.sense import Asc, SenseKey

from ..scsi.harness import run
from .helpers import (
    NEXUS_A,
    NEXUS_A2,
    NEXUS_B,
    Rig,
    abort_cdb,
    b2b,
    e4,
    lid1,
    lid4,
    rcr_cdb,
    xcopy_cdb,
)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    rig = Rig(tmp_path)
    rig.unit(0)
    rig.unit(1)
    return rig


def copy(rig: Rig, list_id: int, usage: int = 0, nexus=NEXUS_A, bad: bool = False):  # type: ignore[no-untyped-def]
    src, dst = rig.node.luns[0], rig.node.luns[1]
    seg = b2b(0, 1, 8, 0, 8190 if bad else 0)
    params = lid1([e4(src), e4(dst)], [seg], list_id=list_id, usage=usage)
    return run(src, xcopy_cdb(len(params)), params, nexus)


def test_operating_parameters(rig: Rig) -> None:
    r = run(rig.node.luns[0], rcr_cdb(0x03), b"", NEXUS_A)
    d = r.data
    assert struct.unpack_from(">I", d)[0] == len(d) - 4
    assert d[4] & 0x01  # SNLID
    assert struct.unpack_from(">HHIIII", d, 8) == (
        limits.MAX_CSCD_DESCRIPTORS, limits.MAX_SEGMENT_DESCRIPTORS,
        limits.MAX_DESCRIPTOR_LIST_BYTES, limits.MAX_SEGMENT_BYTES,
        limits.MAX_INLINE_DATA_BYTES, limits.HELD_DATA_LIMIT_BYTES)
    assert struct.unpack_from(">H", d, 34)[0] == limits.MAX_CONCURRENT_COPIES
    assert d[37] == 9  # 512-byte granularity
    assert d[44:44 + d[43]] == bytes((0x02, 0x07, 0x0A, 0xE4, 0xE5, 0xEA))


def test_copy_status_held_per_nexus_and_list_id(rig: Rig) -> None:
    lu = rig.node.luns[0]
    r = run(lu, rcr_cdb(0x00, 1), b"", NEXUS_A)
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_CDB, (True, 2, 7))
    assert copy(rig, 1).ok()
    assert not run(lu, rcr_cdb(0x00, 1), b"", NEXUS_A2).ok()  # another I_T nexus sees nothing
    assert not run(lu, rcr_cdb(0x00, 1), b"", NEXUS_B).ok()
    r = run(lu, rcr_cdb(0x00, 1), b"", NEXUS_A)
    assert r.ok()
    assert struct.unpack(">IBHBI", r.data) == (8, 0x01, 1, 0x00, 8 * 512)
    assert not run(lu, rcr_cdb(0x00, 1), b"", NEXUS_A).ok()  # retrieved: discarded


@pytest.mark.parametrize("usage", [0b10, 0b11])
def test_unheld_status_is_not_kept(rig: Rig, usage: int) -> None:
    assert copy(rig, 2, usage).ok()
    assert not run(rig.node.luns[0], rcr_cdb(0x00, 2), b"", NEXUS_A).ok()


def test_failure_details(rig: Rig) -> None:
    lu = rig.node.luns[0]
    r = copy(rig, 3, bad=True)
    assert r.key == SenseKey.COPY_ABORTED
    status = run(lu, rcr_cdb(0x00, 3), b"", NEXUS_A)
    assert status.data[4] == 0x02  # completed unsuccessfully
    details = run(lu, rcr_cdb(0x04, 3), b"", NEXUS_A)
    d = details.data
    n = struct.unpack_from(">H", d, 58)[0]
    assert struct.unpack_from(">I", d)[0] == 56 + n and d[56] == 0x02
    assert d[60:60 + n] == r.sense
    assert not run(lu, rcr_cdb(0x04, 3), b"", NEXUS_A).ok()


def test_status_freed_when_the_nexus_goes_away(rig: Rig) -> None:
    lu = rig.node.luns[0]
    assert copy(rig, 4).ok()
    lu.nexus_lost(NEXUS_A)
    assert not run(lu, rcr_cdb(0x00, 4), b"", NEXUS_A).ok()


def test_lid4_status_and_copy_data(rig: Rig) -> None:
    src, dst = rig.node.luns[0], rig.node.luns[1]
    params = lid4([e4(src), e4(dst)], [b2b(0, 1, 8, 0, 0)], list_id=0xABCDEF01)
    assert run(src, xcopy_cdb(len(params), True), params, NEXUS_A).ok()
    data = run(src, rcr_cdb(0x06, 0xABCDEF01), b"", NEXUS_A)
    assert data.ok() and data.data == bytes(4)
    r = run(src, rcr_cdb(0x05, 0xABCDEF01), b"", NEXUS_A)
    d = r.data
    assert struct.unpack_from(">I", d)[0] == len(d) - 4 == 28
    assert d[4] == 0x01 and d[5] == 0x01 and d[12] == 0  # LID4, completed, status GOOD
    assert d[15] == 0x00 and struct.unpack_from(">QH", d, 16) == (4096, 1)


def test_copy_operation_abort(rig: Rig) -> None:
    lu = rig.node.luns[0]
    r = run(lu, abort_cdb(77), b"", NEXUS_A)
    assert (r.key, r.asc, r.field_pointer) == (SenseKey.ILLEGAL_REQUEST,
                                              Asc.INVALID_FIELD_IN_CDB, (True, 2, 7))
    assert copy(rig, 77).ok()
    assert run(lu, abort_cdb(77), b"", NEXUS_A).ok()  # finished already: nothing to stop


def test_inquiry_and_vpd(rig: Rig) -> None:
    lu = rig.node.luns[0]
    inq = run(lu, bytes((0x12, 0, 0, 0, 96, 0)), b"", NEXUS_A).data
    assert inq[5] & 0x08  # 3PC
    pages = run(lu, bytes((0x12, 1, 0, 0, 255, 0)), b"", NEXUS_A).data
    assert 0x8F in pages[4:] and 0x85 in pages[4:]
    page = run(lu, bytes((0x12, 1, 0x8F, 0x10, 0, 0)), b"", NEXUS_A).data
    assert page[1] == 0x8F and struct.unpack_from(">H", page, 2)[0] == len(page) - 4
    found = {}
    at = 4
    while at < len(page):
        kind, length = struct.unpack_from(">HH", page, at)
        assert length % 4 == 0 or kind == 0
        found[kind] = page[at + 4:at + 4 + length]
        at += 4 + length
    assert set(found) == {0x0000, 0x0001, 0x0004, 0x0008, 0x000C, 0x0106, 0x0108, 0x8001}
    commands = found[0x0001]
    assert commands[1:2 + commands[2] + 1][:1] == bytes((0x83,))
    assert bytes((0x83, 5, 0x00, 0x01, 0x10, 0x11, 0x1C)) in commands
    assert bytes((0x84, 8, 0, 1, 3, 4, 5, 6, 7, 8)) in commands
    assert struct.unpack_from(">HHII", found[0x0004], 4) == (
        limits.MAX_CSCD_DESCRIPTORS, limits.MAX_SEGMENT_DESCRIPTORS,
        limits.MAX_DESCRIPTOR_LIST_BYTES, limits.MAX_INLINE_DATA_BYTES)
    assert found[0x0008][1:1 + found[0x0008][0]] == discovery.IMPLEMENTED_DESCRIPTORS
    assert found[0x000C][:4] == bytes((0, 2, 0xFF, 0xFF))
    assert struct.unpack_from(">HII", found[0x0000], 6) == (
        limits.MAX_ROD_RANGES, limits.MAX_INACTIVITY_TIMEOUT, limits.DEFAULT_INACTIVITY_TIMEOUT)
    rod_types = found[0x0108]
    assert struct.unpack_from(">I", rod_types, 4)[0] == 0x00010000
    assert struct.unpack_from(">I", rod_types, 68)[0] == 0xFFFF0001
    mna = run(lu, bytes((0x12, 1, 0x85, 0, 255, 0)), b"", NEXUS_A).data
    assert mna[4] == 0x06 and b"iscsi://127.0.0.1:3260\0" in mna


def test_report_supported_operation_codes_lists_every_service_action(rig: Rig) -> None:
    lu = rig.node.luns[0]
    cdb = bytes((0xA3, 0x0C, 0, 0, 0, 0)) + (65535).to_bytes(4, "big") + bytes(2)
    data = run(lu, cdb, b"", NEXUS_A).data
    listed = {(data[i], struct.unpack_from(">H", data, i + 2)[0])
              for i in range(4, len(data), 8)}
    for sa in (0x00, 0x01, 0x10, 0x11, 0x1C):
        assert (0x83, sa) in listed
    for sa in (0x00, 0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08):
        assert (0x84, sa) in listed
