"""`pytarget status`'s table of each LUN's access state in every gateway's group, with the age
of each gateway's heartbeat where the LUN's owner follows liveness (cluster/ownership.py)."""

from __future__ import annotations

from pytarget import status


def test_access_by_gateway_shows_states_epoch_and_heartbeat_ages() -> None:
    doc = {"targets": [{"name": "iqn.2026-11.io.example:store", "luns": [
        {"lun": 0, "owner": "gw1",
         "alua_states": {"gw1": "active_optimized", "gw2": "active_non_optimized"}},
        {"lun": 1, "owner": "gw2",
         "alua_states": {"gw1": "active_non_optimized", "gw2": "active_optimized"},
         "ownership": {"epoch": 2, "heartbeats": {"gw1": None, "gw2": 0.0}}},
    ]}]}
    lines = status._access_by_gateway(doc, ["gw1", "gw2"])
    assert lines[1] == "Access by gateway (heartbeat last seen):"
    assert lines[2].split() == ["TARGET", "LUN", "OWNER", "EPOCH", "GW1", "GW2"]
    assert lines[3].split() == ["iqn.2026-11.io.example:store", "0", "gw1", "-",
                                "active/optimized", "active/non-optimized"]
    assert lines[4].split() == ["iqn.2026-11.io.example:store", "1", "gw2", "2",
                                "active/non-optimized", "(not", "seen)", "active/optimized",
                                "(0.0", "s)"]
