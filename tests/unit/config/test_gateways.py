"""`gateways:` and `gateway:` (docs/guides/scale-out.md): one configuration for every gateway,
each process choosing its own; errors name the key; LUN owners spread over the gateways; what
assembly builds for the chosen gateway (target port, port groups, owners)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytarget import assembly
from pytarget.config import ConfigError, load, local_gateway, lun_owner
from pytarget.control import socket_path
from pytarget.iscsi.params import SessionParams
from pytarget.iscsi.session import Session

IQN = "iqn.2026-11.io.pytarget:disk"
GATEWAYS = f"""\
gateways:
  - name: gw-a
    portals: ["127.0.0.1:3260", "[::1]:3260"]
  - name: gw-b
    portals: ["127.0.0.2:3261"]
    metrics: "127.0.0.2:9361"
  - name: gw-c
    id: 7
    portals: ["127.0.0.3:3260"]
targets:
  - name: {IQN}
    luns:
      - {{id: 0, path: d0.img, size: 1MiB}}
      - {{id: 1, path: d1.img, size: 1MiB}}
      - {{id: 2, path: d2.img, size: 1MiB}}
      - {{id: 3, path: d3.img, size: 1MiB}}
      - {{id: 4, path: d4.img, size: 1MiB, owner: gw-a}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_gateways_and_the_chosen_one(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAYS)
    unchosen = load(path)
    assert [(g.name, g.id) for g in unchosen.gateways] == [("gw-a", 1), ("gw-b", 2), ("gw-c", 7)]
    assert unchosen.gateway is None
    with pytest.raises(ConfigError) as exc:
        local_gateway(unchosen)
    assert exc.value.key == "gateway" and "gw-a, gw-b, gw-c" in str(exc.value)

    config = load(path, "gw-b")
    assert local_gateway(config) is config.gateways[1]
    assert config.portals == [("127.0.0.2", 3261)] and config.metrics == ("127.0.0.2", 9361)
    # Owners: LUN n on gateways[n mod 3] unless it names one.
    owners = [lun_owner(config, lc).name for lc in config.targets[0].luns]  # type: ignore[union-attr]
    assert owners == ["gw-a", "gw-b", "gw-c", "gw-a", "gw-a"]
    # The file's own `gateway:` key, and --gateway over it.
    keyed = write(tmp_path, GATEWAYS + "gateway: gw-c\n")
    assert load(keyed).portals == [("127.0.0.3", 3260)]
    assert load(keyed, "gw-a").portals == [("127.0.0.1", 3260), ("::1", 3260)]


def test_without_gateways_nothing_changes(tmp_path: Path) -> None:
    config = load(write(tmp_path, f"targets: [{{name: {IQN}, luns: []}}]\n"))
    assert config.gateways == [] and local_gateway(config) is None
    assert assembly.local_port(config) == (1, 1)
    groups = assembly.lu_port_groups(config)
    assert not groups.gateways and [(g.id, g.relative_ports) for g in groups.groups] == [(1, (1,))]
    assert socket_path(config) == tmp_path / "site.sock"


@pytest.mark.parametrize(("text", "key"), [
    (GATEWAYS.replace("owner: gw-a", "owner: gw-z"), "targets[0].luns[4].owner"),
    (GATEWAYS.replace("owner: gw-a", "owner: 3"), "targets[0].luns[4].owner"),
    (GATEWAYS.replace("name: gw-c", "name: gw-a"), "gateways[2].name"),
    (GATEWAYS.replace("name: gw-c", "name: 'gw c'"), "gateways[2].name"),
    (GATEWAYS.replace("id: 7", "id: 2"), "gateways[2].id"),
    (GATEWAYS.replace("id: 7", "id: 0"), "gateways[2].id"),
    (GATEWAYS.replace("id: 7", "id: 70000"), "gateways[2].id"),
    (GATEWAYS.replace('portals: ["127.0.0.3:3260"]', "portals: []"), "gateways[2].portals"),
    (GATEWAYS.replace("127.0.0.3:3260", "127.0.0.3:99999"), "gateways[2].portals[0]"),
    (GATEWAYS.replace('metrics: "127.0.0.2:9361"', "metrics: nowhere"), "gateways[1].metrics"),
    (GATEWAYS.replace("    id: 7\n", "    role: spare\n"), "gateways[2].role"),
    (GATEWAYS.replace("  - name: gw-c\n    id: 7\n", "  - id: 7\n"), "gateways[2].name"),
    (GATEWAYS + "gateway: gw-q\n", "gateway"),
    (GATEWAYS + "gateway: [gw-a]\n", "gateway"),
    (GATEWAYS + "portals: ['127.0.0.1:3260']\n", "portals"),
    (GATEWAYS + "workers: 2\n", "workers"),
    ("gateways: []\n" + GATEWAYS.partition("targets:")[1] + GATEWAYS.partition("targets:")[2],
     "gateways"),
    (f"targets: [{{name: {IQN}, luns: [{{id: 0, path: a.img, size: 1MiB, owner: gw}}]}}]\n",
     "targets[0].luns[0].owner"),
    (f"gateway: gw\ntargets: [{{name: {IQN}, luns: []}}]\n", "gateway"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert exc.value.key == key, str(exc.value)
    assert not list(tmp_path.glob("*.img"))


def test_unknown_gateway_on_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, GATEWAYS), "gw-x")
    assert exc.value.key == "gateway" and "gw-x" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, f"targets: [{{name: {IQN}, luns: []}}]\n"), "gw-a")
    assert exc.value.key == "gateway"


