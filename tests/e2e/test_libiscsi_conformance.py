"""libiscsi's iscsi-test-cu against a live target: each suite must pass with no failure and no
skip line (MultipathIO, which needs two paths, runs with the same LUN given twice).

Sanitize (with -S, which allows it) and WriteAtomic16 run on a LUN whose backing file is on an
XFS image the test loop-mounts, where the kernel gives atomic writes; the LUN's sanitize rate
(8 MiB/s, 8 s for its 64 MiB) keeps an OVERWRITE running through Sanitize.Reset's three-second
wait, task management functions and reconnection. Its atomic write size is 128 KiB (256
blocks): libiscsi 1.19's WriteAtomic16.Simple writes every multiple of the granularity up to
256 blocks and ignores MAXIMUM ATOMIC TRANSFER LENGTH, so only a granularity above 128 blocks
passes it. The only skip lines allowed there are libiscsi's for CRYPTOGRAPHIC ERASE, which a
file has no key for (docs/conformance.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import INITIATOR1, INITIATOR2, LiveTarget, start_target, write_config
from ..libiscsi import ISCSI_TEST_CU, SUITES_REMOVABLE, SUITES_SBC, assert_clean, run_suite
from ..xfs import xfs_mount

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


@pytest.mark.parametrize("suite", SUITES_SBC)
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


# Sanitize.CryptoErase, .Readonly and .Reservations each print this line for CRYPTOGRAPHIC ERASE,
# which REPORT SUPPORTED OPERATION CODES rightly does not list.
CRYPTO_ERASE_SKIP = "[SKIPPED] SANITIZE CRYPTO_ERASE is not implemented according to " \
    "REPORT_SUPPORTED_OPCODES."


@pytest.fixture(scope="module")
def xfs_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("conformance-xfs")
    with xfs_mount(directory) as mountpoint:
        luns = [{"id": 0, "path": str(mountpoint / "lun0.img"), "size": "64MiB",
                 "sanitize_rate": "8MiB", "atomic_write_size": "128KiB"}]
        target = start_target(write_config(directory, luns=luns))
        try:
            yield target
        finally:
            target.stop()


def test_write_atomic_16_on_xfs(xfs_target: LiveTarget) -> None:
    assert_clean(run_suite("WriteAtomic16", xfs_target.url(0), INITIATOR1, INITIATOR2))


def test_sanitize_on_xfs(xfs_target: LiveTarget) -> None:
    result = run_suite("Sanitize", xfs_target.url(0), INITIATOR1, INITIATOR2, extra=["-S"])
    assert result.tests == 11 and result.passed == 11 and result.failed == 0, \
        "\n".join(result.failures) or result.output[-3000:]
    assert {line[line.index("[SKIPPED]"):] for line in result.skips} == {CRYPTO_ERASE_SKIP}
    assert len(result.skips) == 3, result.skips
