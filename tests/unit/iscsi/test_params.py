"""The operational key table walked exhaustively (RFC 7143 6.2, 13): every key, every rule."""

from __future__ import annotations

import pytest

from pytarget.iscsi.errors import LoginError, LoginStatus
from pytarget.iscsi.params import KEYS, OBSOLETE, Negotiator, Rule, TargetLimits

LIMITS = TargetLimits()

# key -> [(offered value, expected answer)], against the default TargetLimits.
CASES: dict[str, list[tuple[str, str]]] = {
    "HeaderDigest": [("CRC32C,None", "CRC32C"), ("None,CRC32C", "None"), ("None", "None"),
                     ("CRC32C", "CRC32C"), ("MD5,CRC32C", "CRC32C"), ("MD5", "Reject")],
    "DataDigest": [("CRC32C,None", "CRC32C"), ("None", "None"), ("SHA1", "Reject")],
    "MaxConnections": [("1", "1"), ("8", "1"), ("0", "Reject"), ("65536", "Reject")],
    "InitialR2T": [("Yes", "Yes"), ("No", "No"), ("yes", "Reject"), ("", "Reject")],
    "ImmediateData": [("Yes", "Yes"), ("No", "No"), ("True", "Reject")],
    "MaxBurstLength": [("65536", "65536"), ("16777215", "16776192"), ("512", "512"),
                       ("0x10000", "65536"), ("511", "Reject"), ("16777216", "Reject"),
                       ("64k", "Reject")],
    "FirstBurstLength": [("65536", "65536"), ("1048576", "262144"), ("511", "Reject"),
                         ("-1", "Reject")],
    "DefaultTime2Wait": [("0", "2"), ("2", "2"), ("10", "10"), ("3600", "3600"),
                         ("3601", "Reject")],
    "DefaultTime2Retain": [("20", "0"), ("0", "0"), ("3601", "Reject")],
    "MaxOutstandingR2T": [("1", "1"), ("4", "4"), ("100", "16"), ("0", "Reject"),
                          ("65536", "Reject")],
    "DataPDUInOrder": [("Yes", "Yes"), ("No", "Yes")],
    "DataSequenceInOrder": [("Yes", "Yes"), ("No", "Yes")],
    "ErrorRecoveryLevel": [("0", "0"), ("2", "0"), ("3", "Reject")],
    "IFMarker": [("No", "No"), ("Yes", "No")],
    "OFMarker": [("No", "No"), ("Yes", "No")],
    "iSCSIProtocolLevel": [("1", "1"), ("0", "0"), ("31", "1"), ("32", "Reject")],
    "MaxRecvDataSegmentLength": [("8192", "262144"), ("512", "262144"),
                                 ("16777215", "262144"), ("511", "Reject"),
                                 ("16777216", "Reject")],
}


def test_every_key_has_cases() -> None:
    assert set(CASES) == set(KEYS)


def test_every_rule_is_used() -> None:
    assert {k.rule for k in KEYS.values()} == set(Rule)


@pytest.mark.parametrize("name,value,expected",
                         [(k, v, e) for k, cases in CASES.items() for v, e in cases])
def test_answer(name: str, value: str, expected: str) -> None:
    n = Negotiator(LIMITS)
    assert n.answer(name, value) == expected


@pytest.mark.parametrize("name", sorted(KEYS))
@pytest.mark.parametrize("value", ["NotUnderstood", "Irrelevant", "Reject"])
def test_reserved_values_need_no_answer(name: str, value: str) -> None:
    """An offer of a reserved constant is an answer in itself (RFC 7143 6.2.1)."""
    n = Negotiator(LIMITS)
    assert n.answer(name, value) is None


@pytest.mark.parametrize("name", ["X-com.example.Feature", "MaxBurst", "headerdigest",
                                  "X#Private"])
def test_unknown_keys(name: str) -> None:
    assert Negotiator(LIMITS).answer(name, "1") == "NotUnderstood"


@pytest.mark.parametrize("name", sorted(OBSOLETE))
def test_obsolete_marker_intervals(name: str) -> None:
    """RFC 7143 13.26: OFMarkInt and IFMarkInt are answered with Reject."""
    assert Negotiator(LIMITS).answer(name, "2048~65535") == "Reject"


