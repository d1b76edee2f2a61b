"""The ownership state machine (cluster/ownership.py) with time passed in: who follows whom,
when a silent owner is declared dead, which survivor fences and claims, that a lost race is
harmless, that a restarted gateway rejoins without taking ownership back, and the record's
encoding."""

from __future__ import annotations

import pytest

from pytarget.cluster.ownership import (
    Claim,
    Follow,
    Member,
    OwnershipMachine,
    Record,
    Transition,
    decode,
    encode_member,
    encode_owner,
    parse_addrs,
)

GATEWAYS = ("gw1", "gw2", "gw3")
TIMEOUT = 5.0


class Cluster:
    """The record as several machines see it: heartbeats and claims applied in order."""

    def __init__(self, owner: str | None = None, epoch: int = 0) -> None:
        self.owner_raw = encode_owner(epoch, owner)
        self.members: dict[str, Member] = {}

    def beat(self, name: str, addrs: tuple[str, ...] | None = None) -> None:
        old = self.members.get(name)
        addrs = addrs or (old.addrs if old else (f"127.0.0.1:0/{name}",))
        self.members[name] = Member(addrs, (old.beat + 1) if old and old.addrs == addrs else 1)

    def record(self) -> Record:
        xattrs = {"owner": self.owner_raw}
        xattrs.update({f"gw.{n}": encode_member(m.addrs, m.beat)
                       for n, m in self.members.items()})
        return decode(xattrs)

    def claim(self, claim: Claim, by: str) -> bool:
        if claim.expected != self.owner_raw:
            return False
        self.owner_raw = encode_owner(claim.epoch, by, claim.fence)
        return True


def machine(local: str, now: float = 0.0, preferred: str = "gw1") -> OwnershipMachine:
    return OwnershipMachine(local, GATEWAYS, preferred, TIMEOUT, now)


def test_the_preferred_gateway_claims_epoch_1_and_the_others_follow_it() -> None:
    cluster = Cluster()
    m1, m2 = machine("gw1"), machine("gw2")
    assert m2.start(0.0, cluster.record(), ("127.0.0.1:0/gw2",)) == []  # already shows gw1
    actions = m1.start(0.0, cluster.record(), ("127.0.0.1:0/gw1",))
    assert actions == [Claim(cluster.owner_raw, 1, None)]
    assert cluster.claim(actions[0], "gw1")
    assert m1.observe(0.1, cluster.record()) == []
    assert m2.observe(0.1, cluster.record()) == []
    assert cluster.record().owner == "gw1" and cluster.record().epoch == 1


def test_a_silent_owner_is_dead_after_the_timeout_and_its_successor_fences_and_claims() -> None:
    cluster = Cluster("gw1", 1)
    m2, m3 = machine("gw2"), machine("gw3")
    for now in (0.0, 1.0, 2.0):
        for name in GATEWAYS:
            cluster.beat(name)
        assert m2.observe(now, cluster.record()) == []
        assert m3.observe(now, cluster.record()) == []
    # gw1 is killed after its beat at t=2: it stays alive until 5 s of silence
    for now in (3.0, 4.0, 6.9):
        cluster.beat("gw2")
        cluster.beat("gw3")
        assert m2.observe(now, cluster.record()) == []
        assert m3.observe(now, cluster.record()) == []
    cluster.beat("gw2")
    cluster.beat("gw3")
    record = cluster.record()
    actions3 = m3.observe(7.0, record)
    actions2 = m2.observe(7.0, record)
    assert actions3 == [Transition("owner gw1 silent for 5.0 s")]  # not gw3's turn
    assert actions2[0] == Transition("owner gw1 silent for 5.0 s")
    assert actions2[1] == Claim(record.raw, 2, "gw1", ("127.0.0.1:0/gw1",))
    assert m2.transitioning and m3.transitioning
    assert cluster.claim(actions2[1], "gw2")
    assert m2.observe(7.2, cluster.record()) == [Follow("gw2")]
    assert m3.observe(7.3, cluster.record()) == [Follow("gw2")]
    assert not m2.transitioning and not m3.transitioning
    assert cluster.record().fenced == ("127.0.0.1:0/gw1",)
    # nobody claims again: the new owner beats
    cluster.beat("gw2")
    assert m3.observe(20.0, cluster.record()) == []


def test_the_successor_skips_a_dead_gateway_in_the_configured_order() -> None:
    cluster = Cluster("gw1", 3)
    m3 = machine("gw3")
    for name in GATEWAYS:
        cluster.beat(name)
    m3.observe(0.0, cluster.record())
    cluster.beat("gw3")  # gw1 and gw2 both died
    actions = m3.observe(6.0, cluster.record())
    assert actions[-1] == Claim(cluster.owner_raw, 4, "gw1", ("127.0.0.1:0/gw1",))
    assert m3.successor("gw1", 6.0) == "gw3"
    assert m3.successor("gw3", 6.0) == "gw3"


