"""One I_T nexus cannot hold every ROD token slot."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytarget.copy.tokens import TokenStore
from pytarget.core import limits
from pytarget.core.sense import Asc, SenseError
from pytarget.core.task import Nexus

from ..scsi.harness import make_lu


def test_tokens_per_nexus_are_capped(tmp_path) -> None:
    lu = make_lu(tmp_path)
    store = TokenStore(SimpleNamespace(), clock=lambda: 0.0)
    greedy = Nexus("iqn.2026-11.io.pytarget.test:greedy", bytes(6),
                   "iqn.2026-11.io.pytarget:unit", 1)
    other = Nexus("iqn.2026-11.io.pytarget.test:other", bytes(6), "iqn.2026-11.io.pytarget:unit", 1)
    for _ in range(limits.MAX_ROD_TOKENS_PER_NEXUS):
        store.create(lu, greedy, [(0, 8)], 60)
    with pytest.raises(SenseError) as info:
        store.create(lu, greedy, [(0, 8)], 60)
    assert info.value.asc == Asc.INSUFFICIENT_RESOURCES
    assert store.create(lu, other, [(0, 8)], 60).creator == other.key
