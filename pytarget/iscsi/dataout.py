"""The Data-Out of one write command: where it lands, its unsolicited burst, the R2Ts that
solicit the rest, and how a faulty sequence ends the command (RFC 7143 11.7, 11.8; 7.8 at
ErrorRecoveryLevel 0).

A `DataOutSequence` owns that state and says what should happen next; the connection sends
the R2T PDUs it asks for and tells the device server when the data it wanted is in (or has
failed). DataPDUInOrder=Yes is always negotiated, so each Data-Out PDU must start where the
previous one of its sequence ended (RFC 7143 13.19).
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.buffers import DataBuffer, view
from . import pdu
from .errors import PduReject
from .pdu import Bhs, RejectReason

# What a Data-Out PDU that landed asks of the connection (`DataOutSequence.landed`).
LANDED = 0  # nothing more
SOLICIT = 1  # a burst ended: R2Ts may go out for what is still wanted
SHORT = -1  # an R2T's burst ended short: the command fails


class R2tState:
    __slots__ = ("ttt", "r2t_sn", "offset", "length", "received", "next_data_sn")

    def __init__(self, ttt: int, r2t_sn: int, offset: int, length: int) -> None:
        self.ttt = ttt
        self.r2t_sn = r2t_sn
        self.offset = offset
        self.length = length
        self.received = 0
        self.next_data_sn = 0


class DataOutSequence:
    """The Data-Out of one command, from its immediate data to its last solicited burst."""

    __slots__ = ("buffer", "edtl", "received", "unsolicited_end", "unsolicited_received",
                 "unsolicited_done", "unsolicited_next_sn", "wanted", "next_r2t_offset",
                 "r2ts", "r2t_sn", "waiter", "error", "failure")

    def __init__(self, buffer: DataBuffer, edtl: int, immediate: memoryview,
                 unsolicited_end: int,
                 unsolicited_done: bool) -> None:
        self.buffer = buffer  # core.buffers.data_buffer
        self.edtl = edtl
        dsl = len(immediate)
        if dsl:
            view(buffer)[0:dsl] = immediate
        self.received = dsl
        self.unsolicited_end = unsolicited_end
        self.unsolicited_received = dsl
        self.unsolicited_done = unsolicited_done
        self.unsolicited_next_sn = 0
        self.wanted = 0  # what the device server has asked for so far
        self.next_r2t_offset = unsolicited_end
        self.r2ts: dict[int, R2tState] = {}
        self.r2t_sn = 0
        self.waiter: object | None = None  # the device server's, until the data is in
        self.error = ""  # "digest" or "sequence": the Data-Out could not be accepted
        self.failure = ""  # `error` to be, once the outstanding Data-Out is in

    def view(self) -> memoryview:
        """What the device server asked for, as it arrived."""
        return view(self.buffer)[:min(self.wanted, self.edtl)]

    def whole(self) -> memoryview:
        """All `edtl` bytes, once they are in (immediate data that covered them)."""
        return view(self.buffer)[:self.edtl]

    def check(self, bhs: Bhs) -> None:
        """Validate a Data-Out PDU against its burst (raises PduReject)."""
        dsl = bhs.data_segment_length
        offset = bhs.buffer_offset
        if offset + dsl > len(self.buffer):
            raise PduReject(RejectReason.PROTOCOL_ERROR, "Data-Out beyond the expected length")
        if bhs.ttt == pdu.RESERVED_TAG:
            if self.unsolicited_done:
                raise PduReject(RejectReason.PROTOCOL_ERROR, "unsolicited data after the burst")
            if offset != self.unsolicited_received or offset + dsl > self.unsolicited_end:
                raise PduReject(RejectReason.PROTOCOL_ERROR, "unsolicited data out of place")
            if bhs.data_sn != self.unsolicited_next_sn:
                raise PduReject(RejectReason.PROTOCOL_ERROR, "unexpected DataSN")
            return
        r2t = self.r2ts.get(bhs.ttt)
        if r2t is None:
            raise PduReject(RejectReason.INVALID_PDU_FIELD, "unknown Target Transfer Tag")
        if offset != r2t.offset + r2t.received or offset + dsl > r2t.offset + r2t.length:
            raise PduReject(RejectReason.PROTOCOL_ERROR, "Data-Out outside its R2T")
        if bhs.data_sn != r2t.next_data_sn:
            raise PduReject(RejectReason.PROTOCOL_ERROR, "unexpected DataSN")

    def landed(self, bhs: Bhs, dsl: int) -> int:
        """A checked Data-Out PDU's `dsl` bytes are in the buffer: LANDED, SOLICIT or SHORT."""
        self.received += dsl
        if bhs.ttt == pdu.RESERVED_TAG:
            self.unsolicited_received += dsl
            self.unsolicited_next_sn += 1
            if bhs.final or self.unsolicited_received >= self.unsolicited_end:
                self._end_unsolicited()
                return SOLICIT
            return LANDED
        r2t = self.r2ts[bhs.ttt]
        r2t.received += dsl
        r2t.next_data_sn += 1
        if bhs.final or r2t.received >= r2t.length:
            del self.r2ts[bhs.ttt]
            return SHORT if r2t.received < r2t.length else SOLICIT
        return LANDED

    def _end_unsolicited(self) -> None:
        """The unsolicited burst is over; what it left out must be solicited (RFC 7143 11.7.1).

        R2Ts wait for this moment, so none has been issued yet for the range it covered.
        """
        self.unsolicited_done = True
        if self.unsolicited_received < self.unsolicited_end:
            self.unsolicited_end = self.unsolicited_received
            self.next_r2t_offset = self.unsolicited_received

    def complete(self) -> bool:
        """Everything the device server asked for is in."""
        return self.received >= self.wanted and not self.r2ts and (
            self.unsolicited_done or self.unsolicited_received >= min(self.wanted,
                                                                       self.unsolicited_end))

    def request(self, length: int, waiter: object) -> bool:
        """The device server wants `length` bytes: True when they are in already (or the
        sequence has failed: see `error`); otherwise R2Ts may be due (`solicit`)."""
        self.wanted = min(length, self.edtl)
        self.waiter = waiter
        if self.error:
            return True
        if self.failure:
            return False
        return self.complete()

    def solicit(self, max_outstanding: int, max_burst: int,
                next_ttt: Callable[[], int]) -> list[R2tState]:
        """R2Ts for what is wanted and not yet asked for, once the unsolicited burst is over
        (RFC 7143 11.8; at most MaxOutstandingR2T at a time, MaxBurstLength each)."""
        if self.failure or not self.unsolicited_done:
            return []
        issued = []
        r2ts = self.r2ts
        while len(r2ts) < max_outstanding and self.next_r2t_offset < self.wanted:
            offset = self.next_r2t_offset
            length = min(max_burst, self.wanted - offset)
            state = R2tState(next_ttt(), self.r2t_sn, offset, length)
            r2ts[state.ttt] = state
            self.r2t_sn += 1
            self.next_r2t_offset = offset + length
            issued.append(state)
        return issued

    def fail(self, reason: str, bhs: Bhs | None = None) -> bool:
        """The Data-Out cannot be accepted: the command ends once every Data-Out still
        outstanding for it has arrived (RFC 7143 7.8); `bhs` is the offending PDU, counted
        towards that as discarded. True when the command ends now."""
        if not self.failure:
            self.failure = reason
        if bhs is not None:
            return self.drain(bhs)
        return self._drained()

    def drain(self, bhs: Bhs) -> bool:
        """Count a discarded Data-Out of a failing command against its open sequences; True
        when that was the last one."""
        dsl = bhs.data_segment_length
        if bhs.ttt == pdu.RESERVED_TAG:
            self.unsolicited_received += dsl
            if bhs.final or self.unsolicited_received >= self.unsolicited_end:
                self.unsolicited_done = True
        else:
            r2t = self.r2ts.get(bhs.ttt)
            if r2t is not None:
                r2t.received += dsl
                if bhs.final or r2t.received >= r2t.length:
                    del self.r2ts[bhs.ttt]
        return self._drained()

    def _drained(self) -> bool:
        if self.r2ts or not self.unsolicited_done or self.error:
            return False
        self.error = self.failure
        return True
