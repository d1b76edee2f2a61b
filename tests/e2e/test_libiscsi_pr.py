"""libiscsi's persistent reservation and RESERVE(6) suites against a live target: each must pass
with no failure and no [SKIPPED] line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import INITIATOR1, INITIATOR2, LiveTarget, start_target, write_config
from ..libiscsi import ISCSI_TEST_CU, SUITES_PR, assert_clean, run_suite

pytestmark = [
    pytest.mark.libiscsi,
    pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed"),
]


@pytest.fixture(scope="module")
def pr_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("pr")
    target = start_target(write_config(directory))  # 64 MiB thin LUN 0, 512-byte blocks
    yield target
    target.stop()


@pytest.mark.parametrize("suite", SUITES_PR)
def test_pr_suite(pr_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, pr_target.url(0), INITIATOR1, INITIATOR2))
