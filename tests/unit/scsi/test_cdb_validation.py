"""Every CDB bit a command reserves, or defines for a feature this device server does not
implement, is rejected with ILLEGAL REQUEST, INVALID FIELD IN CDB and a field pointer at that bit
(at the top bit of a multi-bit field). The expectations are written out from the CDB layouts of
SBC-3 and SPC-4, command by command, not derived from the opcode table; unknown opcodes and
service actions are rejected too."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytarget.copy import commands
from pytarget.core.sense import Asc, SenseKey, Status

from .harness import make_lu, run


@dataclass(frozen=True)
class Rejected:
    """Bits of one CDB byte that must be refused; `top` is where the field pointer goes for all
    of them (a multi-bit field), None for each bit itself."""

    byte: int
    mask: int
    top: int | None = None

    def bits(self) -> Iterator[tuple[int, int, int]]:
        for bit in range(8):
            if self.mask & (1 << bit):
                yield self.byte, bit, bit if self.top is None else self.top


@dataclass(frozen=True)
class Layout:
    name: str
    opcode: int
    sa: int | None
    length: int
    rejected: tuple[Rejected, ...]

    def cases(self) -> Iterator[tuple[int, int, int]]:
        for r in self.rejected:
            yield from r.bits()
        yield from Rejected(self.length - 1, 0xFF).bits()  # CONTROL: no NACA, no LINK


def _reserved(*bytes_: int) -> tuple[Rejected, ...]:
    return tuple(Rejected(b, 0xFF) for b in bytes_)


# RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT (bits 7-5 of byte 1): no protection information.
PROTECT = Rejected(1, 0xE0, top=7)
SA_RESERVED = Rejected(1, 0xE0)  # bits 7-5 above a 5-bit SERVICE ACTION


def _block(name: str, opcodes: tuple[int, int, int], byte1: tuple[Rejected, ...]
           ) -> list[Layout]:
    """The 10/12/16-byte forms of a block command: byte 1 as given, the three bits above GROUP
    NUMBER (bytes 6, 10, 14) reserved."""
    op10, op12, op16 = opcodes
    return [
        Layout(f"{name}(10)", op10, None, 10, (*byte1, Rejected(6, 0xE0))),
        Layout(f"{name}(12)", op12, None, 12, (*byte1, Rejected(10, 0xE0))),
        Layout(f"{name}(16)", op16, None, 16, (*byte1, Rejected(14, 0xE0))),
    ]


# byte 1 of READ: RDPROTECT, DPO FUA RARC FUA_NV honoured, bit 0 obsolete (SBC-3 5.14-5.16)
READ_BYTE1 = (PROTECT, Rejected(1, 0x01))
# byte 1 of WRITE / ORWRITE / COMPARE AND WRITE: WRPROTECT, DPO FUA FUA_NV, bits 2 and 0 reserved
WRITE_BYTE1 = (PROTECT, Rejected(1, 0x05))
# byte 1 of VERIFY / WRITE AND VERIFY: VRPROTECT, DPO, bit 3 reserved, BYTCHK, bit 0 obsolete
VERIFY_BYTE1 = (PROTECT, Rejected(1, 0x09))

SBC_LAYOUTS: list[Layout] = [
    # SPC-4
    Layout("TEST UNIT READY", 0x00, None, 6, _reserved(1, 2, 3, 4)),
    Layout("REQUEST SENSE", 0x03, None, 6, (Rejected(1, 0xFE), *_reserved(2, 3))),
    Layout("INQUIRY", 0x12, None, 6, (Rejected(1, 0xFE),)),  # bit 1: obsolete CMDDT
    Layout("MODE SELECT(6)", 0x15, None, 6, (Rejected(1, 0xEE), *_reserved(2, 3))),
    Layout("MODE SELECT(10)", 0x55, None, 10, (Rejected(1, 0xEE), *_reserved(2, 3, 4, 5, 6))),
    Layout("MODE SENSE(6)", 0x1A, None, 6, (Rejected(1, 0xF7),)),
    Layout("MODE SENSE(10)", 0x5A, None, 10, (Rejected(1, 0xE7), *_reserved(4, 5, 6))),
    Layout("RESERVE(6)", 0x16, None, 6, _reserved(1, 2, 3, 4)),
    Layout("RELEASE(6)", 0x17, None, 6, _reserved(1, 2, 3, 4)),
    Layout("RESERVE(10)", 0x56, None, 10, _reserved(1, 2, 3, 4, 5, 6, 7, 8)),
    Layout("RELEASE(10)", 0x57, None, 10, _reserved(1, 2, 3, 4, 5, 6, 7, 8)),
    Layout("REPORT LUNS", 0xA0, None, 12, _reserved(1, 3, 4, 5, 10)),
    *[Layout(f"PERSISTENT RESERVE IN {sa}", 0x5E, sa, 10, (SA_RESERVED, *_reserved(2, 3, 4, 5, 6)))
      for sa in range(4)],
    *[Layout(f"PERSISTENT RESERVE OUT {sa}", 0x5F, sa, 10, (SA_RESERVED, *_reserved(3, 4)))
      for sa in range(8)],
    Layout("REPORT TARGET PORT GROUPS", 0xA3, 0x0A, 12, _reserved(2, 3, 4, 5, 10)),
    Layout("REPORT SUPPORTED OPERATION CODES", 0xA3, 0x0C, 12,
           (SA_RESERVED, Rejected(2, 0x78), *_reserved(10))),
    Layout("REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", 0xA3, 0x0D, 12,
           (SA_RESERVED, Rejected(2, 0x7F), *_reserved(3, 4, 5, 10))),
    # SBC-3
    Layout("START STOP UNIT", 0x1B, None, 6,
           (Rejected(1, 0xFE), *_reserved(2), Rejected(3, 0xF0), Rejected(4, 0x08))),
    Layout("PREVENT ALLOW MEDIUM REMOVAL", 0x1E, None, 6, (*_reserved(1, 2, 3), Rejected(4, 0xFC))),
    Layout("READ CAPACITY(10)", 0x25, None, 10, (*_reserved(1, 6, 7), Rejected(8, 0xFE))),
    Layout("READ CAPACITY(16)", 0x9E, 0x10, 16, (SA_RESERVED, Rejected(14, 0xFE))),
    Layout("GET LBA STATUS", 0x9E, 0x12, 16, (SA_RESERVED, *_reserved(14))),
    Layout("SYNCHRONIZE CACHE(10)", 0x35, None, 10, (Rejected(1, 0xF9), Rejected(6, 0xE0))),
    Layout("SYNCHRONIZE CACHE(16)", 0x91, None, 16, (Rejected(1, 0xF9), Rejected(14, 0xE0))),
    Layout("PRE-FETCH(10)", 0x34, None, 10, (Rejected(1, 0xFD), Rejected(6, 0xE0))),
    Layout("PRE-FETCH(16)", 0x90, None, 16, (Rejected(1, 0xFD), Rejected(14, 0xE0))),
    Layout("READ DEFECT DATA(10)", 0x37, None, 10,
           (*_reserved(1), Rejected(2, 0xE0), *_reserved(3, 4, 5, 6))),
    Layout("READ DEFECT DATA(12)", 0xB7, None, 12, (Rejected(1, 0xE0), *_reserved(10))),
    Layout("READ(6)", 0x08, None, 6, (Rejected(1, 0xE0),)),
    Layout("WRITE(6)", 0x0A, None, 6, (Rejected(1, 0xE0),)),
    *_block("READ", (0x28, 0xA8, 0x88), READ_BYTE1),
    *_block("WRITE", (0x2A, 0xAA, 0x8A), WRITE_BYTE1),
    *_block("VERIFY", (0x2F, 0xAF, 0x8F), VERIFY_BYTE1),
    *_block("WRITE AND VERIFY", (0x2E, 0xAE, 0x8E), VERIFY_BYTE1),
    Layout("ORWRITE(16)", 0x8B, None, 16, (*WRITE_BYTE1, Rejected(14, 0xE0))),
    Layout("COMPARE AND WRITE", 0x89, None, 16,
           (*WRITE_BYTE1, *_reserved(10, 11, 12), Rejected(14, 0xE0))),
    # WRITE SAME: WRPROTECT, ANCHOR, UNMAP; bits 2-1 reserved; bit 0 obsolete (10), NDOB (16)
    Layout("WRITE SAME(10)", 0x41, None, 10, (PROTECT, Rejected(1, 0x07), Rejected(6, 0xE0))),
    Layout("WRITE SAME(16)", 0x93, None, 16, (PROTECT, Rejected(1, 0x06), Rejected(14, 0xE0))),
    Layout("UNMAP", 0x42, None, 10, (Rejected(1, 0xFE), *_reserved(2, 3, 4, 5), Rejected(6, 0xE0))),
    # SBC-4 5.30: IMMED, ZNR (zoned devices only), AUSE, SERVICE ACTION; bytes 2-6 reserved
    *[Layout(f"SANITIZE {sa:#x}", 0x48, sa, 10, (Rejected(1, 0x40), *_reserved(2, 3, 4, 5, 6)))
      for sa in (0x01, 0x02, 0x1F)],
]

# SPC-4 6.3, 6.4, 6.18; SBC-3 5.10, 5.22, 5.46.
COPY_LAYOUTS: list[Layout] = [
    *[Layout(f"EXTENDED COPY {sa}", 0x83, sa, 16,
             (SA_RESERVED, *_reserved(2, 3, 4, 5, 6, 7, 8, 9, 14))) for sa in (0x00, 0x01)],
    *[Layout(f"TOKEN {sa:#x}", 0x83, sa, 16, (SA_RESERVED, *_reserved(2, 3, 4, 5),
                                                Rejected(14, 0xE0))) for sa in (0x10, 0x11)],
    Layout("COPY OPERATION ABORT", 0x83, 0x1C, 16,
           (SA_RESERVED, *_reserved(6, 7, 8, 9, 10, 11, 12, 13, 14))),
    *[Layout(f"RECEIVE COPY RESULTS {sa}", 0x84, sa, 16,
             (SA_RESERVED, *_reserved(3, 4, 5, 6, 7, 8, 9, 14))) for sa in (0x00, 0x01, 0x04)],
    *[Layout(f"RECEIVE COPY RESULTS {sa}", 0x84, sa, 16,
             (SA_RESERVED, *_reserved(2, 3, 4, 5, 6, 7, 8, 9, 14))) for sa in (0x03, 0x08)],
    *[Layout(f"RECEIVE COPY RESULTS {sa}", 0x84, sa, 16,
             (SA_RESERVED, *_reserved(6, 7, 8, 9, 14))) for sa in (0x05, 0x06, 0x07)],
]

LAYOUTS = SBC_LAYOUTS + COPY_LAYOUTS


@pytest.fixture(scope="module")
def lu(tmp_path_factory: pytest.TempPathFactory):
    return make_lu(tmp_path_factory.mktemp("cdb"), services=commands.ROWS)


def test_every_command_is_listed_here(lu) -> None:
    """A new row comes with its layout from the standard in this file."""
    assert {(s.opcode, s.sa) for s in lu.table.specs} == {(c.opcode, c.sa) for c in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: c.name)
def test_every_reserved_bit_is_rejected_with_its_field_pointer(lu, layout: Layout) -> None:
    for byte, bit, pointer in layout.cases():
        cdb = bytearray(layout.length)
        cdb[0] = layout.opcode
        if layout.sa is not None:
            cdb[1] = layout.sa
        cdb[byte] |= 1 << bit
        result = run(lu, bytes(cdb))
        assert result.status == Status.CHECK_CONDITION, (layout.name, byte, bit)
        assert result.key == SenseKey.ILLEGAL_REQUEST, (layout.name, byte, bit)
        assert result.asc == Asc.INVALID_FIELD_IN_CDB, (layout.name, byte, bit,
                                                        hex(result.asc or 0))
        assert result.field_pointer == (True, byte, pointer), (layout.name, byte, bit)


def test_protect_field_points_at_its_top_bit(lu) -> None:
    result = run(lu, bytes((0x28, 0x20)) + bytes(8))  # READ(10) RDPROTECT=001b
    assert result.field_pointer == (True, 1, 7)


def test_unknown_opcode(lu) -> None:
    result = run(lu, bytes((0xC7,)) + bytes(15))
    assert (result.key, result.asc) == (SenseKey.ILLEGAL_REQUEST,
                                        Asc.INVALID_COMMAND_OPERATION_CODE)
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
