"""iSCSI session state: the CmdSN window and the tasks in flight (RFC 7143 4.2.2).

A `Session` is shared by its connections (this target negotiates MaxConnections=1, so there is
one); it accepts commands in CmdSN order, holds those that arrive early, and sizes MaxCmdSN by
the free command slots so a busy target throttles its initiators rather than queueing without
bound. `IscsiTask` keeps the iSCSI side of one SCSI command: its Data-Out sequence
(iscsi/dataout.py) and its Data-In numbering.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from ..core.frontend import FrontEndUnit
from ..core.task import Nexus, ScsiTask, TaskAttr
from .dataout import DataOutSequence
from .params import ConnectionParams, SessionParams
from .pdu import sn_le

if TYPE_CHECKING:
    from .node import TargetNode


class ConnectionLink(Protocol):
    """A connection of a session, as the session's owner sees it (the transport's driver)."""

    @property
    def cid(self) -> int: ...

    @property
    def peer(self) -> tuple[str, int]: ...

    @property
    def done(self) -> Awaitable[None]:
        """Resolves once the connection has closed and its tasks have ended."""
        ...

    def close(self, reason: str) -> None: ...


class IscsiTask:
    """The iSCSI side of one SCSI command (its Data-Out sequence, Data-In numbering)."""

    __slots__ = ("itt", "cmd_sn", "immediate", "lun_field", "read", "write", "edtl", "cdb",
                 "attr", "scsi", "data_out", "data_sn", "done", "data_in_digests", "reserved")

    def __init__(self, itt: int, cmd_sn: int, immediate: bool, lun_field: int, read: bool,
                 write: bool, edtl: int, cdb: bytes, attr: TaskAttr) -> None:
        self.itt = itt
        self.cmd_sn = cmd_sn
        self.immediate = immediate
        self.lun_field = lun_field
        self.read = read
        self.write = write
        self.edtl = edtl
        self.cdb = cdb
        self.attr = attr
        self.scsi: ScsiTask | None = None
        self.data_out: DataOutSequence | None = None  # a write with data to receive
        self.data_sn = 0
        self.done = False
        self.data_in_digests: tuple[int, list[bytes]] | None = None  # (length, per-PDU CRCs)
        self.reserved = 0  # bytes of the Data-Out memory budget this task holds


class Session:
    def __init__(self, tsih: int, isid: bytes, params: SessionParams,
                 target: TargetNode[Any] | None,
                 nexus: Nexus | None, exp_cmd_sn: int, window: int) -> None:
        self.tsih = tsih
        self.isid = isid
        self.params = params
        self.target = target
        self.nexus = nexus
        self.exp_cmd_sn = exp_cmd_sn
        self.window = window
        self.max_cmd_sn = (exp_cmd_sn + window - 1) & 0xFFFFFFFF
        self.tasks: dict[int, IscsiTask] = {}
        self.held: dict[int, tuple[object, ...]] = {}
        self.active = 0
        self.connections: list[ConnectionLink] = []
        self.closed = False
        self.connection_params: ConnectionParams | None = None
        # LUN field -> device server, resolved once per session (an ACL change applies to
        # new logins; a reconfiguration that adds or removes LUNs clears it).
        self.lun_cache: dict[int, FrontEndUnit] = {}
        self.data_out_reserved = 0  # bytes of Data-Out buffers its tasks hold (bounds.py)

    @property
    def discovery(self) -> bool:
        return self.params.session_type == "Discovery"

    def in_window(self, cmd_sn: int) -> bool:
        return sn_le(self.exp_cmd_sn, cmd_sn) and sn_le(cmd_sn, self.max_cmd_sn)

    def refresh_max_cmd_sn(self) -> int:
        """MaxCmdSN from the free slots; it never moves backwards (RFC 7143 4.2.2.1)."""
        free = self.window - self.active
        candidate = (self.exp_cmd_sn + (free - 1 if free > 1 else 0)) & 0xFFFFFFFF
        current = self.max_cmd_sn
        # sn_lt(current, candidate), written out: this runs for every response
        if candidate != current and ((candidate - current) & 0xFFFFFFFF) < 0x80000000:
            self.max_cmd_sn = current = candidate
        return current
