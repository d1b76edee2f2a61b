"""Asymmetric logical unit access: REPORT TARGET PORT GROUPS (SPC-4 6.37), INQUIRY TPGS, the
VPD 83h port designators of a gateway, and ownership moves (SPC-4 5.15) with the unit attention
they owe. Expected parameter data is written out byte by byte from SPC-4's tables."""

from __future__ import annotations

import struct

import pytest

from pytarget.core.sense import Asc, SenseKey, Status
from pytarget.core.task import Nexus
from pytarget.scsi.alua import AccessState, AluaState, PortGroups, port_groups

from .harness import NEXUS_A, make_lu, run

TARGET = "iqn.2026-11.io.pytarget:unit"
# Two gateways: gw1 (TPG 1, relative port 1) and gw2 (TPG 2, relative port 2); this process
# is gw2 and its initiators' nexuses come through TPGT 2, relative port 2.
GATEWAYS = port_groups([(1, "gw1", (1,)), (2, "gw2", (2,))], local=2)
NEXUS_GW2 = Nexus("iqn.2026-11.io.pytarget.test:a", bytes.fromhex("800000000001"), TARGET, 2, 2)
NEXUS_GW2_B = Nexus("iqn.2026-11.io.pytarget.test:b", bytes.fromhex("800000000002"), TARGET, 2,
                    2)


def rtpg(lu, nexus=NEXUS_A, fmt=0, alloc=4096, control=0):
    cdb = bytes((0xA3, (fmt << 5) | 0x0A, 0, 0, 0, 0)) + struct.pack(">I", alloc) \
        + bytes((0, control))
    return run(lu, cdb, nexus=nexus)


@pytest.fixture
def gateway_lu(tmp_path):
    """LUN 0 as gateway gw2 serves it, owned by gw1."""
    return make_lu(tmp_path, port_groups=GATEWAYS, owner=1)


# ------------------------------------------------------------------ without gateways
def test_single_group_is_what_it_always_was(tmp_path) -> None:
    lu = make_lu(tmp_path)
    result = rtpg(lu)
    assert result.ok()
    assert result.data == bytes((
        0x00, 0x00, 0x00, 0x0C,  # RETURN DATA LENGTH: one 12-byte descriptor
        0x80, 0x01, 0x00, 0x01,  # PREF, active/optimized; AO_SUP; TARGET PORT GROUP 1
        0x00, 0x00, 0x00, 0x01,  # reserved, STATUS CODE 0, vendor, TARGET PORT COUNT 1
        0x00, 0x00, 0x00, 0x01,  # RELATIVE TARGET PORT IDENTIFIER 1
    ))
    extended = rtpg(lu, fmt=1)
    assert extended.data == bytes((
        0x00, 0x00, 0x00, 0x10,  # RETURN DATA LENGTH: header rest (4) + descriptor (12)
        0x10, 0x00, 0x00, 0x00,  # FORMAT TYPE 001b, IMPLICIT TRANSITION TIME 0 (unspecified)
        0x80, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01,
    ))
    assert lu.alua.local_state is AccessState.ACTIVE_OPTIMIZED
    with pytest.raises(ValueError):
        lu.begin_transition()


def test_inquiry_reports_implicit_alua(tmp_path, gateway_lu) -> None:
    for lu, nexus in ((make_lu(tmp_path, lun=1), NEXUS_A), (gateway_lu, NEXUS_GW2)):
        data = run(lu, bytes((0x12, 0, 0, 0, 96, 0)), nexus=nexus).data
        assert data[5] == 0x10  # TPGS 01b: implicit asymmetric access only; no 3PC here


# ------------------------------------------------------------------ two gateways
def test_report_target_port_groups_of_two_gateways(gateway_lu) -> None:
    result = rtpg(gateway_lu, NEXUS_GW2)
    assert result.ok()
    assert result.data == bytes((
        0x00, 0x00, 0x00, 0x18,  # RETURN DATA LENGTH: two 12-byte descriptors
        # TPG 1 (gw1, the owner and preferred): PREF | active/optimized;
        # T_SUP | AN_SUP | AO_SUP; no status; one port, relative port 1
        0x80, 0x83, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01,
        # TPG 2 (gw2, this gateway): active/non-optimized; relative port 2
        0x01, 0x83, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02,
    ))
    extended = rtpg(gateway_lu, NEXUS_GW2, fmt=1)
    assert extended.data[:8] == bytes((0x00, 0x00, 0x00, 0x1C, 0x10, 30, 0x00, 0x00))
    assert extended.data[8:] == result.data[4:]


def test_allocation_length_truncates(gateway_lu) -> None:
    full = rtpg(gateway_lu, NEXUS_GW2).data
    for alloc in (0, 4, 13):
        result = rtpg(gateway_lu, NEXUS_GW2, alloc=alloc)
        assert result.ok() and result.data == full[:alloc]


