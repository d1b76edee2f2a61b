"""Data-In: a read's data cut into SCSI Data-In PDUs (RFC 7143 11.7), with the status in the
last one when it can go there (phase collapse, 11.7.4).

PDUs carry at most the initiator's MaxRecvDataSegmentLength each, and a sequence ends (F bit)
at every MaxBurstLength (RFC 7143 13.13). The data is never copied: each PDU's payload is a
view of the buffer, queued for a vectored write. Digests may be computed ahead of sending, on
whatever thread read the data (`digests`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..core.buffers import DataBuffer
from ..core.buffers import view as as_view
from . import digest as dg
from . import pdu

_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")

Queue = Callable[["bytes | bytearray", "bytes | bytearray | memoryview", "bytes | None"], None]


class DataInTask(Protocol):
    """What Data-In needs of a command (IscsiTask has these)."""

    itt: int
    lun_field: int
    data_sn: int


def segments(length: int, seg_max: int, burst: int) -> list[int]:
    """Sizes of the Data-In PDUs for `length` bytes."""
    if length <= seg_max and length <= burst:
        return [length]
    sizes = []
    offset = in_burst = 0
    while offset < length:
        n = min(seg_max, length - offset, burst - in_burst)
        sizes.append(n)
        offset += n
        in_burst = 0 if in_burst + n == burst else in_burst + n
    return sizes


def digests(data: memoryview, sizes: list[int]) -> list[bytes]:
    """The data digest of each Data-In PDU of `data` cut into `sizes` (pure: any thread)."""
    out = []
    offset = 0
    for n in sizes:
        pad = -n & 3
        parts = (data[offset:offset + n], _PADDING[pad]) if pad else (data[offset:offset + n],)
        out.append(dg.digest(parts))
        offset += n
    return out


def send(queue: Queue, task: DataInTask, data: bytes | DataBuffer | memoryview, length: int,
         seg_max: int, burst: int, status: int, residual_flags: int, residual: int,
         collapse: bool, precomputed: list[bytes] | None, stat_sn: int, exp_cmd_sn: int,
         max_cmd_sn: int) -> bool:
    """Queue the Data-In PDUs of `length` bytes of `data`; True when the status went with
    the last of them (`collapse`), which then took StatSN `stat_sn`."""
    view = as_view(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if length <= seg_max and length <= burst:  # one PDU: most commands
        if collapse:
            flags = pdu.F_FINAL | pdu.F_DATAIN_STATUS | residual_flags
        else:
            flags, residual = pdu.F_FINAL, 0
        hdr = pdu.data_in(task.itt, flags, status, length, task.lun_field, stat_sn, exp_cmd_sn,
                          max_cmd_sn, task.data_sn, 0, residual)
        task.data_sn += 1
        queue(hdr, view if len(view) == length else view[:length],
              precomputed[0] if precomputed is not None and len(precomputed) == 1 else None)
        return collapse
    sizes = segments(length, seg_max, burst)
    if precomputed is not None and len(precomputed) != len(sizes):
        precomputed = None
    offset = 0
    in_burst = 0
    for i, n in enumerate(sizes):
        last = offset + n == length
        in_burst += n
        flags = 0
        if last or in_burst == burst:
            flags = pdu.F_FINAL
            in_burst = 0
        with_status = last and collapse
        if with_status:
            flags |= pdu.F_DATAIN_STATUS | residual_flags
        hdr = pdu.data_in(task.itt, flags, status, n, task.lun_field, stat_sn, exp_cmd_sn,
                          max_cmd_sn, task.data_sn, offset, residual if with_status else 0)
        task.data_sn += 1
        queue(hdr, view[offset:offset + n], precomputed[i] if precomputed else None)
        offset += n
    return collapse