def test_a_lost_claim_race_is_harmless_the_loser_follows_the_winner() -> None:
    cluster = Cluster("gw1", 1)
    m2, m3 = machine("gw2"), machine("gw3")
    for name in GATEWAYS:
        cluster.beat(name)
    m2.observe(0.0, cluster.record())
    m3.observe(0.0, cluster.record())
    # gw2's heartbeats were late as gw3 saw them (gw3 read before gw2 wrote): both think
    # it is their turn
    cluster.beat("gw3")
    record = cluster.record()
    claim3 = m3.observe(6.0, record)[-1]
    cluster.beat("gw2")
    claim2 = m2.observe(6.0, record)[-1]
    assert isinstance(claim2, Claim) and isinstance(claim3, Claim)
    assert cluster.claim(claim2, "gw2")
    assert not cluster.claim(claim3, "gw3")  # compared against epoch 1's bytes: refused
    assert m3.observe(6.1, cluster.record()) == [Follow("gw2")]
    assert m2.observe(6.1, cluster.record()) == [Follow("gw2")]


def test_a_restarted_gateway_rejoins_as_non_optimized_and_does_not_take_ownership_back() -> None:
    cluster = Cluster("gw2", 2)
    cluster.beat("gw2")
    cluster.beat("gw1", ("127.0.0.1:0/old",))  # the killed incarnation's last heartbeat
    m1 = machine("gw1", now=30.0)
    assert m1.start(30.0, cluster.record(), ("127.0.0.1:0/new",)) == [Follow("gw2")]
    for now in (31.0, 32.0, 60.0):
        cluster.beat("gw1", ("127.0.0.1:0/new",))
        cluster.beat("gw2")
        assert m1.observe(now, cluster.record()) == []
    assert m1.view == "gw2"


def test_an_owner_that_never_started_is_replaced_after_the_timeout_without_fencing() -> None:
    cluster = Cluster()
    m2 = machine("gw2", now=100.0)
    cluster.beat("gw2")
    assert m2.start(100.0, cluster.record(), ("127.0.0.1:0/gw2",)) == []
    cluster.beat("gw2")
    actions = m2.observe(105.0, cluster.record())
    assert actions[-1] == Claim(cluster.owner_raw, 1, "gw1", ())


def test_an_operator_move_is_claimed_by_the_new_preferred_gateway_without_fencing() -> None:
    cluster = Cluster("gw1", 1)
    m2 = machine("gw2")
    for name in GATEWAYS:
        cluster.beat(name)
    assert m2.observe(0.0, cluster.record()) == []
    m2.set_preferred("gw2")
    actions = m2.observe(1.0, cluster.record())
    assert actions == [Claim(cluster.owner_raw, 2, "gw1")]
    assert cluster.claim(actions[0], "gw2")
    assert m2.observe(1.1, cluster.record()) == [Follow("gw2")]
    assert cluster.record().fenced == ()


def test_a_fenced_gateway_transitions_and_then_does_nothing() -> None:
    cluster = Cluster("gw2", 2)
    m1 = machine("gw1")
    assert m1.fenced() == [Transition("this gateway was fenced (its client is blocklisted)")]
    assert m1.fenced() == []
    assert m1.observe(100.0, cluster.record()) == []
    assert m1.transitioning


def test_a_gateway_that_keeps_beating_is_never_declared_dead() -> None:
    cluster = Cluster("gw1", 1)
    m2 = machine("gw2")
    for k in range(100):
        cluster.beat("gw1")
        cluster.beat("gw2")
        assert m2.observe(k * (TIMEOUT - 0.1), cluster.record()) == []


@pytest.mark.parametrize("xattrs, owner, epoch, members", [
    ({}, None, 0, {}),
    ({"owner": b"not json"}, None, 0, {}),
    ({"owner": encode_owner(3, "gw2", ["a"]), "gw.gw1": b"{bad", "other": b"x"}, "gw2", 3, {}),
    ({"owner": encode_owner(1, "gw1"), "gw.gw1": encode_member(["127.0.0.1:0/1"], 7)},
     "gw1", 1, {"gw1": Member(("127.0.0.1:0/1",), 7)}),
])
def test_record_decoding(xattrs: dict[str, bytes], owner: str | None, epoch: int,
                         members: dict[str, Member]) -> None:
    record = decode(xattrs)
    assert (record.owner, record.epoch, record.members) == (owner, epoch, members)


def test_an_owner_no_longer_configured_is_replaced_by_the_preferred_gateway() -> None:
    cluster = Cluster("gw9", 4)  # a gateway removed from the configuration
    m1, m2 = machine("gw1"), machine("gw2")
    assert m2.observe(0.0, cluster.record()) == []  # reports the preferred gw1 meanwhile
    actions = m1.observe(0.0, cluster.record())
    assert actions == [Claim(cluster.owner_raw, 5, "gw9")]
    assert cluster.claim(actions[0], "gw1")
    assert cluster.record().owner == "gw1"


@pytest.mark.parametrize("text, addrs", [
    ("127.0.0.1:0/992877245", ("127.0.0.1:0/992877245",)),
    ("[v2:10.0.0.1:0/5,v1:10.0.0.1:0/5]", ("10.0.0.1:0/5",)),
    ("[any:127.0.0.1:0/7]", ("127.0.0.1:0/7",)),
])
def test_client_addresses_in_the_form_the_blocklist_takes(text: str,
                                                          addrs: tuple[str, ...]) -> None:
    assert parse_addrs(text) == addrs


def test_gateways_must_be_configured() -> None:
    with pytest.raises(ValueError):
        OwnershipMachine("gw9", GATEWAYS, "gw1", TIMEOUT, 0.0)
