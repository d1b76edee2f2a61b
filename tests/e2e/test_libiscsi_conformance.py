"""libiscsi's iscsi-test-cu against a live target: each suite must pass with no failure and no
skip line (MultipathIO, which needs two paths, runs with the same LUN given twice)."""

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

# LUN 0: thin, 512-byte blocks, 64 MiB (the size libiscsi's tests are written for).
# LUN 1: read-only. LUN 2: removable medium. LUN 3: fresh, for MultipathIO, whose
# COMPARE AND WRITE loop expects LBA 256 never to have been written.
LUNS = [
    {"id": 0, "path": "lun0.img", "size": "64MiB"},
    {"id": 1, "path": "lun1.img", "size": "64MiB", "readonly": True},
    {"id": 2, "path": "lun2.img", "size": "64MiB", "removable": True},
    {"id": 3, "path": "lun3.img", "size": "64MiB"},
]

SUITES_LUN0 = [
    "Inquiry", "Mandatory", "ModeSense6", "Prefetch10", "Prefetch16", "Read6", "Read10",
    "Read12", "Read16", "ReadCapacity10", "ReadCapacity16", "ReportSupportedOpcodes",
    "TestUnitReady", "Verify10", "Verify12", "Verify16", "Write10", "Write12", "Write16",
    "WriteVerify10", "WriteVerify12", "WriteVerify16", "OrWrite", "ReadDefectData10",
    "ReadDefectData12", "iSCSIcmdsn", "iSCSIdatasn", "iSCSIResiduals", "iSCSITMF",
    "Unmap", "WriteSame10", "WriteSame16", "GetLBAStatus", "CompareAndWrite",
]
SUITES_REMOVABLE = ["StartStopUnit", "NoMedia", "PreventAllow"]
SUITES_READONLY = ["ReadOnly"]


@pytest.fixture(scope="module")
def conformance_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("conformance")
    luns = [dict(lun) for lun in LUNS]
    # the read-only LUN's file must exist before start: read-only LUNs are never created
    (directory / "lun1.img").write_bytes(b"")
    with open(directory / "lun1.img", "r+b") as f:
        f.truncate(64 * 1024 * 1024)
    target = start_target(write_config(directory, luns=luns))
    yield target
    target.stop()


@pytest.mark.parametrize("suite", SUITES_LUN0)
def test_suite(conformance_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, conformance_target.url(0), INITIATOR1, INITIATOR2))


@pytest.mark.parametrize("suite", SUITES_REMOVABLE)
def test_removable_suite(conformance_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, conformance_target.url(2), INITIATOR1, INITIATOR2))


@pytest.mark.parametrize("suite", SUITES_READONLY)
def test_readonly_suite(conformance_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, conformance_target.url(1), INITIATOR1, INITIATOR2))


def test_multipath_io(conformance_target: LiveTarget) -> None:
    """Two sessions (two I_T nexuses) to the same LUN act as two paths."""
    url = conformance_target.url(3)
    assert_clean(run_suite("MultipathIO", url, INITIATOR1, INITIATOR2, urls=[url]))
