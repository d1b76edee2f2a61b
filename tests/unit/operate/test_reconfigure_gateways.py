"""A reload of a gateway's configuration: gateways added or LUN owners changed reach every
running LU (new target port groups, ASYMMETRIC ACCESS STATE CHANGED), while this process's own
target port never changes under its sessions."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from pytarget.config import parse
from pytarget.core.sense import Asc
from pytarget.reconfigure import Reload, ReloadRefused

from .test_reconfigure import FakeServer

TARGET = "iqn.2026-11.io.pytarget:disk"
NEXUS_KEY = ("iqn.2026-11.io.pytarget.test:i", bytes(6), TARGET, 2)
BASE = f"""\
gateways:
  - {{name: gw1, portals: ["127.0.0.1:3260"]}}
  - {{name: gw2, portals: ["127.0.0.2:3260"]}}
targets:
  - name: {TARGET}
    luns:
      - {{id: 0, path: d0.img, size: 1MiB}}
      - {{id: 1, path: d1.img, size: 1MiB}}
"""


@pytest.fixture
def server(tmp_path: Path) -> Any:
    server = FakeServer(parse(BASE, str(tmp_path / "t.yaml"), tmp_path, "gw2"))
    yield server
    server.close()


def reload(server: FakeServer, text: str, gateway: str = "gw2") -> list[str]:
    new = parse(text, server.config.file, server.config.base, gateway)
    return asyncio.run(Reload(server, new).apply())


def units(server: FakeServer) -> list[Any]:
    node = server.registry.target(TARGET)
    assert node is not None
    return [node.luns[0], node.luns[1]]


def test_a_gateway_added_and_an_owner_changed(server: FakeServer) -> None:
    lu0, lu1 = units(server)
    assert (lu0.alua.owner, lu1.alua.owner) == (1, 2)
    for lu in (lu0, lu1):
        lu.ua[NEXUS_KEY] = deque()  # a nexus that has used the LU, its attentions cleared
    text = BASE.replace("targets:", '  - {name: gw3, portals: ["127.0.0.3:3260"]}\ntargets:')
    text = text.replace("id: 1, path: d1.img,", "id: 1, owner: gw1, path: d1.img,")
    changes = reload(server, text)
    assert units(server) == [lu0, lu1]  # the same units, not replacements
    for lu in (lu0, lu1):
        assert [g.name for g in lu.alua.groups.groups] == ["gw1", "gw2", "gw3"]
        assert list(lu.ua[NEXUS_KEY]) == [Asc.ASYMMETRIC_ACCESS_STATE_CHANGED]
    assert (lu0.alua.owner, lu1.alua.owner) == (1, 1)
    assert (lu0.alua.status, lu1.alua.status) == (0x00, 0x02)  # LUN 1: altered implicitly
    assert any("LUN 1: target port groups changed, owner gw1" in c for c in changes)
    # The same configuration again changes nothing and owes nothing.
    for lu in (lu0, lu1):
        lu.ua[NEXUS_KEY].clear()
    assert not any("target port groups" in c for c in reload(server, text))
    assert not lu0.ua[NEXUS_KEY] and not lu1.ua[NEXUS_KEY]


def test_this_gateways_port_never_changes(server: FakeServer) -> None:
    lu0, _ = units(server)
    with pytest.raises(ReloadRefused, match="target port group would change from 2 to 9"):
        reload(server, BASE.replace("{name: gw2,", "{name: gw2, id: 9,"))
    with pytest.raises(ReloadRefused, match="would change from 2 to 1"):
        reload(server, BASE, gateway="gw1")
    assert lu0.alua.groups.local == 2 and server.registry.tpgt == 2
