"""Running libiscsi's conformance tool `iscsi-test-cu` and reading its verdicts."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

ISCSI_TEST_CU = shutil.which("iscsi-test-cu")

# iscsi-test-cu's families, as the tests run them, each on a LUN made for it: block commands
# and iSCSI (a 64 MiB thin LUN of 512-byte blocks, the size libiscsi's tests are written for),
# a removable medium, persistent reservations and RESERVE(6), copies.
SUITES_SBC = [
    "Inquiry", "Mandatory", "ModeSense6", "Prefetch10", "Prefetch16", "Read6", "Read10",
    "Read12", "Read16", "ReadCapacity10", "ReadCapacity16", "ReportSupportedOpcodes",
    "TestUnitReady", "Verify10", "Verify12", "Verify16", "Write10", "Write12", "Write16",
    "WriteVerify10", "WriteVerify12", "WriteVerify16", "OrWrite", "ReadDefectData10",
    "ReadDefectData12", "iSCSIcmdsn", "iSCSIdatasn", "iSCSIResiduals", "iSCSITMF",
    "Unmap", "WriteSame10", "WriteSame16", "GetLBAStatus", "CompareAndWrite",
]
SUITES_REMOVABLE = ["StartStopUnit", "NoMedia", "PreventAllow"]
SUITES_PR = ["PrinReadKeys", "PrinServiceactionRange", "PrinReportCapabilities",
             "ProutRegister", "ProutReserve", "ProutClear", "ProutPreempt", "Reserve6"]
SUITES_COPY = ["ExtendedCopy", "ReceiveCopyResults"]


@dataclass
class SuiteResult:
    suite: str
    returncode: int
    output: str
    passed: int = 0
    failed: int = 0
    tests: int = 0
    skips: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.failed and not self.skips and self.tests > 0


def assert_clean(result: SuiteResult) -> None:
    """Fail the calling test unless the suite passed with no failure and no skip, showing
    the failing and skipped lines (or the end of the output)."""
    details = "\n".join(result.failures + result.skips) or result.output[-3000:]
    assert result.clean, f"{result.suite}: rc={result.returncode} tests={result.tests} " \
                         f"failed={result.failed}\n{details}"


def parse(suite: str, returncode: int, output: str) -> SuiteResult:
    result = SuiteResult(suite, returncode, output)
    m = re.search(r"^\s*tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", output, re.M)
    if m:
        result.tests, result.passed, result.failed = (int(m.group(i)) for i in (2, 3, 4))
    result.skips = [line.strip() for line in output.splitlines() if "[SKIPPED]" in line]
    result.failures = [line.strip() for line in output.splitlines()
                       if "FAILED" in line or re.match(r"\s*\d+\. test_", line)]
    return result


def run_suite(suite: str, url: str, initiator1: str, initiator2: str, timeout: float = 600,
              extra: list[str] | None = None, urls: list[str] | None = None) -> SuiteResult:
    assert ISCSI_TEST_CU is not None
    cmd = [ISCSI_TEST_CU, "-d", "-i", initiator1, "-I", initiator2, f"--test=ALL.{suite}",
           *(extra or []), url, *(urls or [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return parse(suite, proc.returncode, proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return parse(suite, -1, out + "\n[TIMEOUT]")
