"""MODE SENSE/SELECT, changeable masks, and the bits the device server honours."""

from __future__ import annotations

import pytest

from pytarget.core.sense import Asc, SenseKey

from .harness import NEXUS_A, NEXUS_B, make_lu, run, run_async


@pytest.fixture
def lu(tmp_path):
    return make_lu(tmp_path)


def sense6(lu, page=0x3F, pc=0, dbd=False, alloc=255):
    return run(lu, bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, 0, alloc, 0)))


def pages_of(data: bytes, header: int) -> dict[int, bytes]:
    pos = header + data[3] if header == 4 else header
    out = {}
    while pos < len(data):
        length = data[pos + 1] + 2
        out[data[pos] & 0x3F] = data[pos:pos + length]
        pos += length
    return out


def test_all_pages_fit_and_parse(lu) -> None:
    data = sense6(lu).data
    assert data[0] == len(data) - 1 and len(data) <= 255
    assert data[2] & 0x10  # DPOFUA
    assert data[3] == 8  # short block descriptor
    assert set(pages_of(data, 4)) == {0x01, 0x08, 0x0A, 0x1C}


def test_saved_values_are_not_supported(lu) -> None:
    result = sense6(lu, pc=3)
    assert result.asc == Asc.SAVING_PARAMETERS_NOT_SUPPORTED


def test_unknown_page(lu) -> None:
    assert sense6(lu, page=0x19).asc == Asc.INVALID_FIELD_IN_CDB


def test_changeable_masks(lu) -> None:
    pages = pages_of(sense6(lu, pc=1).data, 4)
    assert pages[0x0A][2] & 0x04 and pages[0x0A][4] & 0x08  # D_SENSE, SWP
    assert pages[0x08][2] & 0x04  # WCE


def select6(lu, page: bytes, nexus=NEXUS_A):
    data = bytes(4) + page
    return run(lu, bytes((0x15, 0x10, 0, 0, len(data), 0)), data, nexus=nexus)


def control_page(lu) -> bytearray:
    return bytearray(pages_of(sense6(lu, page=0x0A, dbd=True).data, 4)[0x0A])


def test_d_sense_switches_to_descriptor_format(lu) -> None:
    page = control_page(lu)
    page[2] |= 0x04
    assert select6(lu, bytes(page)).ok()
    result = run(lu, bytes((0x88, 0)) + b"\xff" * 8 + bytes((0, 0, 0, 1, 0, 0)))
    assert result.sense[0] == 0x72 and result.asc == Asc.LBA_OUT_OF_RANGE


def test_swp_write_protects(lu) -> None:
    page = control_page(lu)
    page[4] |= 0x08
    assert select6(lu, bytes(page)).ok()
    assert sense6(lu).data[2] & 0x80
    result = run(lu, bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)), bytes(512))
    assert result.key == SenseKey.DATA_PROTECT and result.asc == Asc.WRITE_PROTECTED
    assert run(lu, bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0))).ok()


def test_unchangeable_bit_is_rejected_with_pointer(lu) -> None:
    page = control_page(lu)
    page[3] ^= 0x10  # QUEUE ALGORITHM MODIFIER is not changeable
    result = select6(lu, bytes(page))
    assert result.asc == Asc.INVALID_FIELD_IN_PARAMETER_LIST
    assert result.field_pointer == (False, 4 + 3, 4)


def test_bad_page_length_and_truncated_list(lu) -> None:
    page = control_page(lu)
    assert select6(lu, bytes(page[:1]) + bytes((0x09,)) + bytes(page[2:11])).asc \
        == Asc.INVALID_FIELD_IN_PARAMETER_LIST
    assert select6(lu, bytes(page[:6])).asc == Asc.PARAMETER_LIST_LENGTH_ERROR


def test_save_pages_bit_rejected(lu) -> None:
    result = run(lu, bytes((0x15, 0x11, 0, 0, 4, 0)), bytes(4))
    assert result.asc == Asc.INVALID_FIELD_IN_CDB and result.field_pointer == (True, 1, 0)


def test_mode_parameters_changed_ua_for_other_nexuses(lu) -> None:
    import asyncio

    page = control_page(lu)
    page[2] |= 0x04

    async def go():
        lu.ua.clear()
        await run_async(lu, bytes((0x00,)) + bytes(5), nexus=NEXUS_A)
        await run_async(lu, bytes((0x00,)) + bytes(5), nexus=NEXUS_B)
        await run_async(lu, bytes((0x00,)) + bytes(5), nexus=NEXUS_B)
        r = await run_async(lu, bytes((0x15, 0x10, 0, 0, 16, 0)), bytes(4) + bytes(page))
        assert r.ok()
        mine = await run_async(lu, bytes((0x00,)) + bytes(5), nexus=NEXUS_A)
        other = await run_async(lu, bytes((0x00,)) + bytes(5), nexus=NEXUS_B)
        return mine, other
    mine, other = asyncio.run(go())
    assert mine.ok()
    assert other.key == SenseKey.UNIT_ATTENTION and other.asc == Asc.MODE_PARAMETERS_CHANGED


def test_write_cache_off_makes_writes_durable(lu, monkeypatch) -> None:
    page = bytearray(pages_of(sense6(lu, page=0x08, dbd=True).data, 4)[0x08])
    page[2] &= ~0x04
    assert select6(lu, bytes(page)).ok()
    flushed = []
    monkeypatch.setattr(lu.backstore, "flush", lambda: flushed.append(1))
    assert run(lu, bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)), bytes(512)).ok()
    assert flushed
