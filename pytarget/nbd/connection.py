"""One NBD connection as a sans-I/O state machine: the fixed newstyle handshake, option haggling
and the transmission phase (NetworkBlockDevice doc/proto.md).

Bytes go in through `get_buffer`/`buffer_updated` (or `receive_data`), what to send comes out of
`data_to_send` as a list of buffers for one vectored write, and what needs the rest of the server
comes out of `events`: an option that names an export or its metadata contexts, a transmission
request, a disconnect. The application answers each option event with one `reply_*` call and each
request with one reply; the connection encodes them (simple or structured, as negotiated). Time
enters only as `now`: `next_deadline` is the end of the handshake allowance.

Everything the protocol can check without knowing the export's contents is checked here: magic
numbers, lengths, strings, the option sequence, command flags against the request type and the
advertised features, offsets against the export size and the minimum block size. Bad options get
their `NBD_REP_ERR_*`, bad requests their `NBD_E*`, and a violation that leaves the stream
unparseable (a bad magic, a write payload beyond any sane size) a hard disconnect, all decided
in `_fault` or the handler of the message concerned.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from ..core.buffers import DataBuffer, data_buffer, view
from . import proto as P
from .proto import Cmd, CmdFlag, Errno, Opt, Rep, ReplyFlag, ReplyType, TransmissionFlag

MAX_PAYLOAD = 32 << 20  # the largest WRITE accepted and READ answered (2^25, "Size constraints")
MAX_INFLIGHT = 64  # requests received and not yet answered before reading pauses
MAX_INFLIGHT_BYTES = 64 << 20  # WRITE payloads received and not yet answered, likewise
STAGING = 65536
ZEROES = memoryview(bytes(1 << 20))  # hole bytes of a simple READ reply come from here
SERVER_FLAGS = P.HandshakeFlag.FIXED_NEWSTYLE | P.HandshakeFlag.NO_ZEROES


class Phase(Enum):
    CLIENT_FLAGS = "awaiting client flags"
    OPTIONS = "option haggling"
    OPTION_PENDING = "an option awaits its answer"
    TRANSMISSION = "transmission"
    CLOSING = "closing"
    CLOSED = "closed"


# ------------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class ListExports:
    """NBD_OPT_LIST: answer with `reply_list`."""


@dataclass(frozen=True, slots=True)
class ExportRequested:
    """NBD_OPT_INFO, NBD_OPT_GO or NBD_OPT_EXPORT_NAME: answer with `reply_export` or
    `reply_error` (an EXPORT_NAME that fails ends the session, as it must)."""

    option: Opt
    name: str
    requests: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MetaContextsRequested:
    """NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT: answer with
    `reply_meta_contexts` (the names matched) or `refuse`."""

    option: Opt
    export: str
    queries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StartTls:
    """NBD_OPT_STARTTLS accepted and acknowledged: the application upgrades the stream (after
    sending what is queued) and calls `tls_started`."""


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission request that passed the protocol's checks; answer it exactly once."""

    handle: int
    command: Cmd
    flags: CmdFlag
    offset: int
    length: int
    data: memoryview | None = None  # a WRITE's payload


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC or NBD_OPT_ABORT: finish what is in flight, then close."""


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


Event = ListExports | ExportRequested | MetaContextsRequested | StartTls | Request | Disconnect \
    | Closed


@dataclass
class ExportFacts:
    """What the application tells a client about an export (NBD_INFO_*)."""

    size: int
    flags: TransmissionFlag
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_payload: int = MAX_PAYLOAD
    name: str = ""
    description: str = ""


@dataclass
class _Pending:
    option: int
    event: Event | None = None


@dataclass
class _Payload:
    request: tuple[int, int, int, int, int]  # flags, command, handle, offset, length
    buffer: DataBuffer
    filled: int = 0
    discard: bool = False
    error: Errno = Errno.OK


@dataclass
class _Negotiated:
    structured: bool = False
    meta_export: str | None = None
    meta_contexts: list[tuple[int, str]] = field(default_factory=list)


class NbdConnection:
    """The server side of one NBD connection."""

    def __init__(self, now: float, handshake_timeout: float = 30.0,
                 tls_available: bool = False, tls_required: bool = False) -> None:
        self.phase = Phase.CLIENT_FLAGS
        self.events: deque[Event] = deque()
        self._out: list[bytes | bytearray | memoryview] = []
        self.queued_bytes = 0  # every byte ever queued; the transport counts what has left
        self._rx = bytearray()
        self._staging = bytearray(STAGING)
        self._payload: _Payload | None = None
        self._skip = 0  # option data to discard (an oversized option)
        self._skip_option = 0
        self._pending: _Pending | None = None
        self.negotiated = _Negotiated()
        self.no_zeroes = False
        self.export: ExportFacts | None = None
        self.export_name = ""
        self.inflight = 0
        self.inflight_bytes = 0  # of WRITE payloads, counted from their header
        self._write_bytes: dict[int, int] = {}  # handle -> payload bytes not yet answered
        self.wants_close = False
        self.close_reason = ""
        self.deadline: float | None = now + handshake_timeout if handshake_timeout else None
        self.tls_available = tls_available
        self.tls_required = tls_required
        self.tls_active = False
        self._queue(P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, SERVER_FLAGS))

    # ---------------------------------------------------------------- what the driver reads
    @property
    def structured(self) -> bool:
        return self.negotiated.structured

    @property
    def meta_contexts(self) -> list[tuple[int, str]]:
        return self.negotiated.meta_contexts

    @property
    def reading(self) -> bool:
        """False while reading should pause: too many requests unanswered, or nothing more
        to read (closing)."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED) or self.wants_close:
            return False
        return self.inflight < MAX_INFLIGHT and self.inflight_bytes < MAX_INFLIGHT_BYTES

    def next_deadline(self) -> float | None:
        return self.deadline if self.phase in (Phase.CLIENT_FLAGS, Phase.OPTIONS) else None

    def on_timer(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            self._hard_close("handshake not completed in time")

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        out, self._out = self._out, []
        return out

    def partial(self) -> bool:
        """True in the middle of a message (a transfer the transport should let complete)."""
        return bool(self._rx) or self._payload is not None

    # ---------------------------------------------------------------- bytes in
    def get_buffer(self) -> memoryview:
        payload = self._payload
        if payload is not None and not payload.discard:
            return view(payload.buffer)[payload.filled:]
        return memoryview(self._staging)

    def buffer_updated(self, nbytes: int, now: float) -> None:
        if self.phase is Phase.CLOSED or nbytes <= 0:
            return
        payload = self._payload
        if payload is not None and not payload.discard:
            payload.filled += nbytes
            if payload.filled == len(payload.buffer):
                self._payload_done()
        else:
            self._rx += memoryview(self._staging)[:nbytes]
        self._parse()

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes that arrived elsewhere (tests, a TLS layer): copied through
        `get_buffer`."""
        src = memoryview(data)
        while len(src) and self.phase is not Phase.CLOSED:
            buf = self.get_buffer()
            n = min(len(buf), len(src))
            buf[:n] = src[:n]
            src = src[n:]
            self.buffer_updated(n, now)

    def close(self, reason: str) -> None:
        """The transport lost the connection (or closes it)."""
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.close_reason = self.close_reason or reason
        self.events.append(Closed(self.close_reason))

    # ---------------------------------------------------------------- parsing
    def _parse(self) -> None:
        while self.phase not in (Phase.CLOSED, Phase.CLOSING) and not self.wants_close:
            rx = self._rx
            if self._skip:
                n = min(self._skip, len(rx))
                del rx[:n]
                self._skip -= n
                if self._skip:
                    return
                self._reply(self._skip_option, Rep.ERR_TOO_BIG, b"option data too long")
                continue
            if self._payload is not None:
                if not self._payload.discard:
                    return
                payload = self._payload
                n = min(len(payload.buffer) - payload.filled, len(rx))
                del rx[:n]
                payload.filled += n
                if payload.filled < len(payload.buffer):
                    return
                self._payload_done()
                continue
            phase = self.phase
            if phase is Phase.CLIENT_FLAGS:
                if len(rx) < 4:
                    return
                (flags,) = P.CLIENT_FLAGS.unpack_from(rx)
                del rx[:4]
                self._client_flags(flags)
            elif phase is Phase.OPTIONS:
                if len(rx) < P.OPTION_HEADER.size:
                    return
                magic, option, length = P.OPTION_HEADER.unpack_from(rx)
                if magic != P.IHAVEOPT:
                    self._hard_close("bad option magic")
                    return
                if length > P.MAX_OPTION_DATA:
                    del rx[:P.OPTION_HEADER.size]
                    self._skip, self._skip_option = length, option
                    continue
                end = P.OPTION_HEADER.size + length
                if len(rx) < end:
                    return
                data = bytes(rx[P.OPTION_HEADER.size:end])
                del rx[:end]
                self._option(option, data)
            elif phase is Phase.TRANSMISSION:
                if len(rx) < P.REQUEST.size:
                    return
                request = P.REQUEST.unpack_from(rx)
                del rx[:P.REQUEST.size]
                self._request(*request)
            else:  # an option awaits the application's answer: the next waits in _rx
                return

    def _client_flags(self, flags: int) -> None:
        known = int(P.ClientFlag.C_FIXED_NEWSTYLE | P.ClientFlag.C_NO_ZEROES)
        if flags & ~known:
            # "the server MUST drop the TCP connection if the client sets an unknown flag"
            self._hard_close(f"unknown client flags {flags:#x}")
            return
        self.no_zeroes = bool(flags & P.ClientFlag.C_NO_ZEROES)
        self.phase = Phase.OPTIONS

    # ---------------------------------------------------------------- options
    def _option(self, option: int, data: bytes) -> None:
        if self.tls_required and not self.tls_active \
                and option not in (Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                self._hard_close("NBD_OPT_EXPORT_NAME without TLS")  # it cannot be errored
            else:
                self._reply(option, Rep.ERR_TLS_REQD, b"TLS is required (NBD_OPT_STARTTLS)")
            return
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            self._finish("client aborted the negotiation")
            self.events.append(Disconnect())
        elif option == Opt.EXPORT_NAME:
            name = _string(data)
            if name is None:
                self._hard_close("bad export name in NBD_OPT_EXPORT_NAME")
                return
            self._await(option, ExportRequested(Opt.EXPORT_NAME, name))
        elif option == Opt.LIST:
            if data:
                self._reply(option, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            else:
                self._await(option, ListExports())
        elif option in (Opt.INFO, Opt.GO):
            self._info_or_go(option, data)
        elif option == Opt.STRUCTURED_REPLY:
            if data:
                self._reply(option, Rep.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.negotiated.structured:
                self._reply(option, Rep.ERR_INVALID, b"structured replies already negotiated")
            else:
                self.negotiated.structured = True
                self._reply(option, Rep.ACK)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(option, data)
        elif option == Opt.STARTTLS:
            if data:
                self._reply(option, Rep.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            elif self.tls_active:
                self._reply(option, Rep.ERR_INVALID, b"TLS is already active")
            elif not self.tls_available:
                self._reply(option, Rep.ERR_POLICY, b"TLS is not configured on this server")
            else:
                self._reply(option, Rep.ACK)
                self.negotiated = _Negotiated()  # nothing from before TLS survives it
                self._pending = _Pending(option, StartTls())
                self.phase = Phase.OPTION_PENDING
                self.events.append(StartTls())
        else:
            self._reply(option, Rep.ERR_UNSUP, f"option {option} is not supported".encode())

    def _info_or_go(self, option: int, data: bytes) -> None:
        if len(data) < 6:
            self._reply(option, Rep.ERR_INVALID, b"option data too short")
            return
        (length,) = struct.unpack_from(">I", data)
        if length > len(data) - 6:
            self._reply(option, Rep.ERR_INVALID, b"export name longer than the option data")
            return
        name = _string(data[4:4 + length])
        (count,) = struct.unpack_from(">H", data, 4 + length)
        if len(data) != 6 + length + 2 * count:
            self._reply(option, Rep.ERR_INVALID, b"option length disagrees with its contents")
            return
        if name is None:
            self._reply(option, Rep.ERR_INVALID, b"export name is not a valid string")
            return
        requests = struct.unpack_from(f">{count}H", data, 6 + length)
        self._await(option, ExportRequested(Opt(option), name, tuple(requests)))

    def _meta_context(self, option: int, data: bytes) -> None:
        if option == Opt.SET_META_CONTEXT:
            self.negotiated.meta_contexts = []  # replaced even when the option fails
            self.negotiated.meta_export = None
        if not self.negotiated.structured:
            self._reply(option, Rep.ERR_INVALID, b"negotiate structured replies first")
            return
        parsed = _meta_request(data)
        if isinstance(parsed, bytes):
            rep = Rep.ERR_TOO_BIG if parsed.startswith(b"too many") else Rep.ERR_INVALID
            self._reply(option, rep, parsed)
            return
        export, queries = parsed
        self._await(option, MetaContextsRequested(Opt(option), export, queries))

    def _await(self, option: int, event: Event) -> None:
        self._pending = _Pending(option, event)
        self.phase = Phase.OPTION_PENDING
        self.events.append(event)

    def _answered(self) -> None:
        self._pending = None
        if self.phase is Phase.OPTION_PENDING:
            self.phase = Phase.OPTIONS
        self._parse()

    def _reply(self, option: int, rep: int, payload: bytes = b"") -> None:
        self._queue(P.option_reply(option, rep, payload))

    # ---------------------------------------------------------------- option answers
    def reply_list(self, exports: list[tuple[str, str]]) -> None:
        """NBD_REP_SERVER for each (name, description), then NBD_REP_ACK."""
        pending = self._take(ListExports)
        for name, description in exports:
            raw = name.encode()
            self._reply(pending.option, Rep.SERVER,
                        struct.pack(">I", len(raw)) + raw + description.encode())
        self._reply(pending.option, Rep.ACK)
        self._answered()

    def reply_export(self, facts: ExportFacts) -> None:
        """The export of an INFO, GO or EXPORT_NAME exists and may be used: its NBD_INFO
        replies (NBD_INFO_EXPORT always; BLOCK_SIZE, NAME, DESCRIPTION when asked), then ACK;
        GO and EXPORT_NAME enter transmission."""
        pending = self._take(ExportRequested)
        event = pending.event
        assert isinstance(event, ExportRequested)
        flags = facts.flags | TransmissionFlag.HAS_FLAGS
        if self.negotiated.structured:
            flags |= TransmissionFlag.SEND_DF
        else:
            flags &= ~TransmissionFlag.SEND_DF
        facts.flags = flags
        if event.option == Opt.EXPORT_NAME:
            self._queue(P.EXPORT_NAME_REPLY.pack(facts.size, flags)
                        + (b"" if self.no_zeroes else bytes(124)))
            self._enter_transmission(event.name, facts)
            return
        option = pending.option
        self._reply(option, Rep.INFO, P.INFO_EXPORT.pack(P.Info.EXPORT, facts.size, flags))
        if P.Info.BLOCK_SIZE in event.requests or facts.minimum_block > 1:
            self._reply(option, Rep.INFO, P.INFO_BLOCK_SIZE.pack(
                P.Info.BLOCK_SIZE, facts.minimum_block, facts.preferred_block,
                facts.maximum_payload))
        if P.Info.NAME in event.requests and facts.name:
            self._reply(option, Rep.INFO,
                        struct.pack(">H", P.Info.NAME) + facts.name.encode())
        if P.Info.DESCRIPTION in event.requests and facts.description:
            self._reply(option, Rep.INFO,
                        struct.pack(">H", P.Info.DESCRIPTION) + facts.description.encode())
        self._reply(option, Rep.ACK)
        if event.option == Opt.GO:
            self._enter_transmission(event.name, facts)
        else:
            self._answered()

    def reply_meta_contexts(self, names: list[str]) -> None:
        """The contexts a LIST_META_CONTEXT or SET_META_CONTEXT matched, in order."""
        pending = self._take(MetaContextsRequested)
        event = pending.event
        assert isinstance(event, MetaContextsRequested)
        selected: list[tuple[int, str]] = []
        for i, name in enumerate(names):
            context_id = 0 if event.option == Opt.LIST_META_CONTEXT else i + 1
            selected.append((context_id, name))
            self._reply(pending.option, Rep.META_CONTEXT,
                        struct.pack(">I", context_id) + name.encode())
        if event.option == Opt.SET_META_CONTEXT:
            self.negotiated.meta_contexts = selected
            self.negotiated.meta_export = event.export
        self._reply(pending.option, Rep.ACK)
        self._answered()

    def refuse(self, rep: Rep, message: str) -> None:
        """The pending option failed with `rep` (an NBD_REP_ERR_*); a failed EXPORT_NAME ends
        the session ("the server MUST terminate the session")."""
        pending = self._pending
        assert pending is not None and pending.event is not None
        event = pending.event
        if isinstance(event, ExportRequested) and event.option == Opt.EXPORT_NAME:
            self._hard_close(f"export {event.name!r}: {message}")
            return
        self._reply(pending.option, rep, message.encode()[:P.MAX_STRING])
        self._answered()

    def tls_started(self) -> None:
        """The stream is encrypted from here on."""
        self._take(StartTls)
        self.tls_active = True
        self._answered()

    def _take(self, kind: type) -> _Pending:
        pending = self._pending
        if pending is None or not isinstance(pending.event, kind):
            raise RuntimeError(f"no {kind.__name__} awaits an answer")
        return pending

    def _enter_transmission(self, name: str, facts: ExportFacts) -> None:
        self._pending = None
        self.export = facts
        self.export_name = name
        if self.negotiated.meta_export != name:
            # BLOCK_STATUS needs contexts set for the export that is used.
            self.negotiated.meta_contexts = []
        self.phase = Phase.TRANSMISSION
        self.deadline = None
        self._parse()

    # ---------------------------------------------------------------- requests
    def _request(self, magic: int, flags: int, command: int, handle: int, offset: int,
                 length: int) -> None:
        if magic != P.REQUEST_MAGIC:
            self._hard_close(f"bad request magic {magic:#x}")
            return
        if command == Cmd.WRITE:
            if length > MAX_PAYLOAD:
                # Beyond 2^25 a payload may be deemed a denial of service ("Size constraints")
                self._hard_close(f"write of {length} bytes exceeds the maximum payload")
                return
            error = self._check(flags, command, offset, length)
            if error == Errno.OK:
                self.inflight_bytes += length
                self._write_bytes[handle] = self._write_bytes.get(handle, 0) + length
            self._payload = _Payload((flags, command, handle, offset, length),
                                     data_buffer(length), discard=error != Errno.OK,
                                     error=error)
            if length == 0:
                self._payload_done()
                return
            rx = self._rx
            if not self._payload.discard and rx:
                n = min(len(rx), length)
                view(self._payload.buffer)[:n] = rx[:n]
                del rx[:n]
                self._payload.filled = n
                if n == length:
                    self._payload_done()
            return
        if command == Cmd.DISC:
            self._finish("client disconnected (NBD_CMD_DISC)")
            self.events.append(Disconnect())
            return
        self.inflight += 1
        error = self._check(flags, command, offset, length)
        if error != Errno.OK:
            self.reply_error(handle, command, error, _ERROR_TEXT.get(error, ""))
            return
        if length == 0 and command in _ZERO_LENGTH_OK:
            self._done_ok(handle, command)
            return
        self.events.append(Request(handle, Cmd(command), CmdFlag(flags), offset, length))

    def _payload_done(self) -> None:
        payload = self._payload
        assert payload is not None
        self._payload = None
        flags, command, handle, offset, length = payload.request
        self.inflight += 1
        if payload.error != Errno.OK:
            self.reply_error(handle, command, payload.error,
                             _ERROR_TEXT.get(payload.error, ""))
        elif length == 0:
            self._done_ok(handle, command)
        else:
            self.events.append(Request(handle, Cmd.WRITE, CmdFlag(flags), offset, length,
                                       view(payload.buffer)))

    def _check(self, flags: int, command: int, offset: int, length: int) -> Errno:
        """The error a request gets before it reaches the device server ("Error values")."""
        facts = self.export
        assert facts is not None
        allowed = P.ALLOWED_FLAGS.get(command)
        if allowed is None:
            return Errno.EINVAL  # "SHOULD return NBD_EINVAL if it receives an unknown command"
        if flags & ~int(allowed):
            return Errno.EINVAL
        advertised = facts.flags
        if flags & CmdFlag.DF and not advertised & TransmissionFlag.SEND_DF:
            return Errno.EINVAL
        writes = command in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
        if command == Cmd.TRIM and not advertised & TransmissionFlag.SEND_TRIM:
            return Errno.EINVAL
        if command == Cmd.BLOCK_STATUS and not self.negotiated.meta_contexts:
            return Errno.EINVAL
        if command == Cmd.FLUSH and (offset or length):
            return Errno.EINVAL
        if writes and advertised & TransmissionFlag.READ_ONLY:
            return Errno.EPERM
        if command == Cmd.READ and length > MAX_PAYLOAD:
            return Errno.EOVERFLOW  # "permitted to reject large read requests up front"
        if offset + length > facts.size:
            return Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        if command in (Cmd.WRITE, Cmd.WRITE_ZEROES):
            block = facts.minimum_block
            if offset % block or length % block:
                return Errno.EINVAL
        if command == Cmd.BLOCK_STATUS and length == 0:
            return Errno.EINVAL
        return Errno.OK

    # ---------------------------------------------------------------- replies
    def reply_ok(self, handle: int, command: int) -> None:
        """Success of a request other than READ (or BLOCK_STATUS, which has its own)."""
        self._done_ok(handle, command)

    def _done_ok(self, handle: int, command: int) -> None:
        self._complete(handle)
        if command == Cmd.READ and self.negotiated.structured:
            self._queue(P.chunk(ReplyFlag.DONE, ReplyType.NONE, handle, 0))
        else:
            self._queue(P.simple_reply(0, handle))

    def reply_error(self, handle: int, command: int, error: Errno, message: str = "") -> None:
        self._complete(handle)
        if self.negotiated.structured:
            text = message.encode()[:P.MAX_STRING]
            self._queue(P.chunk(ReplyFlag.DONE, ReplyType.ERROR, handle, 6 + len(text))
                        + struct.pack(">IH", error, len(text)) + text)
        else:
            self._queue(P.simple_reply(error, handle))

    def reply_read(self, handle: int, parts: list[tuple[int, memoryview | int]]) -> None:
        """A READ's data in order: (offset, data) or (offset, length of a hole that reads as
        zeroes). Structured replies send one chunk each, the last marked DONE; a simple reply
        sends the header and the bytes, holes as zeroes."""
        self._complete(handle)
        if not self.negotiated.structured:
            self._queue(P.simple_reply(0, handle))
            for _offset, part in parts:
                if isinstance(part, int):
                    remaining = part
                    while remaining:
                        n = min(remaining, len(ZEROES))
                        self._queue(ZEROES[:n])
                        remaining -= n
                elif len(part):
                    self._queue(part)
            return
        last = len(parts) - 1
        for i, (offset, part) in enumerate(parts):
            flags = ReplyFlag.DONE if i == last else 0
            if isinstance(part, int):
                self._queue(P.chunk(flags, ReplyType.OFFSET_HOLE, handle, 12)
                            + struct.pack(">QI", offset, part))
            else:
                self._queue(P.chunk(flags, ReplyType.OFFSET_DATA, handle, 8 + len(part))
                            + struct.pack(">Q", offset))
                self._queue(part)
        if not parts:
            self._queue(P.chunk(ReplyFlag.DONE, ReplyType.NONE, handle, 0))

    def reply_block_status(self, handle: int,
                           contexts: list[tuple[int, list[tuple[int, int]]]]) -> None:
        """One NBD_REPLY_TYPE_BLOCK_STATUS chunk per context id: (length, flags) extents."""
        self._complete(handle)
        last = len(contexts) - 1
        for i, (context_id, extents) in enumerate(contexts):
            flags = ReplyFlag.DONE if i == last else 0
            body = struct.pack(">I", context_id) + b"".join(
                struct.pack(">II", length, state) for length, state in extents)
            self._queue(P.chunk(flags, ReplyType.BLOCK_STATUS, handle, len(body)) + body)

    def _complete(self, handle: int) -> None:
        self.inflight -= 1
        self.inflight_bytes -= self._write_bytes.pop(handle, 0)
        if self.phase is Phase.CLOSING and self.inflight <= 0:
            self.wants_close = True

    # ---------------------------------------------------------------- output and the end
    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._out.append(data)
        self.queued_bytes += len(data)

    def _finish(self, reason: str) -> None:
        """Soft end: read no more; close once what is queued (and in flight) is out."""
        self.phase = Phase.CLOSING
        self.close_reason = reason
        self._rx.clear()
        if self.inflight <= 0:
            self.wants_close = True

    def _hard_close(self, reason: str) -> None:
        self.phase = Phase.CLOSING
        self.close_reason = reason
        self.wants_close = True
        self._rx.clear()


_ZERO_LENGTH_OK = frozenset({Cmd.READ, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES})
_ERROR_TEXT = {
    Errno.EINVAL: "invalid request",
    Errno.EPERM: "the export is read-only",
    Errno.ENOSPC: "beyond the end of the export",
    Errno.EOVERFLOW: "request too large",
}


def _string(raw: bytes) -> str | None:
    """A protocol string: UTF-8, no NUL, at most 4096 bytes ("Conventions")."""
    if len(raw) > P.MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _meta_request(data: bytes) -> tuple[str, tuple[str, ...]] | bytes:
    """(export, queries) of a LIST/SET_META_CONTEXT, or the error text."""
    if len(data) < 8:
        return b"option data too short"
    (length,) = struct.unpack_from(">I", data)
    if length > len(data) - 8:
        return b"export name longer than the option data"
    export = _string(data[4:4 + length])
    if export is None:
        return b"export name is not a valid string"
    at = 4 + length
    (count,) = struct.unpack_from(">I", data, at)
    at += 4
    if count > P.MAX_QUERIES:
        return b"too many queries"
    queries = []
    for _ in range(count):
        if at + 4 > len(data):
            return b"query beyond the option data"
        (qlen,) = struct.unpack_from(">I", data, at)
        at += 4
        if at + qlen > len(data):
            return b"query beyond the option data"
        query = _string(data[at:at + qlen])
        if query is None:
            return b"query is not a valid string"
        queries.append(query)
        at += qlen
    if at != len(data):
        return b"option length disagrees with its contents"
    return export, tuple(queries)
