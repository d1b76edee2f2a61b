"""CDBs for the fuzzer, generated from the opcode table's rows.

Every row of a logical unit's table (the SPC/SBC rows and the copy manager's) gives its CDB
length, its CDB usage data (the bits the device server honours) and the layout of its named
fields; a CDB is built from those: opcode and service action in place, the named fields (LBA,
TRANSFER LENGTH, ALLOCATION LENGTH, PARAMETER LIST LENGTH, LIST IDENTIFIER) set to the values the
caller chose, other honoured bits random, and now and then one bit the command does not define.
A command added to the table is fuzzed with no change here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pytarget.copy import commands
from pytarget.core.table import Field, OpSpec, OpTable
from pytarget.scsi.opcodes import lu_table

TABLE: OpTable = lu_table(True, commands.ROWS)


@dataclass(frozen=True)
class Values:
    """What the caller wants in the named fields a row has (the others are ignored)."""

    lba: int = 0
    blocks: int = 0
    allocation: int = 0
    parameter_list: int = 0
    list_identifier: int = 0


def _put(cdb: bytearray, f: Field | None, value: int) -> None:
    if f is None:
        return
    o, w = f.offset, f.width
    mask = f.mask & ((1 << (8 * w)) - 1)
    old = int.from_bytes(cdb[o:o + w], "big")
    cdb[o:o + w] = ((old & ~mask) | (value & mask)).to_bytes(w, "big")


def reserved_bits(row: OpSpec) -> list[tuple[int, int]]:
    """(byte, bit) of every bit of the row's CDB the device server does not honour."""
    return [(i, bit) for i in range(1, row.cdb_len) for bit in range(8)
            if not row.usage[i] & (1 << bit) and not (i == 1 and row.sa is not None and bit < 5)]


def cdb(row: OpSpec, rng: random.Random, values: Values = Values(), *, flags: float = 0.5,
        reserved: float = 0.0) -> bytes:
    """A CDB for `row`: honoured bits random with probability `flags`, the named fields from
    `values`, and with probability `reserved` one bit the command does not define set."""
    out = bytearray(row.cdb_len)
    if rng.random() < flags:
        for i in range(1, row.cdb_len):
            out[i] = rng.getrandbits(8) & row.usage[i]
    out[0] = row.opcode
    if row.sa is not None:
        out[1] = (out[1] & 0xE0) | row.sa
    layout = row.layout
    _put(out, layout.lba, values.lba)
    _put(out, layout.transfer_length, values.blocks)
    _put(out, layout.allocation_length, values.allocation)
    _put(out, layout.parameter_list_length, values.parameter_list)
    _put(out, layout.list_identifier, values.list_identifier)
    if reserved and rng.random() < reserved:
        bits = reserved_bits(row)
        if bits:
            byte, bit = rng.choice(bits)
            out[byte] |= 1 << bit
    return bytes(out)
