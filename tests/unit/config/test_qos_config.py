"""QoS policies in the configuration: what is accepted, errors that name the key, and a reload
that changes a policy in place (docs/qos.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pytarget import assembly
from pytarget.config import ConfigError, parse
from pytarget.core.qos import BY_NEXUS, Limits
from tests.unit.operate.test_reconfigure import FakeServer, Reload

TARGET = "iqn.2026-12.io.pytarget:qos"
HOST = "iqn.1991-05.com.microsoft:host1"

TEXT = f"""\
portals: ["127.0.0.1:3260"]
targets:
  - name: {TARGET}
    qos:
      normalize: 4KiB
      initiators:
        - initiator: "*"
          per: nexus
          iops: 50000
    luns:
      - id: 0
        path: d0.img
        size: 1MiB
        qos:
          iops: 2000
          read_bps: 100MiB
          burst: 0.5
          initiators:
            - initiator: {HOST}
              min_iops: 500
              bps: 20MiB
      - id: 1
        path: d1.img
        size: 1MiB
"""


def load(tmp_path: Path, text: str = TEXT):  # type: ignore[no-untyped-def]
    return parse(text, str(tmp_path / "t.yaml"), tmp_path)


def test_policies_are_read(tmp_path: Path) -> None:
    policy = load(tmp_path).targets[0].qos
    assert policy.normalize == 4096
    (everyone,) = policy.initiators
    assert everyone.initiator == "*" and everyone.per == BY_NEXUS
    assert everyone.limits.iops == 50000
    lun0 = policy.lun(0)
    assert lun0 is not None and policy.lun(1) is None
    assert lun0.limits == Limits(iops=2000, read_bps=100 << 20, burst=0.5)
    (host,) = lun0.initiators
    assert host.initiator == HOST and host.limits.min_iops == 500
    assert host.limits.bps == 20 << 20


@pytest.mark.parametrize("old,new,key", [
    ("iops: 2000", "iops: -1", "targets[0].luns[0].qos.iops"),
    ("iops: 2000", "iops: fast", "targets[0].luns[0].qos.iops"),
    ("read_bps: 100MiB", "read_bps: lots", "targets[0].luns[0].qos.read_bps"),
    ("burst: 0.5", "burst: 100", "targets[0].luns[0].qos.burst"),
    ("burst: 0.5", "bursts: 0.5", "targets[0].luns[0].qos.bursts"),
    ("min_iops: 500", "min_iops: 5000", "targets[0].luns[0].qos.initiators[0].min_iops"),
    ("          iops: 2000\n", "", "targets[0].luns[0].qos.initiators[0].min_iops"),
    ("per: nexus", "per: session", "targets[0].qos.initiators[0].per"),
    ("normalize: 4KiB", "normalize: 16MiB", "targets[0].qos.normalize"),
    ('initiator: "*"', "initiator: nobody", "targets[0].qos.initiators[0].initiator"),
    ("          per: nexus\n          iops: 50000\n", "          min_iops: 5\n",
     "targets[0].qos.initiators[0].min_iops"),
    ("              bps: 20MiB\n", "              bps: 20MiB\n            - initiator: "
     f"{HOST}\n              iops: 5\n", "targets[0].luns[0].qos.initiators[1].initiator"),
])
def test_errors_name_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in TEXT
    with pytest.raises(ConfigError) as info:
        load(tmp_path, TEXT.replace(old, new, 1))
    assert info.value.key == key


def test_a_policy_without_limits_is_refused(tmp_path: Path) -> None:
    text = TEXT.replace("          iops: 50000\n", "")
    with pytest.raises(ConfigError, match="sets no limit") as info:
        load(tmp_path, text)
    assert info.value.key == "targets[0].qos.initiators[0]"


def test_gates_follow_the_policies_and_a_reload_changes_them(tmp_path: Path) -> None:
    server = FakeServer(load(tmp_path))
    try:
        node = server.registry.target(TARGET)
        assert node is not None
        gate = node.luns[0].qos
        assert gate is not None and node.luns[1].qos is gate  # the target-wide policy
        text = TEXT.replace("iops: 2000", "iops: 1000").replace(
            '    qos:\n      normalize: 4KiB\n      initiators:\n        - initiator: "*"\n'
            "          per: nexus\n          iops: 50000\n", "")
        changes = asyncio.run(Reload(server, parse(text, server.config.file,
                                                   server.config.base)).apply())
        assert node.luns[0].qos is gate and gate.policy.lun(0).limits.iops == 1000  # type: ignore[union-attr]
        assert node.luns[1].qos is None  # no policy reaches LUN 1 any more
        assert any("LUN 0: QoS policy now iops 1000" in c for c in changes)
        assert any("QoS initiator policy now none" in c for c in changes)
        no_qos = text.split("        qos:\n")[0] \
            + "      - id: 1\n        path: d1.img\n        size: 1MiB\n"
        changes = asyncio.run(Reload(server, parse(no_qos, server.config.file,
                                                   server.config.base)).apply())
        assert node.luns[0].qos is None and node.luns[1].qos is None
        assert any("LUN 0: QoS policy now none" in c for c in changes)
    finally:
        server.close()


def test_change_lines(tmp_path: Path) -> None:
    policy = load(tmp_path).targets[0].qos
    lines = assembly.qos_changes(TARGET, policy, policy)
    assert lines == []
