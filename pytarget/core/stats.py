"""Command counters of one logical unit, kept by `LogicalUnit._account` for the metrics endpoint.

One row of integers per operation code, created on the first command with that code: commands,
Data-In bytes, Data-Out bytes, commands that ended with a status other than GOOD, the sum of
their latencies in nanoseconds, and a latency histogram with power-of-two bounds in
microseconds. Updating a row is a few integer additions on the event loop: no locks, no
allocation after the first command.
"""

from __future__ import annotations

COMMANDS, DATA_IN, DATA_OUT, NOT_GOOD, LATENCY_NS, FIRST_BUCKET = range(6)
# Bucket b counts commands that took less than 2**b microseconds (b = floor(log2(us)) + 1, the
# bit length of the microseconds); the last one also holds everything slower.
LATENCY_BUCKETS = 26
ROW_LENGTH = FIRST_BUCKET + LATENCY_BUCKETS
TOP_BUCKET = LATENCY_BUCKETS - 1
SLOWEST = 1 << (TOP_BUCKET - 1)  # microseconds from which a latency lands in the last bucket


def new_row() -> list[int]:
    return [0] * ROW_LENGTH


def bucket_bound_seconds(b: int) -> float:
    """The upper bound (le) of histogram slot `b` (0-based within the histogram)."""
    return (1 << b) / 1e6
