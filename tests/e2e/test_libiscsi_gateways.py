"""libiscsi's iscsi-test-cu against two gateway processes of one target, started from the same
configuration file with different --gateway: Inquiry and ReportSupportedOpcodes through the
gateway that does not own the LUN (active/non-optimized), MultipathIO with both paths through one
gateway and, test by test, with one path through each. Each must pass with no failure and no
skip line, except the multipath LUN reset across gateways: without a shared reservation store
these file LUNs keep their SCSI state per gateway, so the reset does not reach the other
gateway's nexuses; it is expected to fail, and noticed if it starts to pass."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..conftest import INITIATOR1, INITIATOR2, LiveTarget, gateway_targets
from ..libiscsi import ISCSI_TEST_CU, assert_clean, run_suite

pytestmark = [
    pytest.mark.libiscsi,
    pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed"),
]

# LUN n is owned by gateways[n mod 2]: LUN 0 by gw1, LUN 1 by gw2... Each MultipathIO run has a
# fresh LUN of its own (1-5): its COMPARE AND WRITE loop expects LBA 256 never to have been
# written.
MULTIPATH_LUNS = {"whole": 1, "Simple": 2, "CompareAndWrite": 3, "CompareAndWriteAsync": 4,
                  "Reset": 5}
LUNS = [{"id": n, "path": f"lun{n}.img", "size": "64MiB"} for n in range(6)]


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LiveTarget]]:
    with gateway_targets(tmp_path_factory.mktemp("gateways"), LUNS) as started:
        yield started


@pytest.mark.parametrize("suite", ["Inquiry", "ReportSupportedOpcodes"])
def test_suite_through_the_non_owner(gateways: list[LiveTarget], suite: str) -> None:
    assert_clean(run_suite(suite, gateways[1].url(0), INITIATOR1, INITIATOR2))


def test_multipath_io_through_one_gateway(gateways: list[LiveTarget]) -> None:
    """The whole family, both paths through the gateway that does not own the LUN."""
    lun = MULTIPATH_LUNS["whole"]
    assert_clean(run_suite("MultipathIO", gateways[0].url(lun), INITIATOR1, INITIATOR2,
                           urls=[gateways[0].url(lun)]))


@pytest.mark.parametrize("test", ["Simple", "CompareAndWrite", "CompareAndWriteAsync"])
def test_multipath_io_across_gateways(gateways: list[LiveTarget], test: str) -> None:
    """One path through each gateway."""
    lun = MULTIPATH_LUNS[test]
    assert_clean(run_suite(f"MultipathIO.{test}", gateways[0].url(lun), INITIATOR1, INITIATOR2,
                           urls=[gateways[1].url(lun)]))


@pytest.mark.xfail(strict=True, reason="without a shared reservation store (`reservations:`) "
                   "a LOGICAL UNIT RESET through one gateway does not reach the nexuses of "
                   "another (docs/scale-out-consistency.md)")
def test_multipath_reset_across_gateways(gateways: list[LiveTarget]) -> None:
    lun = MULTIPATH_LUNS["Reset"]
    assert_clean(run_suite("MultipathIO.Reset", gateways[0].url(lun), INITIATOR1, INITIATOR2,
                           urls=[gateways[1].url(lun)]))
