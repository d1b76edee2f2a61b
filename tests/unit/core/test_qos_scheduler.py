"""The QoS scheduler with a fake clock: accounting, ordering per flow, reservations under
contention, independence of flows and LUNs, withdrawal, and a policy changed while commands
wait. Time is an argument; nothing here sleeps."""

from __future__ import annotations

from collections import Counter

import pytest

from pytarget.core.qos import (
    BY_NEXUS,
    InitiatorPolicy,
    Item,
    Limits,
    LunPolicy,
    Scheduler,
    TargetPolicy,
    normalized_ios,
)
from pytarget.core.task import Nexus

TARGET = "iqn.2026-12.io.pytarget:qos"


def nexus(name: str, isid: int = 1) -> Nexus:
    return Nexus(f"iqn.2026-12.io.pytarget.test:{name}", isid.to_bytes(6, "big"), TARGET, 1)


A, B, C = nexus("a"), nexus("b"), nexus("c")


class Driver:
    """Feeds a scheduler commands and advances a fake clock to each wake-up it reports."""

    def __init__(self, policy: TargetPolicy) -> None:
        self.s = Scheduler(policy)
        self.now = 0.0
        self.started: list[tuple[float, str]] = []

    def submit(self, who: Nexus, nbytes: int = 4096, write: bool = False, lun: int = 0,
               label: str | None = None) -> Item:
        item = Item(normalized_ios(nbytes, self.s.policy.normalize), nbytes, write,
                    payload=label or who.initiator_name.rsplit(":", 1)[1])
        q = self.s.queue_of(lun, who)
        if q is None:
            self.started.append((self.now, item.payload))
            return item
        self._record(self.s.request(q, item, self.now))
        return item

    def _record(self, items: list[Item]) -> None:
        self.started += [(self.now, it.payload) for it in items]

    def run_until(self, t: float, refill: dict[str, tuple[Nexus, int, int]] | None = None
                  ) -> None:
        """Advance to `t`; `refill` keeps a label at a queue depth (closed loop at QD N)."""
        while True:
            if refill:
                before = len(self.started)
                self._top_up(refill)
                if len(self.started) > before and not any(self.s.waiting()):
                    continue  # all of them started at once (a burst): top up again
            when = self.s.next_wakeup()
            if when is None or when > t:
                self.now = t
                return
            self.now = max(self.now, when)
            self._record(self.s.poll(self.now))

    def _top_up(self, refill: dict[str, tuple[Nexus, int, int]]) -> None:
        # every command completes the moment it starts: keep `depth` waiting per label
        waiting = Counter(it.payload for it in self.s.waiting())
        for label, (who, depth, nbytes) in refill.items():
            for _ in range(depth - waiting[label]):
                self.submit(who, nbytes, label=label)

    def count(self, label: str, start: float, end: float) -> int:
        return sum(1 for t, lab in self.started if lab == label and start <= t < end)


def lun_policy(**limits: float) -> TargetPolicy:
    return TargetPolicy(((0, LunPolicy(Limits(burst=0.0, **limits))),))


def test_normalized_ios() -> None:
    assert normalized_ios(0) == 1
    assert normalized_ios(512) == 1
    assert normalized_ios(8192) == 1
    assert normalized_ios(8193) == 2
    assert normalized_ios(65536) == 8
    assert normalized_ios(1 << 20) == 128
    assert normalized_ios(65536, 4096) == 16


def test_iops_limit_4k_and_64k() -> None:
    for nbytes, expected in ((4096, 2000), (65536, 250)):
        d = Driver(lun_policy(iops=2000))
        d.run_until(3.0, {"a": (A, 32, nbytes)})
        assert d.count("a", 1.0, 3.0) == pytest.approx(expected * 2, abs=2)


def test_bandwidth_limits_by_direction() -> None:
    d = Driver(lun_policy(read_bps=100e6))
    d.run_until(5.0, {"a": (A, 8, 1 << 20)})
    assert d.count("a", 1.0, 5.0) == pytest.approx(4 * 100e6 / (1 << 20), abs=2)
    # writes are not under a read limit
    d.submit(B, 1 << 20, write=True, label="w")
    assert d.started[-1] == (d.now, "w")


