"""Cutting a received byte stream into iSCSI PDUs (RFC 7143 11.1-11.2), for both ends.

A `PduReader` receives bytes into the buffer it offers (`get_buffer`, then `_received`), in the
shape of asyncio's BufferedProtocol, and finds in them each PDU's Basic Header Segment, its
Additional Header Segments, header digest, data segment, padding and data digest (RFC 7143
13.1, CRC32C). The target connection and the initiator both derive from it and handle what it
finds through its hooks: `_pdu` for a whole PDU, `_segment_too_long` and `_data_digest_error`
for the faults that leave the stream in step (a header digest error or an oversized AHS does
not: they raise `ConnectionFatal`).

A subclass may have a large data segment placed straight into its own buffer (`_placement`,
then `_placed` once it is in and its digest checked), so Data-Out lands in the task's buffer
without a second copy. Deriving rather than delegating keeps the receive path free of an extra
call per PDU.
"""

from __future__ import annotations

from . import digest as dg
from . import pdu
from .errors import ConnectionFatal
from .pdu import Bhs

MAX_AHS = 1020
PLACE_MIN = 16384  # data segments at least this large may be placed by the subclass
_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")


class PduReader:
    """The receive side of an iSCSI connection: a staging buffer and where each PDU ends."""

    def __init__(self, staging: int, max_segment: int) -> None:
        self._buf = bytearray(staging)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._bhs: Bhs | None = None
        self._need_data = 0  # payload + padding + digest of the current PDU
        self._placed_view: memoryview | None = None  # where the current payload is placed
        self._placed_filled = 0
        # A placed payload whose padding and digest still come through staging.
        self._tail: tuple[Bhs, memoryview] | None = None
        self._discard = 0
        self.ahs = b""  # the current PDU's Additional Header Segments
        self.headers = 0  # headers parsed so far
        self.header_digest = False
        self.data_digest = False
        self.max_segment = max_segment  # longer data segments go to `_segment_too_long`
        self.rx_open = True  # parsing stops for good once this is false

    # ------------------------------------------------------------------ hooks
    def _pdu(self, bhs: Bhs, data: memoryview) -> None:
        """A whole PDU; `data` is valid until this returns."""
        raise NotImplementedError

    def _segment_too_long(self, bhs: Bhs) -> None:
        """A data segment over `max_segment`: it is skipped once this returns."""
        raise ConnectionFatal("data segment longer than MaxRecvDataSegmentLength")

    def _data_digest_error(self, bhs: Bhs) -> None:
        """The data digest of the PDU of `bhs` did not match; the PDU is skipped."""
        raise ConnectionFatal("data digest error")

    def _placement(self, bhs: Bhs) -> memoryview | None:
        """Where to receive the data segment of `bhs` (its exact length), or None to stage it."""
        return None

    def _placed(self, bhs: Bhs) -> None:
        """The data segment of `bhs` is in the view `_placement` gave, its digest checked."""

    # ------------------------------------------------------------------ receiving
    def get_buffer(self) -> memoryview:
        if self._placed_view is not None:
            return self._placed_view[self._placed_filled:]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end:]

    def _received(self, nbytes: int) -> None:
        """`nbytes` more are in the buffer `get_buffer` gave: handle every PDU now whole."""
        if self._placed_view is not None:
            self._placed_filled += nbytes
            if self._placed_filled == len(self._placed_view):
                self._placement_complete()
        else:
            self._end += nbytes
        self._parse()

    def partial_pdu(self) -> str | None:
        """What of a PDU has arrived without the rest: "data", "header", or None between PDUs."""
        if self._bhs is not None or self._placed_view is not None or self._tail is not None \
                or self._discard:
            return "data"
        if self._end > self._start:
            return "header"
        return None

    def _compact(self) -> None:
        pending = self._end - self._start
        if self._start:
            self._buf[0:pending] = self._buf[self._start:self._end]
            self._start = 0
            self._end = pending

    def _make_room(self, need: int) -> None:
        """Room for `need` bytes from `_start`: compact, and grow if that is not enough."""
        if need <= len(self._buf):
            self._compact()
            return
        pending = self._end - self._start
        buf = bytearray(max(need, 2 * len(self._buf)))
        buf[:pending] = self._view[self._start:self._end]
        self._buf = buf
        self._view = memoryview(buf)
        self._start = 0
        self._end = pending

    def _parse(self) -> None:
        view = self._view
        while self.rx_open and self._placed_view is None:
            avail = self._end - self._start
            if self._discard:
                n = min(self._discard, avail)
                self._discard -= n
                self._start += n
                if self._discard:
                    break
                continue
            if self._tail is not None:
                if avail < self._need_data:
                    break
                self._tail_in()
                continue
            if self._bhs is None:
                if avail < pdu.BHS_LEN:
                    break
                start = self._start
                bhs = Bhs(view[start:start + pdu.BHS_LEN])
                ahs_len = bhs.total_ahs_length
                if ahs_len > MAX_AHS:
                    raise ConnectionFatal("AHS too long")
                header_len = pdu.BHS_LEN + ahs_len
                if self.header_digest:
                    header_len += 4
                    if avail < header_len:
                        break
                    end = start + header_len - 4
                    if dg.crc32c(view[start:end]) != dg.digest_value(view[end:end + 4]):
                        raise ConnectionFatal("header digest error")
                elif avail < header_len:
                    break
                self._bhs = bhs
                self.headers += 1
                if ahs_len:
                    self.ahs = bytes(view[start + pdu.BHS_LEN:start + pdu.BHS_LEN + ahs_len])
                self._start = start + header_len
                dsl = bhs.data_segment_length
                self._need_data = dsl + (-dsl & 3) + (4 if dsl and self.data_digest else 0)
                if dsl > self.max_segment:
                    self._bhs = None
                    self._discard = self._need_data
                    self._segment_too_long(bhs)
                    continue
                avail = self._end - self._start
                if dsl >= PLACE_MIN and avail < self._need_data and self._place(bhs, avail):
                    continue
            bhs = self._bhs
            if avail < self._need_data:
                if self._need_data > len(self._buf) - self._start:
                    self._make_room(self._need_data)
                    view = self._view
                break
            start = self._start
            dsl = bhs.data_segment_length
            self._start = start + self._need_data
            self._bhs = None
            if dsl and self.data_digest:
                at = start + dsl + (-dsl & 3)
                if dg.crc32c(view[start:at]) != dg.digest_value(view[at:at + 4]):
                    self._data_digest_error(bhs)
                    continue
            self._pdu(bhs, view[start:start + dsl])
        if self._start == self._end:
            self._start = self._end = 0

    # ------------------------------------------------------------------ placed payloads
    def _place(self, bhs: Bhs, have: int) -> bool:
        """Receive the rest of a large payload straight into the subclass's buffer."""
        dsl = bhs.data_segment_length
        dest = self._placement(bhs)
        if dest is None:
            return False
        have = min(have, dsl)
        dest[:have] = self._view[self._start:self._start + have]
        self._start += have
        if self._start == self._end:
            self._start = self._end = 0
        self._placed_view = dest
        self._placed_filled = have
        if have == dsl:
            self._placement_complete()
        return True

    def _placement_complete(self) -> None:
        """A placed payload is in: its padding and digest, if any, follow through staging."""
        bhs, dest = self._bhs, self._placed_view
        assert bhs is not None and dest is not None
        self._placed_view = None
        self._bhs = None
        tail = self._need_data - len(dest)
        if tail:
            self._tail = (bhs, dest)
            self._need_data = tail
        else:
            self._placed(bhs)

    def _tail_in(self) -> None:
        assert self._tail is not None
        (bhs, dest), self._tail = self._tail, None
        at = self._start + (-len(dest) & 3)
        digest_raw = self._view[at:at + 4] if self.data_digest else None
        self._start += self._need_data
        if digest_raw is not None:
            value = dg.crc32c(dest)
            pad = -len(dest) & 3
            if pad:
                value = dg.crc32c(_PADS[pad], value)
            if value != dg.digest_value(digest_raw):
                self._data_digest_error(bhs)
                return
        self._placed(bhs)
