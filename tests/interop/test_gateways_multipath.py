"""dm-multipath in the Linux guest over two gateway processes of one target, started from one
configuration file with different --gateway (docs/guides/scale-out.md): the guest's
`multipath -ll` shows an active/optimized and an active/non-optimized path group, and when the
host moves the LUN to the other gateway (owner changed, both gateways reloaded) the kernel sees
the states swap and I/O through the map goes on (tests/interop/guest/gateways_multipath.sh).

Skipped when ../shared/interop/linux-initiator is missing or cannot run here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pytarget.config import load
from pytarget.control import request, socket_path

from ..conftest import TARGET_IQN, LiveTarget, start_target
from .run import run_guest, unavailable
from .test_linux_initiator import target_trouble

pytestmark = [pytest.mark.interop, pytest.mark.slow]

CONFIG = {
    "gateways": [{"name": "gw1", "portals": ["127.0.0.1:0"]},
                 {"name": "gw2", "portals": ["127.0.0.1:0"]}],
    "targets": [{"name": TARGET_IQN, "luns": [{"id": 0, "path": "lun0.img", "size": "64MiB"}]}],
}


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[LiveTarget]]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    config = tmp_path / "pytarget.yaml"
    config.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    started: list[LiveTarget] = []
    try:
        for name in ("gw1", "gw2"):
            started.append(start_target(config, "--gateway", name, log_name=f"{name}.log"))
        yield started
    finally:
        for target in started:
            target.stop()


def test_alua_path_groups_and_an_ownership_move(gateways: list[LiveTarget],
                                               tmp_path: Path) -> None:
    config = gateways[0].config
    changes: list[str] = []

    def move_lun0_to_gw2() -> None:
        doc = yaml.safe_load(config.read_text())
        doc["targets"][0]["luns"][0]["owner"] = "gw2"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        for name in ("gw1", "gw2"):
            answer = request(socket_path(load(config, name)), "reload")
            changes.extend(answer.get("changes", []))

    run = run_guest(gateways[0], "gateways_multipath.sh", tmp_path / "guest-out", timeout=400,
                    marks={"move": move_lun0_to_gw2},
                    extra_args=["-p", str(gateways[1].port), "--multipath"])
    if not run.ok or run.mark_errors:
        pytest.fail(run.report() + "\n" + "\n".join(run.mark_errors), pytrace=False)
    assert len([c for c in changes if "owner gw2" in c]) == 2, changes
    for target in gateways:
        assert not target_trouble(target), target.log_text()[-3000:]
