"""Operational key negotiation (RFC 7143 6.2, 13): one table of keys and their rules.

Each key names how its result is reached (minimum, maximum, boolean AND/OR, list choice, or a
declaration), its legal range and this target's own limit. `Negotiator` answers one login's
offers against that table and accumulates the results in `SessionParams`/`ConnectionParams`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import LoginError, LoginStatus


class Rule(Enum):
    MIN = "min"
    MAX = "max"
    AND = "and"
    OR = "or"
    LIST = "list"
    DECLARE = "declare"


@dataclass(frozen=True)
class Key:
    name: str
    rule: Rule
    default: str
    lo: int = 0
    hi: int = 0
    choices: tuple[str, ...] = ()
    connection: bool = False  # connection-only (CO) rather than session-wide (SW)
    leading_only: bool = True  # may be negotiated only on the leading connection


@dataclass
class TargetLimits:
    """This target's side of every negotiated value (its own proposals and limits)."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 16776192
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 16
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 0
    initial_r2t: bool = False
    immediate_data: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    digests: tuple[str, ...] = ("CRC32C", "None")


KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key("HeaderDigest", Rule.LIST, "None", choices=("CRC32C", "None"), connection=True,
            leading_only=False),
        Key("DataDigest", Rule.LIST, "None", choices=("CRC32C", "None"), connection=True,
            leading_only=False),
        Key("MaxConnections", Rule.MIN, "1", 1, 65535),
        Key("InitialR2T", Rule.OR, "Yes"),
        Key("ImmediateData", Rule.AND, "Yes"),
        Key("MaxRecvDataSegmentLength", Rule.DECLARE, "8192", 512, (1 << 24) - 1,
            connection=True, leading_only=False),
        Key("MaxBurstLength", Rule.MIN, "262144", 512, (1 << 24) - 1),
        Key("FirstBurstLength", Rule.MIN, "65536", 512, (1 << 24) - 1),
        Key("DefaultTime2Wait", Rule.MAX, "2", 0, 3600),
        Key("DefaultTime2Retain", Rule.MIN, "20", 0, 3600),
        Key("MaxOutstandingR2T", Rule.MIN, "1", 1, 65535),
        Key("DataPDUInOrder", Rule.OR, "Yes"),
        Key("DataSequenceInOrder", Rule.OR, "Yes"),
        Key("ErrorRecoveryLevel", Rule.MIN, "0", 0, 2),
        Key("IFMarker", Rule.AND, "No", connection=True, leading_only=False),
        Key("OFMarker", Rule.AND, "No", connection=True, leading_only=False),
        Key("iSCSIProtocolLevel", Rule.MIN, "1", 0, 31),
    )
}

# Keys RFC 7143 obsoleted that a responder must answer "Reject" (RFC 7143 13.26).
OBSOLETE = frozenset({"IFMarkInt", "OFMarkInt"})
# Declarations this target accepts without answering.
DECLARATIVE_FROM_INITIATOR = frozenset({"InitiatorName", "InitiatorAlias", "SessionType",
                                         "TargetName"})
SECURITY_KEYS = frozenset({"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})
TARGET_ONLY_KEYS = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})


@dataclass
class SessionParams:
    """Negotiated session-wide values (RFC 7143 13)."""

    session_type: str = "Normal"
    initiator_name: str = ""
    initiator_alias: str = ""
    target_name: str = ""
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0


@dataclass
class ConnectionParams:
    header_digest: bool = False
    data_digest: bool = False
    # What the initiator can receive: bounds our Data-In, Text and Login data segments.
    initiator_max_recv_data_segment_length: int = 8192
    # What we declared we can receive: bounds every data segment the initiator sends.
    target_max_recv_data_segment_length: int = 8192


def _bool(value: str) -> bool:
    if value == "Yes":
        return True
    if value == "No":
        return False
    raise ValueError(value)


def _yes_no(value: bool) -> str:
    return "Yes" if value else "No"


def _number(text: str) -> int:
    """RFC 7143 5.1 numerical values: decimal, or hex with 0x."""
    if text.lower().startswith("0x"):
        return int(text[2:], 16)
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