def test_total_bandwidth_counts_both_directions() -> None:
    d = Driver(lun_policy(bps=10 << 20))
    d.now = 1.0
    d.submit(A, 10 << 20, write=True)
    first = d.submit(A, 1 << 20, write=False, label="read")
    assert first.queue is not None
    assert d.s.next_wakeup() == pytest.approx(1.0 + 1.0)


def test_burst_lets_an_idle_flow_run_ahead_once() -> None:
    policy = TargetPolicy(((0, LunPolicy(Limits(iops=100, burst=0.5))),))
    d = Driver(policy)
    d.now = 10.0  # idle since the start
    for _ in range(60):
        d.submit(A)
    assert d.count("a", 10.0, 10.0 + 1e-9) == 51  # 0.5 s of 100 IOPS, plus the one due now
    d.run_until(11.0)
    assert d.count("a", 10.0, 11.0) == 60
    # after the burst, the rate
    d.run_until(20.0, {"a": (A, 4, 4096)})
    assert d.count("a", 12.0, 20.0) == pytest.approx(800, abs=2)


def test_large_command_goes_into_debt_rather_than_waiting_for_a_full_bucket() -> None:
    d = Driver(lun_policy(iops=100))
    d.now = 1.0
    d.submit(A, 8 << 20)  # 1024 normalized IOs: starts now, the flow owes 10.24 s
    assert d.count("a", 1.0, 1.1) == 1
    d.submit(A)
    assert d.s.next_wakeup() == pytest.approx(1.0 + 10.24)


def test_commands_of_a_flow_start_in_arrival_order() -> None:
    d = Driver(lun_policy(read_bps=1 << 20))
    d.now = 1.0
    for i, size in enumerate((1 << 20, 4096, 512 << 10, 4096, 1 << 20, 8192)):
        d.submit(A, size, label=f"cmd{i}")
    d.run_until(10.0)
    assert [lab for _, lab in d.started] == [f"cmd{i}" for i in range(6)]


def test_a_throttled_flow_does_not_delay_another_lun_or_flow() -> None:
    policy = TargetPolicy(
        ((0, LunPolicy(initiators=(InitiatorPolicy("iqn.2026-12.io.pytarget.test:a",
                                                   Limits(iops=10, burst=0.0)),))),))
    d = Driver(policy)
    d.now = 1.0
    for _ in range(5):
        d.submit(A, lun=0, label="a0")
    assert d.count("a0", 1.0, 1.1) == 1
    b = d.submit(B, lun=0, label="b0")  # another initiator on the same LUN: no policy
    a1 = d.submit(A, lun=1, label="a1")  # the same initiator on another LUN
    assert b.queue is None and a1.queue is None
    assert d.count("b0", 1.0, 1.1) == 1 and d.count("a1", 1.0, 1.1) == 1
    assert d.s.queue_of(1, A) is None and d.s.queue_of(0, B) is None


def test_lun_limit_shares_fairly_between_flows() -> None:
    d = Driver(lun_policy(iops=200))
    d.run_until(10.0, {"flood": (C, 32, 4096), "light": (A, 1, 4096)})
    flood, light = d.count("flood", 1.0, 10.0), d.count("light", 1.0, 10.0)
    assert flood + light == pytest.approx(1800, abs=3)
    assert light == pytest.approx(900, rel=0.02)  # equal shares, whatever the queue depth


def test_minimums_hold_against_a_flood() -> None:
    policy = TargetPolicy(((0, LunPolicy(Limits(iops=1000, burst=0.0), (
        InitiatorPolicy("iqn.2026-12.io.pytarget.test:a", Limits(min_iops=400)),
        InitiatorPolicy("iqn.2026-12.io.pytarget.test:b", Limits(min_iops=400)),
    ))),))
    d = Driver(policy)
    d.run_until(5.0, {"a": (A, 4, 4096), "b": (B, 4, 4096), "c": (C, 32, 4096)})
    a, b, c = (d.count(x, 1.0, 5.0) for x in "abc")
    assert a >= 4 * 400 and b >= 4 * 400
    assert a + b + c == pytest.approx(4000, abs=3)
    assert c >= 4 * 100  # the flood takes the rest


