"""Storage QoS: the sans-I/O scheduler that decides when each throttled command may start.

Time is an argument (`now`, seconds on any monotonic clock), as in the iSCSI state machines:
nothing here sleeps or reads a clock, so tests drive it with a fake one. The device server's
glue (`scsi/qos.py`) feeds it commands and starts what it releases.

Model (docs/qos.md):

- A *limiter* is one policy applied to one flow: a LUN's policy (every initiator together), or
  an initiator policy applied to one initiator name or one I_T nexus, on a LUN or across a
  target. Its maximums are token buckets in the GCRA form (a theoretical arrival time per
  bucket; a command may start once `now >= tat - burst`, then moves `tat` on by its cost over
  the rate), so a late start is forgiven up to the burst and long-run rates are exact.
- A command costs `ceil(bytes / normalize)` normalized IOs (at least one, MS-SQOS) and its
  bytes, counted against the read or write bandwidth by direction and against the total.
- Commands wait in a *queue* per (LUN, I_T nexus), first in first out. A queue's head may start
  when every limiter it is under allows it. Among heads that may start, a flow owed its minimum
  (its reservation tag is due, as in mClock) goes first, earliest tag first; the others share
  by start-time fair queueing, so a flooding flow cannot starve a light one.
- Minimums are reserved out of the LUN's own maximum, the capacity the operator promises for
  it: contention is demand above that maximum.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import Nexus

NORMALIZE = 8192  # bytes per normalized IO (MS-SQOS)
DEFAULT_BURST = 0.02  # seconds of a limit that may go at once after a pause
RATE_WINDOW = 1.0  # seconds over which current rates are measured

BY_INITIATOR = "initiator"
BY_NEXUS = "nexus"
ANY_INITIATOR = "*"


@dataclass(frozen=True)
class Limits:
    """Maximums (None: unlimited) and a minimum of one policy."""

    iops: float | None = None  # normalized IOs per second
    bps: float | None = None  # bytes per second, reads and writes together
    read_bps: float | None = None
    write_bps: float | None = None
    burst: float = DEFAULT_BURST  # seconds
    min_iops: float | None = None  # normalized IOs per second reserved under contention

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.iops, self.bps, self.read_bps, self.write_bps))

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in (("iops", self.iops), ("bps", self.bps),
                                  ("read_bps", self.read_bps), ("write_bps", self.write_bps),
                                  ("min_iops", self.min_iops), ("burst", self.burst))
                if v is not None}


@dataclass(frozen=True)
class InitiatorPolicy:
    """Limits for one initiator name (or every initiator, `*`), applied to each initiator name
    (`per: initiator`) or to each of its I_T nexuses (`per: nexus`)."""

    initiator: str
    limits: Limits
    per: str = BY_INITIATOR

    def matches(self, initiator_name: str) -> bool:
        return self.initiator == ANY_INITIATOR or self.initiator.lower() == initiator_name.lower()


@dataclass(frozen=True)
class LunPolicy:
    limits: Limits = Limits()
    initiators: tuple[InitiatorPolicy, ...] = ()


@dataclass(frozen=True)
class TargetPolicy:
    """Every QoS policy of one target: per LUN, and per initiator across the target."""

    luns: tuple[tuple[int, LunPolicy], ...] = ()
    initiators: tuple[InitiatorPolicy, ...] = ()
    normalize: int = NORMALIZE

    @property
    def empty(self) -> bool:
        return not self.initiators and not any(
            p.limits.limited or p.initiators for _, p in self.luns)

    def named(self) -> list[tuple[str, Limits]]:
        """Every policy by the name its flows report."""
        out = []
        for lun, p in self.luns:
            if p.limits.limited:
                out.append((f"lun {lun}", p.limits))
            out += [(_policy_name(f"lun {lun} ", ip), ip.limits) for ip in p.initiators]
        out += [(_policy_name("", ip), ip.limits) for ip in self.initiators]
        return out

    def lun(self, lun: int) -> LunPolicy | None:
        for n, p in self.luns:
            if n == lun:
                return p
        return None


def normalized_ios(nbytes: int, normalize: int = NORMALIZE) -> int:
    """What one I/O of `nbytes` counts: ceil(bytes / normalize), at least one (MS-SQOS)."""
    return max(1, -(-nbytes // normalize))


class _Bucket:
    """One maximum as GCRA: `tat` is when the bucket would be empty again."""

    __slots__ = ("rate", "tolerance", "tat")

    def __init__(self, rate: float, tolerance: float, now: float) -> None:
        self.rate = rate
        self.tolerance = tolerance
        self.tat = now

    def ready_at(self) -> float:
        return self.tat - self.tolerance

    def charge(self, cost: float, now: float) -> None:
        self.tat = max(self.tat, now) + cost / self.rate


class Limiter:
    """One policy applied to one flow: its buckets, reservation tag and statistics."""

    def __init__(self, name: str, flow: str, limits: Limits, now: float) -> None:
        self.name = name  # the policy, e.g. "lun 0" or "lun 0 initiator iqn.x (per nexus)"
        self.flow = flow  # "all", an initiator name or an initiator port name
        self.limits = limits
        tol = limits.burst

        def bucket(rate: float | None) -> _Bucket | None:
            return None if rate is None else _Bucket(rate, tol, now)

        self.iops = bucket(limits.iops)
        self.bps = bucket(limits.bps)
        self.read_bps = bucket(limits.read_bps)
        self.write_bps = bucket(limits.write_bps)
        self.min_iops = limits.min_iops
        self.r_next = now  # reservation tag (mClock R-tag) of the flow's next command
        # statistics
        self.commands = 0
        self.throttled = 0
        self.queued_seconds = 0.0
        self.ios = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._window_start = now
        self._window = [0, 0, 0]  # ios, bytes read, bytes written in the current window
        self._rates = (0.0, 0.0, 0.0)
        self._rates_at = now

    def _buckets(self, item: Item) -> Iterator[_Bucket]:
        for b in (self.iops, self.bps, self.write_bps if item.write else self.read_bps):
            if b is not None:
                yield b

    def ready_at(self, item: Item) -> float:
        return max((b.ready_at() for b in self._buckets(item)), default=-math.inf)

    def charge(self, item: Item, now: float) -> None:
        if self.iops is not None:
            self.iops.charge(item.ios, now)
        for b in (self.bps, self.write_bps if item.write else self.read_bps):
            if b is not None:
                b.charge(item.nbytes, now)
        if self.min_iops:
            self.r_next = max(self.r_next, item.arrival) + item.ios / self.min_iops
        self.commands += 1
        self.ios += item.ios
        if now - self._window_start >= RATE_WINDOW:
            self._roll(now)
        w = self._window
        w[0] += item.ios
        if item.write:
            self.bytes_written += item.nbytes
            w[2] += item.nbytes
        else:
            self.bytes_read += item.nbytes
            w[1] += item.nbytes

    def _roll(self, now: float) -> None:
        span = now - self._window_start
        w = self._window
        if span >= 2 * RATE_WINDOW:
            self._rates = (0.0, 0.0, 0.0) if span > 3 * RATE_WINDOW else \
                (w[0] / span, w[1] / span, w[2] / span)
        else:
            self._rates = (w[0] / span, w[1] / span, w[2] / span)
        self._rates_at = now
        self._window_start = now
        self._window = [0, 0, 0]

    def rates(self, now: float) -> tuple[float, float, float]:
        """Normalized IOPS, read and write bytes per second over the last full window."""
        if now - self._window_start >= RATE_WINDOW:
            self._roll(now)
        return self._rates

    def snapshot(self, now: float, queued: int) -> dict[str, Any]:
        iops, rd, wr = self.rates(now)
        return {"flow": self.flow, "iops": round(iops, 1), "read_bps": int(rd),
                "write_bps": int(wr), "queued": queued, "commands": self.commands,
                "throttled": self.throttled,
                "queued_seconds": round(self.queued_seconds, 6)}


class Item:
    """One command the scheduler holds or has released; `payload` is the caller's."""

    __slots__ = ("ios", "nbytes", "write", "arrival", "seq", "queue", "payload")

    def __init__(self, ios: int, nbytes: int, write: bool, payload: Any = None) -> None:
        self.ios = ios
        self.nbytes = nbytes
        self.write = write
        self.payload = payload
        self.arrival = 0.0
        self.seq = 0
        self.queue: Queue | None = None