@dataclass
class Negotiator:
    """Answers the operational keys of one login against this target's limits."""

    limits: TargetLimits
    leading: bool = True
    session: SessionParams = field(default_factory=SessionParams)
    connection: ConnectionParams = field(default_factory=ConnectionParams)
    seen: set[str] = field(default_factory=set)
    declared_mrdsl: bool = False

    def _ours(self, key: Key) -> str:
        lim = self.limits
        ours: dict[str, str] = {
            "HeaderDigest": ",".join(lim.digests),
            "DataDigest": ",".join(lim.digests),
            "MaxConnections": str(lim.max_connections),
            "InitialR2T": _yes_no(lim.initial_r2t),
            "ImmediateData": _yes_no(lim.immediate_data),
            "MaxBurstLength": str(lim.max_burst_length),
            "FirstBurstLength": str(lim.first_burst_length),
            "DefaultTime2Wait": str(lim.default_time2wait),
            "DefaultTime2Retain": str(lim.default_time2retain),
            "MaxOutstandingR2T": str(lim.max_outstanding_r2t),
            "DataPDUInOrder": _yes_no(lim.data_pdu_in_order),
            "DataSequenceInOrder": _yes_no(lim.data_sequence_in_order),
            "ErrorRecoveryLevel": "0",
            "IFMarker": "No",
            "OFMarker": "No",
            "iSCSIProtocolLevel": "1",
        }
        return ours[key.name]

    def answer(self, name: str, value: str) -> str | None:
        """The response value for one offered operational key (None: no response owed)."""
        if name in self.seen and name not in SECURITY_KEYS:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"key {name} offered twice")
        self.seen.add(name)
        if name in OBSOLETE:
            return "Reject"
        key = KEYS.get(name)
        if key is None:
            return "NotUnderstood"
        if key.leading_only and not self.leading:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"{name} only on leading connection")
        if value == "NotUnderstood" or value == "Irrelevant" or value == "Reject":
            return None
        try:
            result = self._negotiate(key, value)
        except ValueError:
            return "Reject"
        self._store(key, result)
        if key.rule is Rule.DECLARE:
            self.declared_mrdsl = True
            return str(self.limits.max_recv_data_segment_length)
        return result

    def _negotiate(self, key: Key, value: str) -> str:
        if key.rule is Rule.LIST:
            ours = self._ours(key).split(",")
            for choice in value.split(","):
                if choice in ours:
                    return choice
            raise ValueError(value)
        if key.rule in (Rule.AND, Rule.OR):
            theirs = _bool(value)
            mine = _bool(self._ours(key))
            return _yes_no(theirs and mine if key.rule is Rule.AND else theirs or mine)
        number = _number(value)
        if not key.lo <= number <= key.hi:
            raise ValueError(value)
        if key.rule is Rule.DECLARE:
            return str(number)
        limit = _number(self._ours(key))
        return str(min(number, limit) if key.rule is Rule.MIN else max(number, limit))

    def _store(self, key: Key, result: str) -> None:
        s, c = self.session, self.connection
        match key.name:
            case "HeaderDigest":
                c.header_digest = result == "CRC32C"
            case "DataDigest":
                c.data_digest = result == "CRC32C"
            case "MaxConnections":
                s.max_connections = int(result)
            case "InitialR2T":
                s.initial_r2t = result == "Yes"
            case "ImmediateData":
                s.immediate_data = result == "Yes"
            case "MaxRecvDataSegmentLength":
                c.initiator_max_recv_data_segment_length = int(result)
            case "MaxBurstLength":
                s.max_burst_length = int(result)
            case "FirstBurstLength":
                s.first_burst_length = int(result)
            case "DefaultTime2Wait":
                s.default_time2wait = int(result)
            case "DefaultTime2Retain":
                s.default_time2retain = int(result)
            case "MaxOutstandingR2T":
                s.max_outstanding_r2t = int(result)
            case "DataPDUInOrder":
                s.data_pdu_in_order = result == "Yes"
            case "DataSequenceInOrder":
                s.data_sequence_in_order = result == "Yes"
            case "ErrorRecoveryLevel":
                s.error_recovery_level = int(result)

    def finish(self) -> list[tuple[str, str]]:
        """Keys this target still owes before leaving the operational stage."""
        owed: list[tuple[str, str]] = []
        if not self.declared_mrdsl:
            self.declared_mrdsl = True
            owed.append(("MaxRecvDataSegmentLength", str(self.limits.max_recv_data_segment_length)))
        return owed

    def settle(self) -> None:
        """Apply the RFC's cross-key constraints once negotiation is over."""
        s = self.session
        self.connection.target_max_recv_data_segment_length = (
            self.limits.max_recv_data_segment_length)
        if s.first_burst_length > s.max_burst_length:
            s.first_burst_length = s.max_burst_length
