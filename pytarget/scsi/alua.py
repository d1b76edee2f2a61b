"""Asymmetric logical unit access (SPC-4 5.15): the target port groups a logical unit is
reached through and its access state in each, and the REPORT TARGET PORT GROUPS parameter data.

One pytarget process without `gateways:` is one target port group with one target port; every
LU is active/optimized there, as it always was. With `gateways:` each gateway process is a
target port group of its own, holding one target port per target, whose relative target port
identifier is unique across the gateways (docs/guides/scale-out.md). Each LU has one owner
group, active/optimized; the others are active/non-optimized. Ownership moves only implicitly
(TPGS 01b): `AluaState.set_owner` is the one place it changes, called when the owner changes
(configuration, or the exclusive lock of a shared backstore moving); `LogicalUnit.set_owner`
adds the unit attention every I_T nexus is owed (SPC-4 5.15.2.6).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from ..core import limits


class AccessState(IntEnum):
    """ASYMMETRIC ACCESS STATE (SPC-4 6.37)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    LBA_DEPENDENT = 0x4
    OFFLINE = 0xE
    TRANSITIONING = 0xF


class TpgStatus(IntEnum):
    """STATUS CODE of a target port group descriptor (SPC-4 6.37)."""

    NONE = 0x00
    ALTERED_BY_SET_TARGET_PORT_GROUPS = 0x01
    ALTERED_BY_IMPLICIT_BEHAVIOR = 0x02


# Supported-state bits of a target port group descriptor's byte 1 (SPC-4 6.37).
T_SUP = 0x80
O_SUP = 0x40
LBD_SUP = 0x10
U_SUP = 0x08
S_SUP = 0x04
AN_SUP = 0x02
AO_SUP = 0x01

FORMAT_LENGTH_ONLY = 0b000  # PARAMETER DATA FORMAT (SPC-4 6.37)
FORMAT_EXTENDED = 0b001


@dataclass(frozen=True)
class PortGroup:
    """A target port group: a gateway, with the relative target port ids of its ports."""

    id: int  # TARGET PORT GROUP, also the gateway's iSCSI TPGT
    name: str
    relative_ports: tuple[int, ...]


@dataclass(frozen=True)
class PortGroups:
    """Every target port group of the SCSI target device and the one this process serves."""

    groups: tuple[PortGroup, ...]
    local: int
    # True when the groups come from `gateways:` (more than one process may serve the LU):
    # non-optimized and transitioning states can then occur.
    gateways: bool = False

    @classmethod
    def single(cls, tpg: int = 1, relative_port: int = 1) -> PortGroups:
        """One process, one group, one port: what pytarget is without `gateways:`."""
        return cls((PortGroup(tpg, "", (relative_port,)),), tpg)

    def __post_init__(self) -> None:
        ids = [g.id for g in self.groups]
        ports = [p for g in self.groups for p in g.relative_ports]
        assert len(set(ids)) == len(ids) and len(set(ports)) == len(ports), self
        assert self.local in ids, self

    def find(self, gateway: int | str) -> PortGroup:
        """A group by its id or its gateway's name (KeyError when there is none)."""
        for group in self.groups:
            if group.id == gateway or (isinstance(gateway, str) and group.name == gateway):
                return group
        raise KeyError(f"no target port group {gateway!r}")

    @property
    def supported(self) -> int:
        """The states a group of this target may be in: byte 1 of each descriptor."""
        return AO_SUP | (AN_SUP | T_SUP if self.gateways else 0)


class AluaState:
    """One logical unit's access states: its owner group is active/optimized, every other
    group active/non-optimized, and the local group transitioning while an ownership move that
    involves this process is under way."""

    def __init__(self, groups: PortGroups, owner: int | None = None,
                 unavailable: bool = False) -> None:
        self.groups = groups
        # The states a group may be in (byte 1 of each descriptor): with `unavailable`, a
        # command this gateway cannot serve without state it cannot reach (the shared
        # reservations) ends with 04h/0Ch, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN
        # UNAVAILABLE STATE (SPC-4 5.15.2.4.5).
        self.supported = groups.supported | (U_SUP if unavailable and groups.gateways else 0)
        self.preferred = groups.find(owner if owner is not None else groups.local).id
        self.owner = self.preferred
        self.transitioning = False  # the local group's state is 0Fh
        self.status = TpgStatus.NONE
        # PREF marks the configured owner's group, or, when ownership follows the gateways'
        # liveness (cluster/ownership.py), the current owner's: an initiator that favours a
        # preferred group over an optimized one (Linux's alua prioritizer does) must not send
        # its I/O back to the configured owner's non-optimized path after a takeover.
        self.pref_follows_owner = False

    def state(self, tpg: int) -> AccessState:
        if self.transitioning and tpg == self.groups.local:
            return AccessState.TRANSITIONING
        return AccessState.ACTIVE_OPTIMIZED if tpg == self.owner \
            else AccessState.ACTIVE_NON_OPTIMIZED

    @property
    def local_state(self) -> AccessState:
        return self.state(self.groups.local)

    def begin_transition(self) -> None:
        """The local group enters the transitioning state (commands that access the medium
        get NOT READY, ASYMMETRIC ACCESS STATE TRANSITION until `set_owner`)."""
        if not self.groups.gateways:
            raise ValueError("a single target port group never transitions")
        self.transitioning = True

    def set_owner(self, gateway: int | str) -> bool:
        """Make `gateway` (a group id or gateway name) the active/optimized group and end any
        transition; True when an access state changed (the caller owes the unit attention)."""
        group = self.groups.find(gateway)
        if group.id == self.owner and not self.transitioning:
            return False
        self.owner = group.id
        self.transitioning = False
        self.status = TpgStatus.ALTERED_BY_IMPLICIT_BEHAVIOR
        return True

    def descriptors(self) -> bytes:
        """Target port group descriptors (SPC-4 6.37), in group id order."""
        out = bytearray()
        supported = self.supported
        preferred = self.owner if self.pref_follows_owner else self.preferred
        for group in sorted(self.groups.groups, key=lambda g: g.id):
            pref = 0x80 if group.id == preferred else 0
            out += struct.pack(">BBHBBBB", pref | self.state(group.id), supported, group.id, 0,
                               self.status, 0, len(group.relative_ports))
            for port in group.relative_ports:
                out += struct.pack(">HH", 0, port)  # target port descriptor
        return bytes(out)

    def report(self, parameter_data_format: int) -> bytes:
        """REPORT TARGET PORT GROUPS parameter data in the length-only or extended
        header format."""
        body = self.descriptors()
        if parameter_data_format == FORMAT_EXTENDED:
            transition = limits.ALUA_IMPLICIT_TRANSITION_SECONDS if self.groups.gateways else 0
            return struct.pack(">IBBH", len(body) + 4, FORMAT_EXTENDED << 4, transition, 0) \
                + body
        return struct.pack(">I", len(body)) + body

    def summary(self) -> dict[str, str]:
        """Each group's state by gateway name (or group id), for `pytarget status`."""
        return {group.name or str(group.id): self.state(group.id).name.lower()
                for group in self.groups.groups}


def port_groups(groups: Sequence[tuple[int, str, Sequence[int]]], local: int) -> PortGroups:
    """PortGroups from (id, gateway name, relative target port ids) of every gateway."""
    return PortGroups(tuple(PortGroup(i, name, tuple(ports)) for i, name, ports in groups),
                      local, gateways=True)