@pytest.mark.parametrize("fmt", [2, 3, 7])
def test_reserved_parameter_data_format(gateway_lu, fmt) -> None:
    result = rtpg(gateway_lu, NEXUS_GW2, fmt=fmt)
    assert result.status == Status.CHECK_CONDITION and result.key == SenseKey.ILLEGAL_REQUEST
    assert result.asc == Asc.INVALID_FIELD_IN_CDB and result.field_pointer == (True, 1, 7)


def test_device_identification_names_the_gateway_port(tmp_path, gateway_lu) -> None:
    # gw1's unit for the same LUN: another process's, over the same file.
    other = make_lu(tmp_path, port_groups=port_groups([(1, "gw1", (1,)), (2, "gw2", (2,))],
                                                      local=1), owner=1)
    page = run(gateway_lu, bytes((0x12, 1, 0x83, 0, 255, 0)), nexus=NEXUS_GW2).data
    port_part = bytes((
        0x51, 0x94, 0x00, 0x04, 0x00, 0x00, 0x00, 0x02,  # iSCSI, PIV, port, relative port 2
        0x51, 0x95, 0x00, 0x04, 0x00, 0x00, 0x00, 0x02,  # iSCSI, PIV, port, TPG 2
    ))
    assert port_part in page
    gw1 = Nexus(NEXUS_GW2.initiator_name, NEXUS_GW2.isid, TARGET, 1, 1)
    page1 = run(other, bytes((0x12, 1, 0x83, 0, 255, 0)), nexus=gw1).data
    assert bytes((0x51, 0x94, 0x00, 0x04, 0, 0, 0, 1, 0x51, 0x95, 0x00, 0x04, 0, 0, 0, 1)) \
        in page1
    # The logical unit's own designators (NAA first) are the same through either gateway.
    lu_part = page[4:4 + 12]
    assert lu_part == bytes((0x01, 0x03, 0x00, 0x08)) + bytes.fromhex("3000000000000001")
    assert page1[4:page1.index(bytes((0x51, 0x94)))] == page[4:page.index(bytes((0x51, 0x94)))]


# ------------------------------------------------------------------ ownership moves
def test_set_owner_moves_the_states_and_tells_every_nexus(gateway_lu) -> None:
    lu = gateway_lu
    for nexus in (NEXUS_GW2, NEXUS_GW2_B):
        assert rtpg(lu, nexus).ok()  # both nexuses known to the LU, their UAs cleared
    assert lu.set_owner("gw2") is True
    for nexus in (NEXUS_GW2, NEXUS_GW2_B):
        tur = run(lu, bytes(6), nexus=nexus, clear_ua=False)
        assert tur.status == Status.CHECK_CONDITION and tur.key == SenseKey.UNIT_ATTENTION
        assert tur.asc == Asc.ASYMMETRIC_ACCESS_STATE_CHANGED == 0x2A06
        assert run(lu, bytes(6), nexus=nexus, clear_ua=False).ok()
    data = rtpg(lu, NEXUS_GW2).data
    assert data[4:12] == bytes((0x81, 0x83, 0x00, 0x01, 0x00, 0x02, 0x00, 0x01))
    assert data[16:24] == bytes((0x00, 0x83, 0x00, 0x02, 0x00, 0x02, 0x00, 0x01))
    assert lu.alua.local_state is AccessState.ACTIVE_OPTIMIZED
    # Moving to the owner it already has changes nothing and owes nothing.
    assert lu.set_owner(2) is False
    assert run(lu, bytes(6), nexus=NEXUS_GW2, clear_ua=False).ok()
    with pytest.raises(KeyError):
        lu.set_owner("gw3")


def test_transitioning_refuses_medium_access_until_the_move_ends(gateway_lu) -> None:
    lu = gateway_lu
    lu.begin_transition()
    assert rtpg(lu, NEXUS_GW2).data[16] == 0x0F  # TPG 2: transitioning
    for cdb in (bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)),  # READ(10)
                bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)),  # WRITE(10)
                bytes(6)):  # TEST UNIT READY
        result = run(lu, cdb, data_out=bytes(512) if cdb[0] == 0x2A else b"", nexus=NEXUS_GW2)
        assert result.status == Status.CHECK_CONDITION and result.key == SenseKey.NOT_READY
        assert result.asc == Asc.LUN_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION == 0x040A
    assert run(lu, bytes((0x12, 0, 0, 0, 96, 0)), nexus=NEXUS_GW2).ok()
    assert run(lu, bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0)), nexus=NEXUS_GW2).ok()
    assert lu.set_owner("gw2") is True
    read = run(lu, bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)), nexus=NEXUS_GW2)
    assert read.ok() and len(read.data) == 512


