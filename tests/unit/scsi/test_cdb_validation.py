"""Every bit a command does not define is rejected with ILLEGAL REQUEST, INVALID FIELD IN CDB
and a field pointer at that bit (or at the top of its multi-bit field), for every row of the
opcode table; unknown opcodes and service actions are rejected too."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytarget.core.sense import Asc, SenseKey, Status
from pytarget.scsi.opcodes import SBC_TABLE, OpSpec

from .harness import make_lu, run

SPECS = [s for s in SBC_TABLE.specs]


def _undefined_bits(spec: OpSpec) -> list[tuple[int, int]]:
    n = spec.cdb_len
    bits = []
    for byte in range(1, n):
        allowed = (spec._mask >> (8 * (n - 1 - byte))) & 0xFF
        for bit in range(8):
            if not allowed & (1 << bit):
                bits.append((byte, bit))
    return bits


def _base_cdb(spec: OpSpec) -> bytearray:
    cdb = bytearray(spec.cdb_len)
    cdb[0] = spec.opcode
    if spec.sa is not None:
        cdb[1] = spec.sa
    return cdb


@pytest.fixture(scope="module")
def lu(tmp_path_factory: pytest.TempPathFactory):
    return make_lu(tmp_path_factory.mktemp("cdb"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_undefined_bit_is_rejected_with_its_field_pointer(lu, spec: OpSpec) -> None:
    for byte, bit in _undefined_bits(spec):
        cdb = _base_cdb(spec)
        cdb[byte] |= 1 << bit
        result = run(lu, bytes(cdb))
        assert result.status == Status.CHECK_CONDITION, (spec.name, byte, bit)
        assert result.key == SenseKey.ILLEGAL_REQUEST
        assert result.asc == Asc.INVALID_FIELD_IN_CDB, (spec.name, byte, bit, hex(result.asc or 0))
        in_cdb, fp_byte, fp_bit = result.field_pointer
        expected_bit = bit
        for fbyte, msb, lsb in spec.fields:
            if fbyte == byte and lsb <= bit <= msb:
                expected_bit = msb
        assert (in_cdb, fp_byte, fp_bit) == (True, byte, expected_bit), (spec.name, byte, bit)


def test_protect_field_points_at_its_top_bit(lu) -> None:
    result = run(lu, bytes((0x28, 0x20)) + bytes(8))  # READ(10) RDPROTECT=001b
    assert result.field_pointer == (True, 1, 7)


def test_unknown_opcode(lu) -> None:
    result = run(lu, bytes((0xC7,)) + bytes(15))
    assert (result.key, result.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
    assert result.field_pointer == (True, 0, None)


def test_unknown_service_action(lu) -> None:
    result = run(lu, bytes((0x9E, 0x1F)) + bytes(14))
    assert (result.key, result.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert result.field_pointer == (True, 1, 4)


def test_naca_is_rejected(lu) -> None:
    result = run(lu, bytes((0x00, 0, 0, 0, 0, 0x04)))
    assert result.field_pointer == (True, 5, 2)


def test_thick_lun_does_not_know_unmap(tmp_path: Path) -> None:
    lu = make_lu(tmp_path, thin=False)
    result = run(lu, bytes((0x42,)) + bytes(9))
    assert result.asc == Asc.INVALID_COMMAND_OPERATION_CODE