def test_minimum_unused_is_not_kept_from_others() -> None:
    policy = TargetPolicy(((0, LunPolicy(Limits(iops=1000, burst=0.0), (
        InitiatorPolicy("iqn.2026-12.io.pytarget.test:a", Limits(min_iops=800)),))),))
    d = Driver(policy)
    d.run_until(5.0, {"c": (C, 32, 4096)})
    assert d.count("c", 1.0, 5.0) == pytest.approx(4000, abs=3)


def test_per_nexus_policy_limits_each_nexus_separately() -> None:
    policy = TargetPolicy(initiators=(InitiatorPolicy("*", Limits(iops=100, burst=0.0),
                                                      per=BY_NEXUS),))
    d = Driver(policy)
    a2 = nexus("a", isid=2)
    d.run_until(5.0, {"a1": (A, 4, 4096), "a2": (a2, 4, 4096)})
    assert d.count("a1", 1.0, 5.0) == pytest.approx(400, abs=2)
    assert d.count("a2", 1.0, 5.0) == pytest.approx(400, abs=2)


def test_per_initiator_policy_spans_its_nexuses_and_luns() -> None:
    policy = TargetPolicy(initiators=(InitiatorPolicy("*", Limits(iops=100, burst=0.0)),))
    d = Driver(policy)
    a2 = nexus("a", isid=2)
    d.run_until(5.0, {"a1": (A, 4, 4096), "a2": (a2, 4, 4096)})
    total = d.count("a1", 1.0, 5.0) + d.count("a2", 1.0, 5.0)
    assert total == pytest.approx(400, abs=2)
    assert d.count("a1", 1.0, 5.0) == pytest.approx(200, abs=2)


def test_withdrawn_command_frees_its_place() -> None:
    d = Driver(lun_policy(iops=1))
    d.now = 1.0
    d.submit(A, label="first")
    second = d.submit(A, label="second")
    third = d.submit(A, label="third")
    assert d.s.cancel(second)
    assert not d.s.cancel(second)
    d.run_until(2.5)
    assert [lab for _, lab in d.started] == ["first", "third"]
    assert third.queue is None


def test_reload_changes_a_policy_for_waiting_commands() -> None:
    d = Driver(lun_policy(iops=1))
    d.now = 1.0
    for _ in range(20):
        d.submit(A)
    assert len(list(d.s.waiting())) == 19
    d.now = 1.5
    d._record(d.s.set_policy(lun_policy(iops=1000), d.now))
    d.run_until(1.6)
    assert d.count("a", 1.5, 1.6) == 19
    # and a policy removed releases everything waiting
    for _ in range(3000):
        d.submit(A)
    d._record(d.s.set_policy(TargetPolicy(), d.now))
    assert not list(d.s.waiting())
    assert d.s.queue_of(0, A) is None


def test_reload_keeps_the_state_of_unchanged_policies() -> None:
    lun0 = (0, LunPolicy(Limits(iops=10, burst=0.0)))
    d = Driver(TargetPolicy((lun0,)))
    d.now = 1.0
    d.submit(A)
    d.submit(A)
    before = d.s.limiters[("lun", 0)]
    d._record(d.s.set_policy(TargetPolicy((lun0, (1, LunPolicy(Limits(iops=5))))), d.now))
    assert d.s.limiters[("lun", 0)] is before
    assert d.count("a", 1.0, 1.01) == 1  # the second still waits for its turn
    assert d.s.next_wakeup() == pytest.approx(1.1)


def test_statistics_and_rates() -> None:
    d = Driver(lun_policy(iops=100))
    d.run_until(3.0, {"a": (A, 2, 16384)})
    (policy,) = d.s.snapshot(d.now)
    assert policy["policy"] == "lun 0" and policy["limits"]["iops"] == 100
    (flow,) = policy["flows"]
    assert flow["flow"] == "all"
    assert flow["iops"] == pytest.approx(100, rel=0.05)
    assert flow["read_bps"] == pytest.approx(50 * 16384, rel=0.05)
    assert flow["throttled"] > 0 and flow["queued"] == 2
    assert flow["commands"] == d.count("a", 0.0, 3.0)
