"""Every limit the device server advertises, defined once and enforced by the handlers.

VPD B0h (block limits), VPD 8Fh and RECEIVE COPY RESULTS report these values; the command
handlers reject what exceeds them with the sense the standards ask for. Lengths are in logical
blocks unless named `_bytes`.
"""

from __future__ import annotations

MAX_TRANSFER_BYTES = 8 * 1024 * 1024
OPTIMAL_TRANSFER_BYTES = 1024 * 1024
MAX_COMPARE_AND_WRITE_BLOCKS = 128
MAX_PREFETCH_BYTES = 8 * 1024 * 1024

# Logical block provisioning (SBC-3 6.6.4): an UNMAP may deallocate up to 1 Mi blocks
# (512 MiB at 512-byte blocks; VMFS6 sends 1 MiB units, Linux splits at this limit) in up to
# 256 descriptors; granules are 4 KiB, which divides 1 MiB.
MAX_UNMAP_BLOCKS = 1 << 20
MAX_UNMAP_DESCRIPTORS = 256
UNMAP_GRANULARITY_BYTES = 4096
# One WRITE SAME covers at most 16 MiB (32768 blocks of 512 bytes): initiators split larger
# zeroing into several commands.
MAX_WRITE_SAME_BYTES = 16 << 20

MAX_PARAMETER_LIST = 65536  # MODE SELECT, UNMAP and other parameter lists, in bytes


def blocks(nbytes: int, block_size: int) -> int:
    return nbytes // block_size