@pytest.mark.parametrize("name", sorted(KEYS))
def test_duplicate_key_fails_the_login(name: str) -> None:
    n = Negotiator(LIMITS)
    n.answer(name, CASES[name][0][0])
    with pytest.raises(LoginError) as info:
        n.answer(name, CASES[name][0][0])
    assert info.value.status == LoginStatus.INITIATOR_ERROR


@pytest.mark.parametrize("name", sorted(k for k in KEYS if KEYS[k].leading_only))
def test_leading_only_keys_on_a_second_connection(name: str) -> None:
    n = Negotiator(LIMITS, leading=False)
    with pytest.raises(LoginError):
        n.answer(name, CASES[name][0][0])


@pytest.mark.parametrize("name", sorted(k for k in KEYS if not KEYS[k].leading_only))
def test_connection_keys_on_a_second_connection(name: str) -> None:
    n = Negotiator(LIMITS, leading=False)
    assert n.answer(name, CASES[name][0][0]) == CASES[name][0][1]


def test_results_are_stored() -> None:
    n = Negotiator(LIMITS)
    for name, value in [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C,None"),
                        ("MaxConnections", "4"), ("InitialR2T", "Yes"),
                        ("ImmediateData", "No"), ("MaxRecvDataSegmentLength", "4096"),
                        ("MaxBurstLength", "131072"), ("FirstBurstLength", "32768"),
                        ("DefaultTime2Wait", "5"), ("DefaultTime2Retain", "10"),
                        ("MaxOutstandingR2T", "4"), ("DataPDUInOrder", "No"),
                        ("DataSequenceInOrder", "No"), ("ErrorRecoveryLevel", "1")]:
        n.answer(name, value)
    s, c = n.session, n.connection
    assert (c.header_digest, c.data_digest) == (True, True)
    assert c.initiator_max_recv_data_segment_length == 4096
    assert (s.max_connections, s.initial_r2t, s.immediate_data) == (1, True, False)
    assert (s.max_burst_length, s.first_burst_length) == (131072, 32768)
    assert (s.default_time2wait, s.default_time2retain) == (5, 0)
    assert (s.max_outstanding_r2t, s.data_pdu_in_order, s.data_sequence_in_order) == (
        4, True, True)
    assert s.error_recovery_level == 0


def test_rejected_offer_keeps_the_default() -> None:
    n = Negotiator(LIMITS)
    assert n.answer("MaxBurstLength", "1") == "Reject"
    assert n.session.max_burst_length == 262144  # RFC 7143 13.13 default


def test_finish_declares_our_receive_limit_once() -> None:
    n = Negotiator(LIMITS)
    assert n.finish() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.finish() == []
    declared = Negotiator(LIMITS)
    declared.answer("MaxRecvDataSegmentLength", "8192")
    assert declared.finish() == []


def test_settle_bounds_first_burst_by_max_burst() -> None:
    """RFC 7143 13.14: FirstBurstLength must not exceed MaxBurstLength."""
    n = Negotiator(TargetLimits(max_burst_length=65536, first_burst_length=262144))
    n.answer("MaxBurstLength", "65536")
    n.answer("FirstBurstLength", "131072")
    n.settle()
    assert n.session.first_burst_length == 65536
    assert n.connection.target_max_recv_data_segment_length == 262144


def test_limits_shape_the_answers() -> None:
    limits = TargetLimits(max_recv_data_segment_length=8192, max_burst_length=65536,
                          first_burst_length=8192, max_outstanding_r2t=2, initial_r2t=True,
                          immediate_data=False, digests=("None",))
    n = Negotiator(limits)
    assert n.answer("MaxBurstLength", "262144") == "65536"
    assert n.answer("FirstBurstLength", "65536") == "8192"
    assert n.answer("MaxOutstandingR2T", "8") == "2"
    assert n.answer("InitialR2T", "No") == "Yes"
    assert n.answer("ImmediateData", "Yes") == "No"
    assert n.answer("HeaderDigest", "CRC32C") == "Reject"
    assert n.answer("DataDigest", "CRC32C,None") == "None"
    assert n.answer("MaxRecvDataSegmentLength", "262144") == "8192"
