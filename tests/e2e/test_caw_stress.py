"""COMPARE AND WRITE as VMware ATS uses it, under contention from many sessions
(tests/caw_stress.py): eight sessions each run 500 read-increment-COMPARE AND WRITE loops on a
shared counter over LBAs 0-1, retrying on MISCOMPARE, while two more sessions overwrite blocks
inside and next to the compare range with plain WRITEs. The counter must be exactly 4000, and
every block read at any time must hold one writer's whole pattern (no torn block).
"""

from __future__ import annotations

import pytest

from ..caw_stress import run_stress
from ..conftest import LiveTarget

pytestmark = pytest.mark.slow


def test_counter_is_exact_and_no_block_is_torn(live_target: LiveTarget) -> None:
    outcome = run_stress([live_target])
    assert outcome.counter == outcome.expected == 4000
    assert outcome.retries > 0  # the contention was real
