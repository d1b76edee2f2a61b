"""The fuzzer's CDB generator (tools/cdbgen.py) builds every row's CDB from the row: the CDB
passes the row's check, the named fields read back as asked, and a bit the command does not
define is rejected."""

from __future__ import annotations

import random
import sys

import pytest

from pytarget.core.sense import Asc, SenseError

from ...conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import cdbgen  # noqa: E402

ROWS = cdbgen.TABLE.specs


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_generated_cdbs_match_their_row(row) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(row.name)
    values = cdbgen.Values(lba=0x1234, blocks=7, allocation=200, parameter_list=24,
                           list_identifier=3)
    for _ in range(50):
        cdb = row.parse(cdbgen.cdb(row, rng, values))
        assert cdbgen.TABLE.lookup(cdb) is row
        layout = row.layout
        if layout.lba is not None:
            assert cdb.lba == 0x1234
        if layout.transfer_length is not None:
            assert cdb.transfer_length == 7
        if layout.allocation_length is not None:
            assert cdb.allocation_length == 200
        if layout.parameter_list_length is not None:
            assert cdb.parameter_list_length == 24
        if layout.list_identifier is not None:
            assert cdb.list_identifier == 3


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_undefined_bits_are_rejected(row) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(row.name)
    for _ in range(20):
        cdb = cdbgen.cdb(row, rng, flags=0.0, reserved=1.0)
        with pytest.raises(SenseError) as caught:
            row.parse(cdb)
        assert caught.value.asc == Asc.INVALID_FIELD_IN_CDB
