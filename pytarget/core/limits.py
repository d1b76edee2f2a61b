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

# Asymmetric access (SPC-4 6.37): the IMPLICIT TRANSITION TIME REPORT TARGET PORT GROUPS
# gives gateways, in seconds: how long an initiator should allow an ownership move to take.
ALUA_IMPLICIT_TRANSITION_SECONDS = 30

# WRITE ATOMIC(16) (SBC-4 5.48): the one atomic write size a LUN offers by default, in bytes,
# when its backstore writes that size atomically (clamped into the backstore's unit range; a
# LUN's `atomic_write_size` changes it). The device server can only pass on power-of-two writes
# aligned to their length, and SBC-4 cannot say "powers of two" in VPD B0h: granularity =
# alignment = maximum = one size is the only claim true of every write it admits, and Linux's
# sd accepts it (atomic unit min = max). 16 KiB is InnoDB's page, twice PostgreSQL's.
ATOMIC_WRITE_BYTES = 16 * 1024

MAX_PARAMETER_LIST = 65536  # MODE SELECT, UNMAP and other parameter lists, in bytes


def blocks(nbytes: int, block_size: int) -> int:
    return nbytes // block_size

# Third-party copy (SPC-4 5.17, 6.4, 6.18, 7.8.17): the copy manager's limits, reported by
# RECEIVE COPY RESULTS (OPERATING PARAMETERS) and VPD 8Fh and enforced by the parameter list
# parser. libiscsi's DescrLimits needs the list length to hold one descriptor more than either
# count allows, so that the count checks, not the length check, fire: 33·32+28 and 32+65·28 fit.
MAX_CSCD_DESCRIPTORS = 32
MAX_SEGMENT_DESCRIPTORS = 64
MAX_DESCRIPTOR_LIST_BYTES = 4096  # CSCD descriptors + segment descriptors
MAX_INLINE_DATA_BYTES = 0
HELD_DATA_LIMIT_BYTES = 0
MAX_SEGMENT_BYTES = 0xFFFF * 4096  # NUMBER OF BLOCKS is 16 bits: the largest segment possible
MAX_CONCURRENT_COPIES = 64  # per logical unit, identified and unidentified alike
MAX_HELD_RESULTS = 256  # per I_T nexus and logical unit; the oldest is discarded past this
COPY_CHUNK_BYTES = 8 << 20  # one sub-command; an abort stops a copy within one chunk
COPY_CHUNK_MAX_BYTES = 256 << 20  # chunks grow to this while every chunk is a reflink
COPY_PIPELINE_DEPTH = 2  # chunks in flight per segment: the next read overlaps this write

# ROD tokens (SBC-3 4.29, SPC-4 5.17.6): POPULATE TOKEN / WRITE USING TOKEN.
MAX_ROD_RANGES = 64  # block device range descriptors in one command
DEFAULT_INACTIVITY_TIMEOUT = 60  # seconds
MAX_INACTIVITY_TIMEOUT = 600
MIN_TOKEN_LIFETIME = 1
MAX_TOKEN_LIFETIME = 3600  # a token also dies this long after creation, however busy
MAX_TOKEN_TRANSFER_BYTES = 4 << 30  # bytes one token may represent
OPTIMAL_TOKEN_TRANSFER_BYTES = 256 << 20
MAX_ROD_TOKENS = 4096  # live tokens per copy manager
MAX_ROD_TOKENS_PER_NEXUS = 256  # of which one I_T nexus may hold
