"""The NBD codec and state machine with the protocol's literal bytes (doc/proto.md), fed whole,
byte by byte and followed by the next message in the same read."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytarget.nbd import connection as C
from pytarget.nbd.connection import ExportFacts, NbdConnection, Phase
from pytarget.nbd.proto import Cmd, Errno, Opt, Rep, TransmissionFlag

MAGIC = bytes.fromhex("4e42444d41474943")  # NBDMAGIC
OPT = bytes.fromhex("49484156454f5054")  # IHAVEOPT
REPLY = bytes.fromhex("0003e889045565a9")
REQ = bytes.fromhex("25609513")
SIMPLE = bytes.fromhex("67446698")
STRUCT = bytes.fromhex("668e33ef")
FIXED = bytes.fromhex("00000001")  # NBD_FLAG_C_FIXED_NEWSTYLE
SIZE = 1 << 20

Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    yield data


def byte_by_byte(data: bytes) -> Iterable[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


CHUNKERS = [whole, byte_by_byte]


def feed(conn: NbdConnection, data: bytes, split: Chunker = whole) -> None:
    for piece in split(data):
        conn.receive_data(piece, 0.0)


def out(conn: NbdConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def option(code: int, data: bytes = b"") -> bytes:
    return OPT + struct.pack(">II", code, len(data)) + data


def opt_reply(code: int, rep: int, data: bytes = b"") -> bytes:
    return REPLY + struct.pack(">III", code, rep, len(data)) + data


def go(name: bytes, *requests: int, code: int = Opt.GO) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(f">H{len(requests)}H",
                                                             len(requests), *requests)
    return option(code, body)


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQ + struct.pack(">HHQQI", flags, cmd, handle, offset, length)


def facts(**kw: object) -> ExportFacts:
    flags = TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_TRIM \
        | TransmissionFlag.SEND_WRITE_ZEROES
    return ExportFacts(SIZE, flags, minimum_block=512, **kw)  # type: ignore[arg-type]


def negotiated(split: Chunker = whole, structured: bool = False) -> NbdConnection:
    """A connection in transmission on a 1 MiB export with 512-byte blocks."""
    conn = NbdConnection(0.0)
    out(conn)
    feed(conn, FIXED, split)
    if structured:
        feed(conn, option(Opt.STRUCTURED_REPLY), split)
    feed(conn, go(b"e", 3), split)
    ev = conn.events.pop()
    assert isinstance(ev, C.ExportRequested)
    conn.reply_export(facts())
    out(conn)
    assert conn.phase is Phase.TRANSMISSION
    return conn


def test_greeting_is_the_fixed_newstyle_one() -> None:
    conn = NbdConnection(0.0)
    # S: NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES
    assert out(conn) == MAGIC + OPT + b"\x00\x03"


@pytest.mark.parametrize("split", CHUNKERS)
def test_unknown_client_flags_drop_the_connection(split: Chunker) -> None:
    conn = NbdConnection(0.0)
    out(conn)
    feed(conn, b"\x00\x00\x00\x04", split)
    assert conn.wants_close
    assert "unknown client flags" in conn.close_reason


@pytest.mark.parametrize("split", CHUNKERS)
def test_list_then_abort_in_one_read(split: Chunker) -> None:
    conn = NbdConnection(0.0)
    out(conn)
    # client flags, NBD_OPT_LIST and NBD_OPT_ABORT arrive together: ABORT waits for LIST
    feed(conn, FIXED + option(Opt.LIST) + option(Opt.ABORT), split)
    assert list(conn.events) == [C.ListExports()]
    conn.events.clear()
    conn.reply_list([("iqn.x/0", "disk")])
    server = struct.pack(">I", 7) + b"iqn.x/0" + b"disk"
    assert out(conn) == (opt_reply(3, Rep.SERVER, server) + opt_reply(3, Rep.ACK)
                         + opt_reply(2, Rep.ACK))
    assert list(conn.events) == [C.Disconnect()]
    assert conn.wants_close


@pytest.mark.parametrize("split", CHUNKERS)
def test_bad_options_get_their_errors_and_parsing_goes_on(split: Chunker) -> None:
    conn = NbdConnection(0.0)
    out(conn)
    stream = (FIXED
              + option(99, b"xyz")                       # unknown: ERR_UNSUP
              + option(Opt.LIST, b"junk")                # LIST with data: ERR_INVALID
              + option(Opt.STRUCTURED_REPLY, b"x")       # with data: ERR_INVALID
              + option(Opt.GO, b"\x00\x00\x00\x09ab\x00\x00")  # name beyond the data
              + option(Opt.INFO, b"\x00\x00\x00\x01a\x00\x02\x00\x03")  # count disagrees
              + option(Opt.SET_META_CONTEXT, b"\x00" * 8)  # before structured replies
              + option(Opt.STARTTLS)                       # not configured: ERR_POLICY
              + option(Opt.EXPORT_NAME + 10))              # EXTENDED_HEADERS: unsupported
    feed(conn, stream, split)
    data = out(conn)
    codes = [struct.unpack_from(">II", data, at + 8) for at in _replies(data)]
    assert codes == [(99, Rep.ERR_UNSUP), (Opt.LIST, Rep.ERR_INVALID),
                     (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID), (Opt.GO, Rep.ERR_INVALID),
                     (Opt.INFO, Rep.ERR_INVALID), (Opt.SET_META_CONTEXT, Rep.ERR_INVALID),
                     (Opt.STARTTLS, Rep.ERR_POLICY), (11, Rep.ERR_UNSUP)]
    assert not conn.events and conn.phase is Phase.OPTIONS


def _replies(data: bytes) -> list[int]:
    at, found = 0, []
    while at < len(data):
        assert data[at:at + 8] == REPLY
        found.append(at)
        at += 20 + struct.unpack_from(">I", data, at + 16)[0]
    return found


def test_oversized_option_is_skipped_with_too_big() -> None:
    conn = NbdConnection(0.0)
    out(conn)
    big = 70000
    feed(conn, FIXED + OPT + struct.pack(">II", 1000, big))
    feed(conn, bytes(big) + option(Opt.LIST))
    assert out(conn).startswith(opt_reply(1000, Rep.ERR_TOO_BIG, b"option data too long"))
    assert list(conn.events) == [C.ListExports()]


@pytest.mark.parametrize("split", CHUNKERS)
def test_go_with_block_size_enters_transmission(split: Chunker) -> None:
    conn = NbdConnection(0.0)
    out(conn)
    feed(conn, FIXED + go(b"iqn.x/0", 3, 1) + request(Cmd.READ, 7, 0, 512), split)
    assert list(conn.events) == [C.ExportRequested(Opt.GO, "iqn.x/0", (3, 1))]
    conn.events.clear()
    conn.reply_export(facts(name="iqn.x/0"))
    flags = 0x0065  # HAS_FLAGS SEND_FLUSH SEND_TRIM SEND_WRITE_ZEROES
    assert out(conn) == (
        opt_reply(7, Rep.INFO, bytes.fromhex("0000") + struct.pack(">QH", SIZE, flags))
        + opt_reply(7, Rep.INFO, bytes.fromhex("0003") + struct.pack(">III", 512, 4096,
                                                                      32 << 20))
        + opt_reply(7, Rep.INFO, bytes.fromhex("0001") + b"iqn.x/0")
        + opt_reply(7, Rep.ACK))
    # the READ that came in the same read is parsed once transmission begins
    assert list(conn.events) == [C.Request(7, Cmd.READ, C.CmdFlag(0), 0, 512)]


def test_export_name_reply_with_and_without_zeroes() -> None:
    for client_flags, tail in ((b"\x00\x00\x00\x01", bytes(124)), (b"\x00\x00\x00\x03", b"")):
        conn = NbdConnection(0.0)
        out(conn)
        feed(conn, client_flags + option(Opt.EXPORT_NAME, b"d"))
        assert list(conn.events) == [C.ExportRequested(Opt.EXPORT_NAME, "d")]
        conn.reply_export(facts())
        assert out(conn) == struct.pack(">QH", SIZE, 0x0065) + tail
        assert conn.phase is Phase.TRANSMISSION


def test_export_name_refused_ends_the_session() -> None:
    conn = NbdConnection(0.0)
    out(conn)
    feed(conn, FIXED + option(Opt.EXPORT_NAME, b"nope"))
    conn.refuse(Rep.ERR_UNKNOWN, "no such export")
    assert conn.wants_close and out(conn) == b""


def test_meta_contexts_set_needs_structured_and_names_ids() -> None:
    conn = NbdConnection(0.0)
    out(conn)
    query = b"base:allocation"
    body = struct.pack(">I", 1) + b"e" + struct.pack(">II", 1, len(query)) + query
    feed(conn, FIXED + option(Opt.STRUCTURED_REPLY) + option(Opt.SET_META_CONTEXT, body))
    assert out(conn) == opt_reply(8, Rep.ACK)
    assert list(conn.events) == [C.MetaContextsRequested(Opt.SET_META_CONTEXT, "e",
                                                         ("base:allocation",))]
    conn.events.clear()
    conn.reply_meta_contexts(["base:allocation"])
    assert out(conn) == (opt_reply(10, Rep.META_CONTEXT, b"\x00\x00\x00\x01" + query)
                         + opt_reply(10, Rep.ACK))
    assert conn.meta_contexts == [(1, "base:allocation")]
    # a query running past the option data is syntactically invalid
    feed(conn, option(Opt.LIST_META_CONTEXT, body[:-3]))
    assert out(conn) == opt_reply(9, Rep.ERR_INVALID, b"query beyond the option data")


@pytest.mark.parametrize("split", CHUNKERS)
def test_write_payload_lands_whole_and_the_next_request_follows(split: Chunker) -> None:
    conn = negotiated(split)
    payload = bytes(range(256)) * 4
    feed(conn, request(Cmd.WRITE, 1, 512, 1024, flags=1) + payload
         + request(Cmd.FLUSH, 2, 0, 0), split)
    write, flush = list(conn.events)
    assert isinstance(write, C.Request) and write.data is not None
    assert (write.handle, write.command, write.flags, write.offset) == (1, Cmd.WRITE, 1, 512)
    assert bytes(write.data) == payload
    assert flush == C.Request(2, Cmd.FLUSH, C.CmdFlag(0), 0, 0)
    conn.reply_ok(1, Cmd.WRITE)
    assert out(conn) == SIMPLE + bytes(4) + struct.pack(">Q", 1)


@pytest.mark.parametrize("split", CHUNKERS)
def test_bad_requests_get_nbd_errors_without_reaching_the_application(split: Chunker) -> None:
    conn = negotiated(split)
    stream = (request(Cmd.WRITE, 1, SIZE - 512, 1024) + bytes(1024)  # past the end: ENOSPC
              + request(Cmd.WRITE, 2, 100, 512) + bytes(512)         # unaligned: EINVAL
              + request(Cmd.READ, 3, SIZE, 512)                      # past the end: EINVAL
              + request(42, 4, 0, 0)                                 # unknown command
              + request(Cmd.READ, 5, 0, 512, flags=0x08)             # REQ_ONE on a READ
              + request(Cmd.BLOCK_STATUS, 6, 0, 512)                 # no contexts selected
              + request(Cmd.FLUSH, 7, 1, 0)                          # FLUSH with an offset
              + request(Cmd.READ, 8, 0, 512, flags=0x04))            # DF not negotiated
    feed(conn, stream, split)
    assert not conn.events
    data = out(conn)
    errors = [struct.unpack_from(">IIQ", data, at) for at in range(0, len(data), 16)]
    assert errors == [(0x67446698, e, h) for h, e in [
        (1, Errno.ENOSPC), (2, Errno.EINVAL), (3, Errno.EINVAL), (4, Errno.EINVAL),
        (5, Errno.EINVAL), (6, Errno.EINVAL), (7, Errno.EINVAL), (8, Errno.EINVAL)]]
    assert conn.inflight == 0


def test_bad_request_magic_is_a_hard_disconnect() -> None:
    conn = negotiated()
    feed(conn, b"\x12\x56\x09\x53" + bytes(24))  # the historic request magic
    assert conn.wants_close and "bad request magic" in conn.close_reason


def test_oversized_write_is_a_hard_disconnect() -> None:
    conn = negotiated()
    feed(conn, request(Cmd.WRITE, 1, 0, (32 << 20) + 512))
    assert conn.wants_close


def test_structured_read_chunks_and_error_chunk() -> None:
    conn = negotiated(structured=True)
    feed(conn, request(Cmd.READ, 9, 0, 1024) + request(Cmd.READ, 10, 0, 512))
    conn.events.clear()
    conn.reply_read(9, [(0, memoryview(b"\xab" * 512)), (512, 512)])
    assert out(conn) == (STRUCT + struct.pack(">HHQI", 0, 1, 9, 520) + struct.pack(">Q", 0)
                         + b"\xab" * 512
                         + STRUCT + struct.pack(">HHQI", 1, 2, 9, 12)
                         + struct.pack(">QI", 512, 512))
    conn.reply_error(10, Cmd.READ, Errno.EIO, "bad")
    assert out(conn) == (STRUCT + struct.pack(">HHQI", 1, 0x8001, 10, 9)
                         + struct.pack(">IH", 5, 3) + b"bad")


def test_simple_read_sends_holes_as_zeroes() -> None:
    conn = negotiated()
    feed(conn, request(Cmd.READ, 3, 0, 1024))
    conn.reply_read(3, [(0, memoryview(b"\x01" * 512)), (512, 512)])
    assert out(conn) == SIMPLE + bytes(4) + struct.pack(">Q", 3) + b"\x01" * 512 + bytes(512)


def test_disconnect_waits_for_requests_in_flight() -> None:
    conn = negotiated()
    feed(conn, request(Cmd.FLUSH, 1, 0, 0) + request(Cmd.DISC, 2, 0, 0)
         + request(Cmd.READ, 3, 0, 512))  # nothing may follow DISC: ignored
    assert list(conn.events) == [C.Request(1, Cmd.FLUSH, C.CmdFlag(0), 0, 0), C.Disconnect()]
    assert not conn.wants_close and not conn.reading
    conn.reply_ok(1, Cmd.FLUSH)
    assert conn.wants_close


def test_handshake_deadline() -> None:
    conn = NbdConnection(100.0, handshake_timeout=30.0)
    assert conn.next_deadline() == 130.0
    conn.on_timer(129.0)
    assert not conn.wants_close
    conn.on_timer(130.0)
    assert conn.wants_close and "handshake" in conn.close_reason
    done = negotiated()
    assert done.next_deadline() is None


def test_reading_pauses_when_too_many_requests_are_unanswered() -> None:
    conn = negotiated()
    feed(conn, b"".join(request(Cmd.FLUSH, i, 0, 0) for i in range(C.MAX_INFLIGHT)))
    assert not conn.reading
    conn.reply_ok(0, Cmd.FLUSH)
    assert conn.reading


@settings(max_examples=300, deadline=None)
@given(phase=st.sampled_from(["flags", "options", "transmission"]),
       data=st.binary(max_size=600), cut=st.integers(1, 64))
def test_arbitrary_bytes_never_crash_or_hang(phase: str, data: bytes, cut: int) -> None:
    """Whatever arrives, in any phase and any pieces: replies, events or a close, never an
    exception, and every request the application sees is within the export."""
    if phase == "transmission":
        conn = negotiated(structured=True)
    else:
        conn = NbdConnection(0.0)
        out(conn)
        if phase == "options":
            feed(conn, FIXED)
    for at in range(0, len(data), cut):
        conn.receive_data(data[at:at + cut], 0.0)
    for ev in conn.events:
        if isinstance(ev, C.Request):
            assert ev.offset + ev.length <= SIZE
            assert ev.data is None or len(ev.data) == ev.length
    out(conn)


def test_forced_tls_refuses_options_until_starttls() -> None:
    conn = NbdConnection(0.0, tls_available=True, tls_required=True)
    out(conn)
    feed(conn, FIXED + option(Opt.STRUCTURED_REPLY) + option(Opt.LIST)
         + go(b"e") + option(Opt.STARTTLS))
    tls_reqd = [opt_reply(code, Rep.ERR_TLS_REQD, b"TLS is required (NBD_OPT_STARTTLS)")
                for code in (Opt.STRUCTURED_REPLY, Opt.LIST, Opt.GO)]
    assert out(conn) == b"".join(tls_reqd) + opt_reply(Opt.STARTTLS, Rep.ACK)
    assert list(conn.events) == [C.StartTls()]
    conn.events.clear()
    conn.tls_started()
    feed(conn, option(Opt.STARTTLS) + option(Opt.LIST))  # a second STARTTLS is invalid
    assert out(conn) == opt_reply(Opt.STARTTLS, Rep.ERR_INVALID, b"TLS is already active")
    assert list(conn.events) == [C.ListExports()]


def test_export_name_without_forced_tls_is_a_hard_disconnect() -> None:
    conn = NbdConnection(0.0, tls_available=True, tls_required=True)
    out(conn)
    feed(conn, FIXED + option(Opt.EXPORT_NAME, b"e"))
    assert conn.wants_close and not conn.events


def test_reading_pauses_while_write_payloads_fill_the_budget() -> None:
    conn = negotiated()
    conn.export.size = 1 << 30  # type: ignore[union-attr]
    chunk = 16 << 20
    for i in range(C.MAX_INFLIGHT_BYTES // chunk):
        assert conn.reading
        feed(conn, request(Cmd.WRITE, i, i * chunk, chunk) + bytes(chunk))
    assert not conn.reading and conn.inflight_bytes == C.MAX_INFLIGHT_BYTES
    conn.reply_ok(0, Cmd.WRITE)
    assert conn.reading and conn.inflight_bytes == C.MAX_INFLIGHT_BYTES - chunk