def test_a_transition_that_ends_where_it_began_still_tells(gateway_lu) -> None:
    lu = gateway_lu
    assert rtpg(lu, NEXUS_GW2).ok()
    lu.begin_transition()
    assert lu.set_owner("gw1") is True  # the owner stays gw1; gw2 left transitioning
    assert run(lu, bytes(6), nexus=NEXUS_GW2, clear_ua=False).asc == 0x2A06
    assert rtpg(lu, NEXUS_GW2).data[16] == AccessState.ACTIVE_NON_OPTIMIZED


def test_reload_changes_the_port_groups(gateway_lu) -> None:
    lu = gateway_lu
    assert rtpg(lu, NEXUS_GW2).ok()
    same = port_groups([(1, "gw1", (1,)), (2, "gw2", (2,))], local=2)
    assert lu.set_port_groups(same, 1) is False
    three = port_groups([(1, "gw1", (1,)), (2, "gw2", (2,)), (3, "gw3", (3,))], local=2)
    assert lu.set_port_groups(three, 1) is True
    assert run(lu, bytes(6), nexus=NEXUS_GW2, clear_ua=False).asc == 0x2A06
    data = rtpg(lu, NEXUS_GW2).data
    assert data[:4] == bytes((0, 0, 0, 36)) and data[28:36] == bytes(
        (0x01, 0x83, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01))
    # A new preferred owner takes the LU; the same preferred owner keeps a moved one.
    lu.set_owner("gw2")
    assert lu.set_port_groups(three, 1) is False and lu.alua.owner == 2
    assert lu.set_port_groups(three, 3) is True and lu.alua.owner == 3


def test_alua_state_alone() -> None:
    state = AluaState(GATEWAYS, owner=None)
    assert state.owner == state.preferred == 2  # no owner given: the local group
    assert state.summary() == {"gw1": "active_non_optimized", "gw2": "active_optimized"}
    assert PortGroups.single().supported == 0x01 and GATEWAYS.supported == 0x83
    with pytest.raises(AssertionError):
        PortGroups(GATEWAYS.groups, local=5)


def test_a_shared_reservation_store_adds_the_unavailable_state(tmp_path) -> None:
    """A gateway whose reservations live in a shared store may answer 04h/0Ch when it cannot
    reach it, so its descriptors also claim U_SUP; a reload keeps that."""
    from pytarget.backstore.file import FileBackstore
    from pytarget.scsi.device import LogicalUnit, LuConfig

    from .harness import Directory
    from .shared_store import SharedObject

    path = tmp_path / "shared.img"
    FileBackstore.create(str(path), 1 << 20)
    lu = LogicalUnit(LuConfig(lun=0, serial="S", naa=bytes(8), port_groups=GATEWAYS, owner=1),
                     FileBackstore(str(path)), Directory(),
                     reservations=SharedObject().handle("gw2"))  # type: ignore[arg-type]
    try:
        data = rtpg(lu, NEXUS_GW2).data
        assert (data[5], data[17]) == (0x8B, 0x8B)  # T_SUP | U_SUP | AN_SUP | AO_SUP
        three = port_groups([(1, "gw1", (1,)), (2, "gw2", (2,)), (3, "gw3", (3,))], local=2)
        assert lu.set_port_groups(three, 1)
        assert rtpg(lu, NEXUS_GW2).data[29] == 0x8B
        # Without gateways there is nothing else to go to: only active/optimized.
        assert AluaState(PortGroups.single(), unavailable=True).supported == 0x01
    finally:
        lu.close()


def test_pref_follows_the_owner_when_ownership_follows_liveness(gateway_lu) -> None:
    # An RBD LUN's owner moves when a gateway dies (cluster/ownership.py): PREF goes with it,
    # so that Linux's alua prioritizer (which ranks a preferred non-optimized group above an
    # optimized one) follows the owner, not the configured one.
    lu = gateway_lu
    lu.alua.pref_follows_owner = True
    assert lu.set_owner("gw2") is True
    data = rtpg(lu, NEXUS_GW2).data
    assert data[4] == 0x01 and data[16] == 0x80  # gw1: active/non-optimized; gw2: PREF, AO
    groups = lu.alua.groups
    assert lu.set_port_groups(groups, 1) is False  # same groups, same preferred owner
    assert rtpg(lu, NEXUS_GW2).data[16] == 0x80
    three = port_groups([(1, "gw1", (1,)), (2, "gw2", (2,)), (3, "gw3", (3,))], local=2)
    assert lu.set_port_groups(three, 1) is True  # a gateway added: the owner stays, PREF too
    assert lu.alua.pref_follows_owner and rtpg(lu, NEXUS_GW2).data[16] == 0x80
