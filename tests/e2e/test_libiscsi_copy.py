"""libiscsi's iscsi-test-cu copy suites (ExtendedCopy, ReceiveCopyResults) against a live target:
each must pass with no failure and no skip line.

With standard INQUIRY VERSION 06h (SPC-4), libiscsi 1.19's ExtendedCopy.ValidTgtDescr expects an
Identification Descriptor CSCD descriptor with LU ID TYPE 10b to be ignored, so the copy succeeds
(SPC-4 6.4.5.6; below VERSION 06h it expects INVALID FIELD), and it leaves out its test of SPC-3's
NUL bit, obsolete in SPC-4, with a CU_PASS that prints nothing, even with -V."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import INITIATOR1, INITIATOR2, LiveTarget, start_target, write_config
from ..libiscsi import ISCSI_TEST_CU, SUITES_COPY, assert_clean, run_suite

pytestmark = [
    pytest.mark.libiscsi,
    pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed"),
]


@pytest.fixture(scope="module")
def copy_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("copy")
    target = start_target(write_config(directory, luns=[
        {"id": 0, "path": "lun0.img", "size": "64MiB"}]))
    yield target
    target.stop()


@pytest.mark.parametrize("suite", SUITES_COPY)
def test_suite(copy_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, copy_target.url(0), INITIATOR1, INITIATOR2))


def test_valid_target_descriptor_spc4(copy_target: LiveTarget) -> None:
    result = run_suite("ExtendedCopy.ValidTgtDescr", copy_target.url(0), INITIATOR1, INITIATOR2,
                       extra=["-V"])
    assert_clean(result)
    lines = [line.strip() for line in result.output.splitlines()]
    at = lines.index("Unsupported LU_ID TYPE")
    sent = [line for line in lines[at:] if line.startswith("Send EXTENDED COPY")]
    assert sent == ["Send EXTENDED COPY (Expecting SUCCESS)"], result.output[-3000:]
    assert "Test NUL bit in target descriptor" not in lines
