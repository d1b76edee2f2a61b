"""Data buffers for commands: large ones are allocated without zero-filling.

A READ's buffer is entirely overwritten by `preadv`, a write's by the Data-Out that lands in
it; zeroing them first (what `bytearray(n)` does) is wasted work, about 15 µs per MiB here.
`numpy.empty` hands out uninitialised memory that supports the buffer protocol like a
bytearray does.
"""

from __future__ import annotations

import numpy as np

UNINITIALISED_MIN = 16384  # below this bytearray is as cheap


DataBuffer = bytearray | np.ndarray


def data_buffer(nbytes: int) -> DataBuffer:
    """A writable buffer of nbytes whose contents are undefined until filled."""
    if nbytes < UNINITIALISED_MIN:
        return bytearray(nbytes)
    return np.empty(nbytes, dtype=np.uint8)


def view(buf: bytes | DataBuffer | memoryview) -> memoryview:
    """A memoryview of a buffer (numpy's type information declares the buffer protocol of its
    arrays only from Python 3.12 on)."""
    return memoryview(buf)  # type: ignore[arg-type]
