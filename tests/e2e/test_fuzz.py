"""The fuzzer's short run (tools/fuzz, docs/security.md): forty seconds of mangled PDUs, login
text, CHAP exchanges, CDBs and parameter lists from many connections, while a healthy session
writes and verifies data. The target must stay up, answer, keep its memory bounded and never
log a traceback; the healthy session must see no error and read back what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO


@pytest.mark.slow
def test_short_fuzz_run(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fuzz"), "--duration", "40", "--connections",
         "10", "--seed", "7", "--rss-limit", "1024", "--json", str(report_path),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300)
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    log = Path(report["target_log"]).read_text(errors="replace")
    assert proc.returncode == 0 and report["ok"], (report, log[-4000:])
    assert not report["errors"] and not report["target_findings"]
    assert report["pdus_sent"] > 500 and report["connections"] > 50
    assert report["healthy_writes"] > 50 and report["healthy_reads"] > 50
    assert report["probes"] >= 3
    assert report["rss_max"] < 1024 << 20
    for scenario in ("full_feature", "login", "chap"):
        assert report["scenarios"].get(scenario, 0) > 0
