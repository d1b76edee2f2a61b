"""dm-multipath in the Linux guest over two gateway processes of one target, started from one
configuration file with different --gateway (docs/guides/scale-out.md): the guest's
`multipath -ll` shows an active/optimized and an active/non-optimized path group, and when the
host moves the LUN to the other gateway (owner changed, both gateways reloaded) the kernel sees
the states swap and I/O through the map goes on (tests/interop/guest/gateways_multipath.sh, a
part of lane.py's shared boot).

Skipped when ../shared/interop/linux-initiator is missing or cannot run here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml

from pytarget.config import load
from pytarget.control import request, socket_path

from ..conftest import gateway_targets
from .lane import GUEST, PartContext, PartOutcome, PartPlan
from .run import GuestPart
from .test_linux_initiator import target_trouble

pytestmark = [pytest.mark.interop, pytest.mark.slow]

LUNS = [{"id": 0, "path": "lun0.img", "size": "64MiB"}]


@contextmanager
def _multipath(context: PartContext) -> Iterator[PartPlan]:
    with gateway_targets(context.directory, LUNS) as gateways:
        config = gateways[0].config
        changes: list[str] = []

        def move_lun0_to_gw2() -> None:
            doc = yaml.safe_load(config.read_text())
            doc["targets"][0]["luns"][0]["owner"] = "gw2"
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            for name in ("gw1", "gw2"):
                answer = request(socket_path(load(config, name)), "reload")
                changes.extend(answer.get("changes", []))

        yield PartPlan(GuestPart("multipath", "gateways_multipath.sh",
                                 [target.port for target in gateways], gateways[0].iqn, 400,
                                 marks={"move": move_lun0_to_gw2}, multipath=True,
                                 target_log=gateways[0].log), (gateways, changes))


guest_multipath = GUEST.part("multipath", _multipath)


def test_alua_path_groups_and_an_ownership_move(guest_multipath: PartOutcome) -> None:
    run, (gateways, changes) = guest_multipath.run, guest_multipath.state
    if not run.ok or run.mark_errors:
        pytest.fail(run.report() + "\n" + "\n".join(run.mark_errors), pytrace=False)
    assert len([c for c in changes if "owner gw2" in c]) == 2, changes
    for target in gateways:
        assert not target_trouble(target), target.log_text()[-3000:]
