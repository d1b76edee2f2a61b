"""iSCSI session state: the CmdSN window and the tasks in flight (RFC 7143 4.2.2).

A `Session` is shared by its connections (this target negotiates MaxConnections=1, so there is
one); it accepts commands in CmdSN order, holds those that arrive early, and sizes MaxCmdSN by
the free command slots so a busy target throttles its initiators rather than queueing without
bound. `IscsiTask` keeps the iSCSI side of one SCSI command: its buffers and its R2T state.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from ..core.frontend import FrontEndUnit
from ..core.task import Nexus, ScsiTask, TaskAttr
from .params import ConnectionParams, SessionParams
from .pdu import sn_le, sn_lt

if TYPE_CHECKING:
    from .target import TargetNode


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


class R2tState:
    __slots__ = ("ttt", "r2t_sn", "offset", "length", "received", "next_data_sn")

    def __init__(self, ttt: int, r2t_sn: int, offset: int, length: int) -> None:
        self.ttt = ttt
        self.r2t_sn = r2t_sn
        self.offset = offset
        self.length = length
        self.received = 0
        self.next_data_sn = 0


class IscsiTask:
    """The iSCSI side of one SCSI command (write buffer, R2T bookkeeping, Data-In numbering)."""

    __slots__ = ("itt", "cmd_sn", "immediate", "lun_field", "read", "write", "edtl", "cdb",
                 "attr", "scsi", "buffer", "received", "unsolicited_end",
                 "unsolicited_received", "unsolicited_done", "unsolicited_next_sn",
                 "wanted", "next_r2t_offset", "r2ts", "r2t_sn", "data_sn", "waiter",
                 "data_error", "data_failure", "done", "data_in_digests", "reserved")

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
        self.buffer: Any = None  # bytearray or uninitialised numpy array (core.buffers)
        self.received = 0
        self.unsolicited_end = 0
        self.unsolicited_received = 0
        self.unsolicited_done = True
        self.unsolicited_next_sn = 0
        self.wanted = 0
        self.next_r2t_offset = 0
        self.r2ts: dict[int, R2tState] = {}
        self.r2t_sn = 0
        self.data_sn = 0
        self.waiter: object | None = None
        self.data_error = ""  # "digest" or "sequence": the Data-Out could not be accepted
        self.data_failure = ""  # data_error to be, once the outstanding Data-Out is in
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
        free = max(self.window - self.active, 1)
        candidate = (self.exp_cmd_sn + free - 1) & 0xFFFFFFFF
        if sn_lt(self.max_cmd_sn, candidate):
            self.max_cmd_sn = candidate
        return self.max_cmd_sn