class Queue:
    """The commands of one (LUN, I_T nexus) waiting for their turn, in arrival order."""

    __slots__ = ("key", "lun", "nexus_key", "initiator", "port_name", "limiters", "reserve",
                 "items", "p_next")

    def __init__(self, lun: int, nexus_key: tuple[Any, ...], initiator: str, port_name: str,
                 limiters: list[Limiter]) -> None:
        self.key = (lun, nexus_key)
        self.lun = lun
        self.nexus_key = nexus_key
        self.initiator = initiator
        self.port_name = port_name
        self.limiters = limiters
        self.reserve = next((lim for lim in limiters if lim.min_iops), None)
        self.items: deque[Item] = deque()
        self.p_next = 0.0  # start-time fair queueing: finish tag of the last started command


@dataclass
class Scheduler:
    """The QoS scheduler of one target (every LUN and initiator policy of it)."""

    policy: TargetPolicy = field(default_factory=TargetPolicy)
    now: float = 0.0

    def __post_init__(self) -> None:
        self.limiters: dict[tuple[Any, ...], Limiter] = {}
        self.queues: dict[tuple[Any, ...], Queue | None] = {}
        self.backlogged: dict[tuple[Any, ...], Queue] = {}
        self._keep: dict[tuple[Any, ...], Limiter] = {}  # limiters a reload may reuse
        self._seq = count()
        self._vtime = 0.0  # start tag of the command last started in the share phase

    # ------------------------------------------------------------------ classification
    def queue_of(self, lun: int, nexus: Nexus) -> Queue | None:
        """The queue a command of `nexus` on `lun` waits in, None when no policy applies."""
        try:
            return self.queues[(lun, nexus.key)]
        except KeyError:
            return self.queue(lun, nexus.key, nexus.initiator_name, nexus.initiator_port_name)

    def queue(self, lun: int, nexus_key: tuple[Any, ...], initiator: str,
              port_name: str) -> Queue | None:
        """The queue of (LUN, I_T nexus), made on first use; None when no policy applies."""
        key = (lun, nexus_key)
        q = self.queues.get(key)
        if q is not None or key in self.queues:
            return q
        limiters = [self._limiter(*wanted) for wanted in self._wanted(lun, initiator, port_name)]
        q = Queue(lun, nexus_key, initiator, port_name, limiters) if limiters else None
        self.queues[key] = q
        return q

    def _wanted(self, lun: int, initiator: str,
                port_name: str) -> Iterator[tuple[tuple[Any, ...], str, str, Limits]]:
        """(key, policy name, flow, limits) of each limiter a command on `lun` is under."""
        lp = self.policy.lun(lun)
        if lp is not None and lp.limits.limited:
            yield ("lun", lun), f"lun {lun}", "all", lp.limits
        for where, policies, scope in ((f"lun {lun} ", lp.initiators if lp else (), lun),
                                       ("", self.policy.initiators, "*")):
            chosen = _choose(policies, initiator)
            if chosen is None:
                continue
            i, p = chosen
            flow = port_name if p.per == BY_NEXUS else initiator.lower()
            yield ("init", scope, i, flow), _policy_name(where, p), flow, p.limits

    def _limiter(self, key: tuple[Any, ...], name: str, flow: str, limits: Limits) -> Limiter:
        lim = self.limiters.get(key) or self._keep.get(key)
        if lim is None or lim.limits != limits or lim.name != name:
            lim = Limiter(name, flow, limits, self.now)
        self.limiters[key] = lim
        return lim

    # ------------------------------------------------------------------ commands
    def request(self, q: Queue, item: Item, now: float) -> list[Item]:
        """Queue `item`; the items (it, maybe others) that may start now, already charged."""
        item.arrival = now
        item.seq = next(self._seq)
        item.queue = q
        q.items.append(item)
        self.backlogged[q.key] = q
        return self.poll(now)

    def cancel(self, item: Item) -> bool:
        """Withdraw a waiting item (aborted); False if it was not waiting."""
        q = item.queue
        if q is None:
            return False
        try:
            q.items.remove(item)
        except ValueError:
            return False
        item.queue = None
        if not q.items:
            self.backlogged.pop(q.key, None)
        return True

    def waiting(self) -> Iterator[Item]:
        for q in list(self.backlogged.values()):
            yield from q.items

    def poll(self, now: float) -> list[Item]:
        """Every item that may start at `now`, in the order they should, charged."""
        self.now = now
        started: list[Item] = []
        while self.backlogged:
            best: tuple[int, float, int] | None = None
            chosen: Queue | None = None
            for q in self.backlogged.values():
                head = q.items[0]
                if any(lim.ready_at(head) > now for lim in q.limiters):
                    continue
                res = q.reserve
                if res is not None and max(res.r_next, head.arrival) <= now:
                    key = (0, max(res.r_next, head.arrival), head.seq)
                else:
                    key = (1, max(q.p_next, self._vtime), head.seq)
                if best is None or key < best:
                    best, chosen = key, q
            if chosen is None or best is None:
                break
            item = chosen.items.popleft()
            if not chosen.items:
                del self.backlogged[chosen.key]
            item.queue = None
            if best[0] == 1:
                self._vtime = best[1]
                chosen.p_next = best[1] + item.ios
            else:
                chosen.p_next = max(chosen.p_next, self._vtime) + item.ios
            waited = now - item.arrival
            for lim in chosen.limiters:
                lim.charge(item, now)
                if waited > 0:
                    lim.throttled += 1
                    lim.queued_seconds += waited
            started.append(item)
        return started

    def next_wakeup(self) -> float | None:
        """When `poll` may next release something, None when nothing waits."""
        when: float | None = None
        for q in self.backlogged.values():
            head = q.items[0]
            t = max((lim.ready_at(head) for lim in q.limiters), default=-math.inf)
            if when is None or t < when:
                when = t
        return when

    # ------------------------------------------------------------------ reload
    def set_policy(self, policy: TargetPolicy, now: float) -> list[Item]:
        """Apply a new policy to every flow, waiting commands included (each keeps its place
        in its queue); returns what may start now. A limiter whose policy did not change keeps
        its state and statistics."""
        self.now = now
        old_queues = list(self.backlogged.values())
        old = self.limiters
        self.policy = policy
        self.limiters = {}
        self.queues = {}
        self.backlogged = {}
        self._keep = old
        released: list[Item] = []
        try:
            for oq in old_queues:
                q = self.queue(oq.lun, oq.nexus_key, oq.initiator, oq.port_name)
                for item in oq.items:
                    item.queue = q
                    if q is None:
                        released.append(item)
                    else:
                        q.items.append(item)
                if q is not None and q.items:
                    q.p_next = oq.p_next
                    self.backlogged[q.key] = q
            for key, lim in old.items():
                if key not in self.limiters and self._still_wanted(key) == (lim.name,
                                                                            lim.limits):
                    self.limiters[key] = lim
        finally:
            self._keep = {}
        return released + self.poll(now)

    def _still_wanted(self, key: tuple[Any, ...]) -> tuple[str, Limits] | None:
        """The (name, limits) the current policy gives limiter `key`, None if it gives none."""
        if key[0] == "lun":
            lp = self.policy.lun(key[1])
            return (f"lun {key[1]}", lp.limits) if lp is not None and lp.limits.limited else None
        _, scope, i, flow = key
        if scope == "*":
            policies, where = self.policy.initiators, ""
        else:
            lp = self.policy.lun(scope)
            policies, where = (lp.initiators if lp else ()), f"lun {scope} "
        if i >= len(policies):
            return None
        return _policy_name(where, policies[i]), policies[i].limits

    # ------------------------------------------------------------------ visibility
    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Each policy with its limits and its flows (current rates, queue, statistics)."""
        queued: dict[int, int] = {}
        for q in self.backlogged.values():
            for lim in q.limiters:
                queued[id(lim)] = queued.get(id(lim), 0) + len(q.items)
        flows: dict[str, list[dict[str, Any]]] = {}
        for _, lim in sorted(self.limiters.items(), key=lambda kv: repr(kv[0])):
            flows.setdefault(lim.name, []).append(lim.snapshot(now, queued.get(id(lim), 0)))
        return [{"policy": name, "limits": limits.describe(), "flows": flows.get(name, [])}
                for name, limits in self.policy.named()]


def _policy_name(where: str, p: InitiatorPolicy) -> str:
    return f"{where}initiator {p.initiator}" + (" (per nexus)" if p.per == BY_NEXUS else "")


def _choose(policies: Iterable[InitiatorPolicy],
            initiator: str) -> tuple[int, InitiatorPolicy] | None:
    """The policy for `initiator`: one naming it before one for every initiator."""
    fallback = None
    for i, p in enumerate(policies):
        if p.initiator == ANY_INITIATOR:
            if fallback is None:
                fallback = (i, p)
        elif p.matches(initiator):
            return i, p
    return fallback

