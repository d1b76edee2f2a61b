"""Configuration of CHAP, access lists, session limits and bounds: what is accepted, and the
one-line error naming the key for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytarget.config import ConfigError, load
from pytarget.iscsi.bounds import Bounds

HEAD = """\
portals: ["127.0.0.1:3260"]
"""
TARGET = """\
targets:
  - name: iqn.2026-11.io.pytarget:disk
    luns:
      - {id: 0, path: disk0.img, size: 1MiB}
      - {id: 1, path: disk1.img, size: 1MiB}
"""
AUTH = """\
    auth:
      chap: {user: alice, secret: alice-secret-1}
      mutual: {user: disk, secret: target-secret-2}
"""
ACL = """\
    acl:
      - {initiator: "iqn.2026-11.io.example:a", luns: [1]}
      - {initiator: "iqn.2026-11.io.example:b"}
"""


def load_text(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return load(path)


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert "\n" not in str(info.value)
    return info.value


def test_full_security_configuration(tmp_path: Path) -> None:
    config = load_text(tmp_path, HEAD + """\
discovery_auth:
  chap: {user: discover, secret: discovery-secret}
limits:
  max_connections: 10
  max_sessions: 5
  data_out_memory: 256MiB
  session_data_out_memory: 64MiB
  login_timeout: 5
  auth_failure_delay: 0.5
  nop_interval: 10
  nop_timeout: 5
  pdu_timeout: 20
  send_timeout: 30
  output_high_water: 8MiB
""" + TARGET + AUTH + ACL + "    max_sessions: 3\n")
    t = config.targets[0]
    assert (t.auth is not None and t.auth.chap.user == "alice"
            and t.auth.chap.secret == b"alice-secret-1")
    assert t.auth.mutual is not None and t.auth.mutual.user == "disk"
    assert [(e.initiator, e.luns) for e in t.acl or []] == [
        ("iqn.2026-11.io.example:a", [1]), ("iqn.2026-11.io.example:b", None)]
    assert t.max_sessions == 3
    assert config.discovery_auth is not None and config.discovery_auth.mutual is None
    lim = config.limits
    assert (lim.max_connections, lim.max_sessions, lim.data_out_memory) == (10, 5, 256 << 20)
    assert (lim.login_timeout, lim.auth_failure_delay, lim.pdu_timeout) == (5.0, 0.5, 20.0)
    assert lim.output_high_water == 8 << 20
    assert "alice-secret-1" not in repr(config)


def test_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, HEAD + TARGET)
    t = config.targets[0]
    assert t.auth is None and t.acl is None and t.max_sessions == 0
    assert config.discovery_auth is None and config.limits == Bounds()


@pytest.mark.parametrize("text,key", [
    (TARGET + "    auth: {chap: {user: a, secret: short}}\n", "targets[0].auth.chap.secret"),
    (TARGET + "    auth: {chap: {user: a, secret: " + "x" * 256 + "}}\n",
     "targets[0].auth.chap.secret"),
    (TARGET + "    auth: {chap: {user: a}}\n", "targets[0].auth.chap.secret"),
    (TARGET + "    auth: {chap: {user: a, secret: 123456789012345}}\n",
     "targets[0].auth.chap.secret"),
    (TARGET + "    auth: {chap: {user: '', secret: long-enough-secret}}\n",
     "targets[0].auth.chap.user"),
    (TARGET + "    auth: {chap: {user: a, secret: long-enough-secret, colour: blue}}\n",
     "targets[0].auth.chap.colour"),
    (TARGET + "    auth: {mutual: {user: a, secret: long-enough-secret}}\n",
     "targets[0].auth.chap"),
    (TARGET + "    auth: {chap: {user: a, secret: same-secret-here}, "
     "mutual: {user: t, secret: same-secret-here}}\n", "targets[0].auth.mutual.secret"),
    (TARGET + "    auth: {chap: {user: a, secret: long-enough-secret}, other: 1}\n",
     "targets[0].auth.other"),
    (TARGET + "    acl: {initiator: x}\n", "targets[0].acl"),
    (TARGET + "    acl: [{initiator: not-a-name}]\n", "targets[0].acl[0].initiator"),
    (TARGET + "    acl: [{initiator: 'iqn.2026-11.io.example:a', luns: [7]}]\n",
     "targets[0].acl[0].luns"),
    (TARGET + "    acl: [{initiator: 'iqn.2026-11.io.example:a', luns: [0, 0]}]\n",
     "targets[0].acl[0].luns"),
    (TARGET + "    acl: [{initiator: 'iqn.2026-11.io.example:a', luns: 0}]\n",
     "targets[0].acl[0].luns"),
    (TARGET + "    acl: [{initiator: 'iqn.2026-11.io.example:a'}, "
     "{initiator: 'IQN.2026-11.io.example:A'}]\n", "targets[0].acl[1].initiator"),
    (TARGET + "    acl: [{initiator: 'iqn.2026-11.io.example:a', lun: [0]}]\n",
     "targets[0].acl[0].lun"),
    (TARGET + "    max_sessions: 0\n", "targets[0].max_sessions"),
    (TARGET + "    max_sessions: many\n", "targets[0].max_sessions"),
    ("discovery_auth: {chap: {user: a, secret: tiny}}\n" + TARGET, "discovery_auth.chap.secret"),
    ("limits: {max_sessions: -1}\n" + TARGET, "limits.max_sessions"),
    ("limits: {colour: blue}\n" + TARGET, "limits.colour"),
    ("limits: {nop_interval: soon}\n" + TARGET, "limits.nop_interval"),
    ("limits: {login_timeout: 0}\n" + TARGET, "limits.login_timeout"),
    ("limits: {data_out_memory: 1MiB}\n" + TARGET, "limits.data_out_memory"),
    ("limits: {data_out_memory: 64MiB, session_data_out_memory: 128MiB}\n" + TARGET,
     "limits.session_data_out_memory"),
    ("limits: [1]\n" + TARGET, "limits"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert error(tmp_path, HEAD + text).key == key


def test_a_secret_may_not_authenticate_both_directions(tmp_path: Path) -> None:
    text = HEAD + "discovery_auth: {chap: {user: d, secret: shared-secret-1}}\n" + TARGET + \
        "    auth: {chap: {user: a, secret: alice-secret-1}, " \
        "mutual: {user: t, secret: shared-secret-1}}\n"
    err = error(tmp_path, text)
    assert err.key == "targets[0].auth.mutual.secret" and "discovery_auth" in str(err)


def test_error_never_shows_the_secret(tmp_path: Path) -> None:
    err = error(tmp_path, HEAD + TARGET + "    auth: {chap: {user: a, secret: sekrit}}\n")
    assert "sekrit" not in str(err)
