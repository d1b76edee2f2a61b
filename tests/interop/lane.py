"""Guest boots shared by several tests: each test's guest script is a part of one boot.

A `SharedBoot` collects parts: a part is a context manager (`SharedBoot.part`) that starts
what its script runs against (targets, file systems, a Ceph image) in a directory of its own and
yields a `PartPlan`: the `GuestPart` for run.py's `run_guests` and whatever its test needs
afterwards (`state`: the targets, paths, host-side measurements).  `part` returns the fixture
`guest_NAME` through which the test gets its `PartOutcome`.  The first test that asks for a part
of a boot sets up every part of that boot whose fixture a selected test of the session uses
(so `-k` runs only what it selects) and boots once for all of them; each test then asserts on
its own part's `GuestRun`, and its part's context is closed after it (the rest at the end of
the session, before the session's fixtures such as the Ceph cluster go).  A part whose setup
skips (no Ceph here) or fails skips or fails its own test only.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from .run import GuestPart, GuestRun, run_guests, unavailable


@dataclass
class PartContext:
    """What a part's setup gets: its own directory and the session's fixtures."""

    directory: Path
    request: pytest.FixtureRequest

    def fixture(self, name: str) -> Any:
        """A session-scoped fixture's value (e.g. ceph_cluster); its skip skips the part."""
        return self.request.getfixturevalue(name)


@dataclass
class PartPlan:
    part: GuestPart
    state: Any = None
    initiator_iqn: str | None = None  # the part needs the guest to have this name


@dataclass
class PartOutcome:
    run: GuestRun
    state: Any


PartSetup = Callable[[PartContext], AbstractContextManager[PartPlan]]


@dataclass
class _Boot:
    """One session's run of a boot."""

    outcomes: dict[str, PartOutcome | tuple[str, str]] = field(default_factory=dict)
    stacks: dict[str, ExitStack] = field(default_factory=dict)

    def close(self, name: str) -> None:
        stack = self.stacks.pop(name, None)
        if stack is not None:
            stack.close()

    def close_all(self) -> None:
        for name in list(self.stacks):
            self.close(name)


class SharedBoot:
    def __init__(self, name: str) -> None:
        self.name = name
        self.setups: dict[str, PartSetup] = {}
        self.key = pytest.StashKey[_Boot]()

    def part(self, name: str, setup: PartSetup) -> Any:
        """Add a part to the boot; returns its fixture `guest_NAME` (assign it in the test
        module under that name)."""
        if name in self.setups:
            raise ValueError(f"boot {self.name} has a part {name} already")
        self.setups[name] = setup

        @pytest.fixture(name=f"guest_{name}")
        def outcome(request: pytest.FixtureRequest) -> Iterator[PartOutcome]:
            boot = self._boot(request)
            got = boot.outcomes[name]
            if isinstance(got, tuple):
                kind, message = got
                if kind == "skip":
                    pytest.skip(message)
                pytest.fail(message, pytrace=False)
            print(f"{name}: {got.run.verdict()}")
            try:
                yield got
            finally:
                boot.close(name)

        return outcome

    def _boot(self, request: pytest.FixtureRequest) -> _Boot:
        boot = request.config.stash.get(self.key, None)
        if boot is not None:
            return boot
        boot = request.config.stash[self.key] = _Boot()
        wanted = {f"guest_{name}" for name in self.setups}
        used = {fixture for item in request.session.items
                for fixture in getattr(item, "fixturenames", ()) if fixture in wanted}
        names = [name for name in self.setups if f"guest_{name}" in used]
        reason = unavailable()
        if reason:
            boot.outcomes = {name: ("skip", reason) for name in names}
            return boot
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        plans: dict[str, PartPlan] = {}
        try:
            for name in names:
                stack = boot.stacks[name] = ExitStack()
                context = PartContext(factory.mktemp(f"{self.name}-{name}"), request)
                try:
                    plans[name] = stack.enter_context(self.setups[name](context))
                except pytest.skip.Exception as exc:
                    boot.outcomes[name] = ("skip", str(exc.msg))
                except Exception:
                    boot.outcomes[name] = ("error", f"setting up guest part {name} failed:\n"
                                                    + traceback.format_exc())
        finally:
            # after the session fixtures the parts use, so it runs before their teardown
            request.session.addfinalizer(boot.close_all)
        initiators = {plan.initiator_iqn for plan in plans.values()} - {None}
        if len(initiators) > 1:
            raise ValueError(f"the parts of boot {self.name} need different initiator names: "
                             f"{initiators}")
        if plans:
            runs = run_guests([replace(plan.part, name=name) for name, plan in plans.items()],
                              factory.mktemp(f"{self.name}-boot"),
                              initiator_iqn=next(iter(initiators), None))
            for name, plan in plans.items():
                boot.outcomes[name] = PartOutcome(runs[name], plan.state)
        return boot


# Every guest test of the suite is a part of this one boot: each boot costs 20 to 60 s under
# TCG, the parts' scripts do not depend on each other, parts.sh puts the guest back as it
# booted between them, and a part that fails or hangs (its own time limit) costs only its own
# test.  The guest's initiator name is the one test_guides.py's configuration admits.  All 13
# parts in one boot, at a load average of 3 on the 2-core TCG machine: 1151 s of guest time, of
# which 1040 s are the scripts' own, 36 s the boot and 51 s the 12 resets (4 s each); the 13
# boots they had before cost 22 to 34 s each.
GUEST = SharedBoot("guest")
