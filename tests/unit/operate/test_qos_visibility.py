"""QoS in `pytarget status` and the metrics: each policy, its flows and their counters, from a
target's scheduler driven with a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

from pytarget import metrics, status
from pytarget.core.qos import InitiatorPolicy, Item, Limits, LunPolicy, TargetPolicy
from pytarget.core.task import Nexus
from pytarget.scsi.qos import QosGate

TARGET = "iqn.2026-12.io.pytarget:qos"
HOST = "iqn.2026-12.io.pytarget.test:a"


def driven_gate() -> QosGate:
    policy = TargetPolicy(((0, LunPolicy(Limits(iops=100, burst=0.0), (
        InitiatorPolicy(HOST, Limits(bps=1 << 20)),))),))
    gate = QosGate(TARGET, policy)
    nexus = Nexus(HOST, bytes(6), TARGET, 1)
    s = gate.scheduler
    q = s.queue_of(0, nexus)
    assert q is not None
    for _ in range(5):
        s.request(q, Item(1, 4096, False), 1.0)
    s.poll(1.025)
    return gate


def test_status_lists_policies_flows_and_rates() -> None:
    gate = driven_gate()
    doc = [{"target": TARGET, **p} for p in gate.scheduler.snapshot(1.025)]
    assert [p["policy"] for p in doc] == ["lun 0", f"lun 0 initiator {HOST}"]
    lun, host = doc
    assert lun["limits"] == {"iops": 100, "burst": 0.0}
    (flow,) = lun["flows"]
    # one started at once, one after waiting (a late poll: with no burst the lateness is lost)
    assert flow["flow"] == "all" and flow["commands"] == 2 and flow["queued"] == 3
    assert flow["throttled"] == 1
    assert host["flows"][0]["flow"] == HOST
    text = "\n".join(status._qos_lines(doc))
    assert "QoS policies and flows:" in text
    assert "iops=100" in text and "bps=1MiB/s" in text and "1/2" in text
    assert status._qos_lines([]) == ["", "QoS policies: none"]


def test_metrics_per_flow() -> None:
    gate = driven_gate()
    lu = SimpleNamespace(qos=gate)
    server = SimpleNamespace(registry=SimpleNamespace(
        targets={TARGET: SimpleNamespace(name=TARGET, luns={0: lu})}))
    families: dict[str, metrics._Family] = {}

    def family(name: str, kind: str, help_text: str) -> metrics._Family:
        return families.setdefault(name, metrics._Family(name, kind, help_text))

    metrics._qos_families(server, family)  # type: ignore[arg-type]
    text = "\n".join(line for fam in families.values() for line in fam.lines())
    where = f'target="{TARGET}",policy="lun 0",flow="all"'
    assert f"pytarget_qos_commands_total{{{where}}} 2" in text
    assert f"pytarget_qos_throttled_commands_total{{{where}}} 1" in text
    assert f"pytarget_qos_queued_commands{{{where}}} 3" in text
    assert f"pytarget_qos_queued_seconds_total{{{where}}} 0.025" in text
    assert f'pytarget_qos_flow_bytes_per_second{{{where},direction="in"}}' in text
