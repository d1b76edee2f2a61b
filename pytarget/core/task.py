"""The SCSI task as the device server sees it, and the I_T nexus that issued it.

A transport protocol (iSCSI, or the copy manager acting as an internal initiator) creates a
`ScsiTask`, gives it a `DataSource` that fetches Data-Out on demand, and reads the status,
sense and Data-In back once the device server has executed it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Protocol

from .buffers import DataBuffer
from .sense import Status


class TaskAttr(IntEnum):
    """Task attribute (SAM-5 8.6); front ends map their own encodings onto it."""

    SIMPLE = 0
    ORDERED = 1
    HEAD_OF_QUEUE = 2
    ACA = 3


class Nexus:
    """An I_T nexus: initiator port and target port (SAM-5 4.6.2, SPC-4 5.13 for PR).

    For iSCSI the initiator port name is "<iSCSI name>,i,0x<ISID>" and the target port name
    "<iSCSI name>,t,0x<TPGT>" (RFC 7143 10.1.1). Two logins with different ISIDs are two nexuses.
    """

    __slots__ = ("initiator_name", "isid", "target_name", "tpgt", "relative_port", "key",
                 "internal", "__weakref__")

    def __init__(self, initiator_name: str, isid: bytes, target_name: str, tpgt: int,
                 relative_port: int = 1, internal: bool = False) -> None:
        self.initiator_name = initiator_name
        self.isid = bytes(isid)
        self.target_name = target_name
        self.tpgt = tpgt
        self.relative_port = relative_port
        self.internal = internal
        self.key = (initiator_name.lower(), self.isid, target_name.lower(), tpgt)

    @property
    def initiator_port_name(self) -> str:
        return f"{self.initiator_name},i,0x{self.isid.hex()}"

    @property
    def target_port_name(self) -> str:
        return f"{self.target_name},t,0x{self.tpgt:04x}"

    def __repr__(self) -> str:
        return f"<Nexus {self.initiator_port_name} -> {self.target_port_name}>"


class DataSource(Protocol):
    def fetch_data_out(self, task: ScsiTask, length: int) -> Awaitable[memoryview]:
        """Collect `length` bytes of Data-Out (R2T as needed); resolves to a view of them."""
        ...


class ScsiTask:
    """One command: CDB in, status/sense/Data-In out."""

    __slots__ = ("cdb", "lun", "tag", "attr", "nexus", "expected_in", "expected_out",
                 "source", "status", "sense", "data_in", "data_in_len", "data_out_len",
                 "aborted", "handle", "internal", "prepare_data_in", "lend_data_in",
                 "on_data_sent", "data_out_ready")

    def __init__(self, cdb: bytes | memoryview, lun: int, tag: int, nexus: Nexus,
                 attr: TaskAttr = TaskAttr.SIMPLE, expected_in: int = 0,
                 expected_out: int = 0, source: DataSource | None = None) -> None:
        self.cdb = cdb
        self.lun = lun
        self.tag = tag
        self.nexus = nexus
        self.attr = attr
        self.expected_in = expected_in
        self.expected_out = expected_out
        self.source = source
        self.status: int = Status.GOOD
        self.sense: bytes | None = None
        self.data_in: bytes | DataBuffer | memoryview | None = None
        self.data_in_len = 0
        self.data_out_len = 0
        self.aborted = False
        self.handle: object | None = None
        self.internal = False  # issued by the copy manager on behalf of `nexus`
        # Fabric work on a READ's Data-In buffer, run right after the read fills it, where the
        # read ran: on the event loop, or on an I/O thread when the read had to go there
        # (iSCSI computes its data digests here).
        self.prepare_data_in: Callable[[memoryview], None] | None = None
        # Set by a fabric that sends Data-In from the buffer it is given without reading it
        # in Python: a READ may then answer with a view of the medium's pages instead of a
        # copy. The view stays valid (the blocks locked) until the fabric calls
        # `on_data_sent`, which it must do exactly once, when the data has left or will never
        # leave.
        self.lend_data_in = False
        self.on_data_sent: Callable[[], None] | None = None
        # Set by a fabric whose whole Data-Out came with the command (iSCSI immediate data):
        # `data_out_now` then hands it over without asking the source.
        self.data_out_ready: memoryview | None = None

    async def receive_data_out(self, length: int) -> memoryview:
        """The first `length` bytes of Data-Out, collected from the initiator."""
        self.data_out_len = length
        if length == 0:
            return memoryview(b"")
        if self.source is None:
            raise RuntimeError("task has no data source")
        return await self.source.fetch_data_out(self, length)

    def data_out_now(self, length: int) -> memoryview | None:
        """`receive_data_out` without waiting when its data is all here (`data_out_ready`),
        else None: the caller then awaits `receive_data_out`."""
        ready = self.data_out_ready
        if ready is None or length == 0:
            return None
        self.data_out_len = length
        return ready if length >= len(ready) else ready[:length]

    def set_data_in(self, data: bytes | DataBuffer | memoryview,
                    length: int | None = None) -> None:
        self.data_in = data
        self.data_in_len = len(data) if length is None else length
