"""The bounds on what an initiator can make this target hold or wait for, and their defaults.

Each value is a default that `config.limits` may change; docs/security.md lists them all. The
`MemoryBudget` caps the data buffers of all commands in flight (Data-Out, and the Data-In a
command may produce), globally and per session, so that no number of commands announcing large
transfers can exhaust memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MiB = 1 << 20


@dataclass
class Bounds:
    """Limits and timeouts of one pytarget instance (seconds, bytes, counts; 0: no limit)."""

    max_connections: int = 256  # open TCP connections, logins in progress included
    max_sessions: int = 128  # sessions of every target and discovery sessions together
    data_out_memory: int = 1024 * MiB  # data buffers of all commands in flight
    session_data_out_memory: int = 128 * MiB  # the share one session may hold
    login_timeout: float = 15.0  # from accept to the final Login Response
    auth_failure_delay: float = 1.0  # before a 0201/0202 Login Response is sent
    nop_interval: float = 30.0  # idle time before a NOP-In ping (0: never)
    nop_timeout: float = 30.0  # to answer it
    pdu_timeout: float = 30.0  # to receive the rest of a PDU once it has begun
    send_timeout: float = 60.0  # output queued without any progress
    output_high_water: int = 16 * MiB  # queued output above which reading pauses

    def connection_options(self) -> dict[str, float]:
        """The keyword arguments of iscsi.connection.Connection these bounds set."""
        return {"login_timeout": self.login_timeout, "nop_interval": self.nop_interval,
                "nop_timeout": self.nop_timeout, "pdu_timeout": self.pdu_timeout,
                "auth_failure_delay": self.auth_failure_delay}


class _Holder(Protocol):
    data_out_reserved: int


class MemoryBudget:
    """Bytes reserved for command data buffers, globally and per holder (a session)."""

    def __init__(self, total: int, per_holder: int) -> None:
        self.total = total
        self.per_holder = per_holder
        self.used = 0
        self.refused = 0

    def reserve(self, holder: _Holder, nbytes: int) -> bool:
        if (self.total and self.used + nbytes > self.total) or (
                self.per_holder and holder.data_out_reserved + nbytes > self.per_holder):
            self.refused += 1
            return False
        self.used += nbytes
        holder.data_out_reserved += nbytes
        return True

    def release(self, holder: _Holder, nbytes: int) -> None:
        self.used -= nbytes
        holder.data_out_reserved -= nbytes
