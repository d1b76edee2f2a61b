"""Text key=value segments (RFC 7143 6.1): parsing, encoding and their bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytarget.iscsi import text
from pytarget.iscsi.errors import LoginError, LoginStatus

KEY = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_",
              min_size=1, max_size=text.MAX_KEY_NAME)
VALUE = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
                max_size=64)


def rejects(data: bytes) -> LoginError:
    with pytest.raises(LoginError) as info:
        text.parse(data)
    assert info.value.status == LoginStatus.INITIATOR_ERROR
    return info.value


def test_pairs_in_order() -> None:
    data = b"InitiatorName=iqn.x\0SessionType=Normal\0MaxBurstLength=65536\0"
    assert text.parse(data) == [("InitiatorName", "iqn.x"), ("SessionType", "Normal"),
                                ("MaxBurstLength", "65536")]


def test_views_parse_like_bytes() -> None:
    data = bytearray(b"A=1\0B=2\0")
    assert text.parse(memoryview(data)) == text.parse(bytes(data)) == [("A", "1"), ("B", "2")]


@pytest.mark.parametrize("data,pairs", [
    (b"", []),
    (b"\0\0", []),
    (b"A=1\0\0B=2\0", [("A", "1"), ("B", "2")]),  # empty items between NULs are skipped
    (b"A=1", [("A", "1")]),  # a last pair without its NUL is taken as it stands
    (b"A=b=c\0", [("A", "b=c")]),  # only the first '=' separates
    (b"A=\0", [("A", "")]),
    (b"TargetAddress=[::1]:3260,1\0", [("TargetAddress", "[::1]:3260,1")]),
    ("InitiatorAlias=h\u00f6st\0".encode(), [("InitiatorAlias", "h\u00f6st")]),
])
def test_edge_cases(data: bytes, pairs: list[tuple[str, str]]) -> None:
    assert text.parse(data) == pairs


@pytest.mark.parametrize("data", [b"NoEquals\0", b"=value\0", b"A=1\0junk\0"])
def test_malformed(data: bytes) -> None:
    rejects(data)


def test_key_name_bound() -> None:
    longest = "K" * text.MAX_KEY_NAME
    assert text.parse(f"{longest}=1\0".encode()) == [(longest, "1")]
    rejects(("K" * (text.MAX_KEY_NAME + 1) + "=1\0").encode())


def test_value_bound() -> None:
    value = "v" * text.MAX_VALUE
    assert text.parse(f"K={value}\0".encode()) == [("K", value)]
    rejects(("K=" + "v" * (text.MAX_VALUE + 1) + "\0").encode())


def test_total_bound() -> None:
    item = b"K=" + b"v" * 4000 + b"\0"
    fits = item * (text.MAX_TEXT_BYTES // len(item))
    assert len(text.parse(fits)) == text.MAX_TEXT_BYTES // len(item)
    rejects(fits + b"\0" * (text.MAX_TEXT_BYTES - len(fits) + 1))


def test_key_count_bound() -> None:
    many = b"".join(b"K%d=1\0" % i for i in range(text.MAX_KEYS))
    assert len(text.parse(many)) == text.MAX_KEYS
    rejects(many + b"Last=1\0")


@pytest.mark.parametrize("data", [b"K=\xff\xfe\0", "K\u00e9=1\0".encode()])
def test_encoding(data: bytes) -> None:
    rejects(data)


def test_encode() -> None:
    assert text.encode([("A", "1"), ("B", "")]) == b"A=1\0B=\0"
    assert text.encode([]) == b""


@settings(max_examples=50)
@given(st.lists(st.tuples(KEY, VALUE), max_size=20))
def test_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert text.parse(text.encode(pairs)) == pairs
