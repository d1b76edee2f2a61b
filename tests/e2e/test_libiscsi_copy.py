"""libiscsi's iscsi-test-cu copy suites (ExtendedCopy, ReceiveCopyResults) against a live target:
each must pass with no failure and no skip line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import INITIATOR1, INITIATOR2, LiveTarget, start_target, write_config
from ..libiscsi import ISCSI_TEST_CU, assert_clean, run_suite

pytestmark = [
    pytest.mark.libiscsi,
    pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed"),
]

SUITES = ["ExtendedCopy", "ReceiveCopyResults"]


@pytest.fixture(scope="module")
def copy_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("copy")
    target = start_target(write_config(directory, luns=[
        {"id": 0, "path": "lun0.img", "size": "64MiB"}]))
    yield target
    target.stop()


@pytest.mark.parametrize("suite", SUITES)
def test_suite(copy_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, copy_target.url(0), INITIATOR1, INITIATOR2))
