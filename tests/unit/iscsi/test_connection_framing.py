"""PDU framing: the same conversation fed whole, byte by byte, in chunks that straddle PDU
boundaries and in random splits must give the same outcome, in both directions."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytarget.initiator.protocol import (
    CommandComplete,
    LoginComplete,
    LogoutComplete,
    NopReply,
    TextComplete,
)
from pytarget.iscsi import connection as C
from pytarget.iscsi.params import TargetLimits

from .harness import BLOCK, Chunker, Pair, byte_by_byte, read10, whole, write10

PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(1 << 17))


def chunks_of(sizes: list[int]) -> Chunker:
    def chunker(data: bytes) -> Iterable[bytes]:
        pos = 0
        for size in itertools.cycle(sizes):
            if pos >= len(data):
                return
            yield data[pos:pos + size]
            pos += size
    return chunker


def conversation(split: Chunker, rsplit: Chunker, *, blocks: int = 16,
                 **options: Any) -> list[Any]:
    """Login, a write of immediate, unsolicited and solicited data, a read, a ping, a text
    exchange, pipelined commands, and a logout; returns what the initiator saw."""
    p = Pair(split=split, rsplit=rsplit,
             limits=TargetLimits(max_recv_data_segment_length=4096, max_burst_length=8192),
             keys={"MaxRecvDataSegmentLength": 2048, "FirstBurstLength": 4096,
                   "InitialR2T": False},
             **options)
    p.login()
    data = PATTERN[:blocks * BLOCK]
    assert p.command(0, write10(0, blocks), data).status == 0
    assert p.command(0, read10(0, blocks), read_length=len(data)).data == data
    p.ini.send_nop(b"0123456789")
    p.ini.send_targets("")
    for n in range(8):
        p.ini.send_command(0, read10(n, 1), read_length=BLOCK)
    p.pump()
    p.ini.send_logout()
    p.pump()
    assert p.conn.state == C.State.CLOSED and p.device.closed == ["logout"]
    assert p.device.disk[:len(data)] == data
    return [summary(e) for e in p.events]


def summary(event: Any) -> Any:
    if isinstance(event, LoginComplete):
        return ("login", event.tsih, event.unanswered, event.params.header_digest,
                event.params.data_digest)
    if isinstance(event, CommandComplete):
        return ("cmd", event.itt, event.status, event.data, event.residual,
                event.data_in_pdus, event.r2ts)
    if isinstance(event, (NopReply, TextComplete, LogoutComplete)):
        return event
    raise AssertionError(f"unexpected event {event}")


DIGESTS: list[dict[str, Any]] = [{}, {"header_digest": True}, {"data_digest": True},
                                 {"header_digest": True, "data_digest": True}]
REFERENCE: dict[int, list[Any]] = {}


def reference(index: int) -> list[Any]:
    if index not in REFERENCE:
        REFERENCE[index] = conversation(whole, whole, **DIGESTS[index])
    return REFERENCE[index]


@pytest.mark.parametrize("index", range(len(DIGESTS)))
@pytest.mark.parametrize("name,split,rsplit", [
    ("byte by byte", byte_by_byte, whole),
    ("byte by byte back", whole, byte_by_byte),
    ("straddling", chunks_of([47, 49, 53, 1, 200]), chunks_of([3, 500, 49])),
    ("header and a bit", chunks_of([52]), chunks_of([48 + 4 + 1])),
])
def test_splits_do_not_matter(index: int, name: str, split: Chunker, rsplit: Chunker) -> None:
    assert conversation(split, rsplit, **DIGESTS[index]) == reference(index)


def test_trailing_bytes_of_the_next_pdu_wait_for_the_rest() -> None:
    p = Pair()
    p.login()
    p.ini.send_nop(b"one")
    p.ini.send_nop(b"two")
    wire = p.ini.data_to_send()
    first = 48 + 4
    p.to_target(wire[:first + 10])  # the first PDU and ten bytes of the second
    p.device.run()
    out = p.conn.data_to_send()
    assert [bytes(b) for b in out[1:]] == [b"one", b"\0"]  # one NOP-In: header, data, pad
    p.to_target(wire[first + 10:])
    assert [bytes(b) for b in p.conn.data_to_send()[1:]] == [b"two", b"\0"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=8),
       rsizes=st.lists(st.integers(1, 9000), min_size=1, max_size=8),
       digests=st.sampled_from(range(len(DIGESTS))))
def test_random_splits(sizes: list[int], rsizes: list[int], digests: int) -> None:
    assert conversation(chunks_of(sizes), chunks_of(rsizes), **DIGESTS[digests]) == \
        reference(digests)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 70000), min_size=1, max_size=6),
       digests=st.sampled_from(range(len(DIGESTS))))
def test_random_splits_of_large_payloads(sizes: list[int], digests: int) -> None:
    """Payloads of 16 KiB and more take the direct receive path, padding and digest after."""
    big = TargetLimits(max_recv_data_segment_length=65536)
    results = []
    for split in (whole, chunks_of(sizes)):
        p = Pair(split=split, limits=big, keys={"ImmediateData": False, "InitialR2T": True},
                 **DIGESTS[digests])
        p.login()
        data = PATTERN[:128 * 1024 - 3 * BLOCK]
        result = p.command(0, write10(0, len(data) // BLOCK), data)
        assert result.status == 0 and p.device.disk[:len(data)] == data
        results.append(summary(result))
    assert results[0] == results[1]


def test_receive_into_the_offered_buffer() -> None:
    """The BufferedProtocol shape: bytes written into get_buffer(), then buffer_updated()."""
    p = Pair(keys={"ImmediateData": False, "InitialR2T": True})

    def to_target(data: bytes) -> None:
        view = memoryview(data)
        while view:
            buf = p.conn.get_buffer()
            n = min(len(buf), len(view), 5000)
            buf[:n] = view[:n]
            view = view[n:]
            p.conn.buffer_updated(n, p.now)

    p.to_target = to_target  # type: ignore[method-assign]
    p.login()
    data = PATTERN[:256 * BLOCK]
    assert p.command(0, write10(0, 256), data).status == 0
    assert p.device.disk[:len(data)] == data