def test_each_gateway_has_its_own_control_socket(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAYS)
    assert socket_path(load(path, "gw-a")) == tmp_path / "site.gw-a.sock"
    assert socket_path(load(path, "gw-c")) == tmp_path / "site.gw-c.sock"


def test_assembly_builds_the_chosen_gateways_port(tmp_path: Path) -> None:
    config = load(write(tmp_path, GATEWAYS), "gw-c")
    assembly.prepare_backing_files(config)
    registry = assembly.build_registry(config)
    try:
        node = registry.target(IQN)
        assert node is not None
        assert registry.tpgt == registry.portal_group_tag() == 7
        assert (node.tpgt, node.relative_port) == (7, 7)
        lu = node.luns[2]
        assert lu.alua.groups.local == 7 and lu.alua.groups.gateways
        assert [(g.id, g.name, g.relative_ports) for g in lu.alua.groups.groups] == [
            (1, "gw-a", (1,)), (2, "gw-b", (2,)), (7, "gw-c", (7,))]
        assert lu.alua.summary() == {"gw-a": "active_non_optimized",
                                     "gw-b": "active_non_optimized",
                                     "gw-c": "active_optimized"}
        assert node.luns[4].alua.owner == 1
        # Same LU identity (NAA) whichever gateway builds it.
        other = load(write(tmp_path, GATEWAYS), "gw-a")
        assert assembly.lu_identity(IQN, 2, None) == (lu.serial, lu.naa)
        assert assembly.local_port(other) == (1, 1)
        # The SendTargets answer of this gateway: its portals with its tag.
        registry.portals = list(config.portals)
        session = Session(1, bytes(6), SessionParams(session_type="Discovery"), None, None, 0, 16)
        answer = registry.send_targets("iqn.2026-11.io.pytarget.test:i", "All",
                                       ("127.0.0.3", 3260), session)
        assert answer == [("TargetName", IQN), ("TargetAddress", "127.0.0.3:3260,7")]
    finally:
        for unit in registry.targets[IQN].luns.values():
            unit.close()


def test_command_line_gateway_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytarget.cli import main

    path = str(write(tmp_path, GATEWAYS))
    assert main(["serve", "--config", path]) == 2
    assert "gateway: name this process's gateway" in capsys.readouterr().err
    assert main(["serve", "--config", path, "--gateway", "gw-x"]) == 2
    assert "gateway: no gateway 'gw-x'" in capsys.readouterr().err
    assert main(["status", "--config", path, "--gateway", "gw-b"]) == 1
    assert str(tmp_path / "site.gw-b.sock") in capsys.readouterr().err


def test_failover_timing(tmp_path: Path) -> None:
    config = load(write(tmp_path, GATEWAYS), "gw-a")
    assert (config.failover.timeout, config.failover.heartbeat) == (8.0, 1.0)
    config = load(write(tmp_path, GATEWAYS + "failover: {timeout: 4, heartbeat: 0.5}\n"),
                  "gw-a")
    assert (config.failover.timeout, config.failover.heartbeat) == (4.0, 0.5)


@pytest.mark.parametrize("failover, key", [
    ("{timeout: 2, heartbeat: 1.5}", "failover.heartbeat"),
    ("{timeout: fast}", "failover.timeout"),
    ("{timeout: 0}", "failover.timeout"),
    ("{heartbeat: true}", "failover.heartbeat"),
    ("{interval: 1}", "failover.interval"),
    ("8", "failover"),
])
def test_failover_errors_name_the_key(tmp_path: Path, failover: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, GATEWAYS + f"failover: {failover}\n"), "gw-a")
    assert exc.value.key == key, str(exc.value)
