"""Scapy layers for iSCSI (RFC 7143 11): the 48-byte Basic Header Segment of every PDU type,
Additional Header Segments, the data segment and its padding.

`ISCSI(raw)` picks the class from the opcode; `build(pdu, header_digest, data_digest)` frames a
PDU with CRC32C digests; `split_stream` cuts a TCP byte stream into PDUs; `Dissector` follows
both directions of a connection, learning the digests from the login, and yields PDUs. Used by
tools/fuzz (building and mutating PDUs), tools/dissect (reading captures) and the tests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from scapy.fields import (
    BitEnumField,
    BitField,
    ByteEnumField,
    ByteField,
    IntField,
    ShortField,
    StrFixedLenField,
    StrLenField,
    X3BytesField,
    XByteField,
    XIntField,
    XLongField,
    XShortField,
)
from scapy.layers.inet import TCP
from scapy.packet import Packet, bind_layers

try:
    import crc32c as _crc32c

    def crc32c(data: bytes) -> int:
        return _crc32c.crc32c(data)
except ImportError:  # pragma: no cover - the project depends on crc32c
    import crcmod.predefined
    _fn = crcmod.predefined.mkCrcFun("crc-32c")

    def crc32c(data: bytes) -> int:
        return _fn(data)

ISCSI_PORT = 3260
BHS_LEN = 48

OPCODES = {
    0x00: "NOP-Out", 0x01: "SCSI Command", 0x02: "Task Management Request",
    0x03: "Login Request", 0x04: "Text Request", 0x05: "SCSI Data-Out",
    0x06: "Logout Request", 0x10: "SNACK Request",
    0x20: "NOP-In", 0x21: "SCSI Response", 0x22: "Task Management Response",
    0x23: "Login Response", 0x24: "Text Response", 0x25: "SCSI Data-In",
    0x26: "Logout Response", 0x31: "R2T", 0x32: "Asynchronous Message", 0x3F: "Reject",
}
INITIATOR_OPCODES = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10)
TMF_FUNCTIONS = {1: "ABORT TASK", 2: "ABORT TASK SET", 3: "CLEAR ACA", 4: "CLEAR TASK SET",
                 5: "LOGICAL UNIT RESET", 6: "TARGET WARM RESET", 7: "TARGET COLD RESET",
                 8: "TASK REASSIGN"}
REJECT_REASONS = {0x02: "Data digest error", 0x03: "SNACK reject", 0x04: "Protocol error",
                  0x05: "Command not supported", 0x06: "Immediate command reject",
                  0x07: "Task in progress", 0x08: "Invalid data ack", 0x09: "Invalid PDU field",
                  0x0A: "Long op reject", 0x0C: "Waiting for logout"}
STAGES = {0: "Security", 1: "Operational", 2: "Reserved", 3: "FullFeature"}


def _pad(n: int) -> int:
    return -n % 4


class ISCSI(Packet):
    """Any iSCSI PDU: dissection picks the class of its opcode."""

    name = "iSCSI"
    fields_desc = [BitField("reserved0", 0, 1), BitField("I", 0, 1),
                   BitEnumField("opcode", 0, 6, OPCODES), XByteField("flags", 0),
                   XShortField("b2_3", 0), ByteField("TotalAHSLength", None),
                   X3BytesField("DataSegmentLength", None),
                   StrFixedLenField("rest", b"\0" * 40, 40)]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: object, **kargs: object) -> type:
        if cls is ISCSI and _pkt:
            return PDU_CLASSES.get(_pkt[0] & 0x3F, ISCSIUnknown)
        return cls

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        ahs_len = len(getattr(self, "AHS", b"") or b"")
        data = getattr(self, "data", b"") or b""
        if self.TotalAHSLength is None:
            p = p[:4] + bytes((ahs_len // 4 & 0xFF,)) + p[5:]
        if self.DataSegmentLength is None:
            p = p[:5] + struct.pack(">I", len(data))[1:] + p[8:]
        if getattr(self, "padding", None) is None and "padding" in self.fields_desc_names():
            p += bytes(_pad(len(data)))
        return p + pay

    def fields_desc_names(self) -> set[str]:
        return {f.name for f in self.fields_desc}

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s

    def guess_payload_class(self, payload: bytes) -> type:
        return ISCSI if len(payload) >= BHS_LEN else Packet.guess_payload_class(self, payload)

    # ------------------------------------------------------------------ reading helpers
    @property
    def text_keys(self) -> list[tuple[str, str]]:
        """key=value pairs of a Login/Text PDU's data segment (undecodable bytes as \\x)."""
        out = []
        for item in bytes(getattr(self, "data", b"") or b"").split(b"\0"):
            if item:
                k, _, v = item.decode("utf-8", "backslashreplace").partition("=")
                out.append((k, v))
        return out

    def summary_line(self) -> str:
        op = OPCODES.get(self.opcode, f"opcode 0x{self.opcode:02x}")
        parts = [op + (" (I)" if self.I else "")]
        for name in ("ITT", "TTT", "CmdSN", "StatSN", "ExpCmdSN", "DataSN", "R2TSN",
                     "BufferOffset", "DesiredDataTransferLength", "ExpectedDataTransferLength",
                     "Status", "Response", "Reason", "StatusClass", "StatusDetail", "TSIH",
                     "Function", "ReasonCode"):
            if name in self.fields_desc_names():
                value = getattr(self, name)
                if isinstance(value, int):
                    parts.append(f"{name}={value:#x}" if name in ("ITT", "TTT") else
                                 f"{name}={value}")
        if "CDB" in self.fields_desc_names():
            parts.append(f"CDB={bytes(self.CDB).rstrip(bytes(1)).hex() or '00'}")
        dsl = self.DataSegmentLength or 0
        parts.append(f"len={dsl}")
        if self.opcode in (0x03, 0x04, 0x23, 0x24) and dsl:
            parts.append(" ".join(f"{k}={v[:40]}" for k, v in self.text_keys))
        return " ".join(parts)


def _head(flag_fields: list, b23: list) -> list:  # type: ignore[type-arg]
    return ([BitField("reserved0", 0, 1), BitField("I", 0, 1),
             BitEnumField("opcode", 0, 6, OPCODES)] + flag_fields + b23
            + [ByteField("TotalAHSLength", None), X3BytesField("DataSegmentLength", None)])


def _tail() -> list:  # type: ignore[type-arg]
    return [StrLenField("AHS", b"", length_from=lambda p: (p.TotalAHSLength or 0) * 4),
            StrLenField("data", b"", length_from=lambda p: p.DataSegmentLength or 0),
            StrLenField("padding", None, length_from=lambda p: _pad(p.DataSegmentLength or 0))]


def _final() -> list:  # type: ignore[type-arg]
    return [BitField("F", 1, 1), BitField("reserved1", 0, 7)]


def _sns(*names: str) -> list:  # type: ignore[type-arg]
    return [IntField(n, 0) for n in names]


def _res(name: str, n: int) -> StrFixedLenField:
    return StrFixedLenField(name, b"\0" * n, n)


def _pdu(class_name: str, opcode: int, body: list) -> type:  # type: ignore[type-arg]
    fields = body + _tail()
    fields[2] = BitEnumField("opcode", opcode, 6, OPCODES)
    cls = type(class_name, (ISCSI,), {"name": f"iSCSI {OPCODES[opcode]}",
                                      "fields_desc": fields})
    return cls


R2 = [XShortField("reserved2", 0)]
ISCSINopOut = _pdu("ISCSINopOut", 0x00, _head(_final(), R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("TTT", 0xFFFFFFFF),
    *_sns("CmdSN", "ExpStatSN"), _res("reserved3", 16)])
ISCSICommand = _pdu("ISCSICommand", 0x01, _head(
    [BitField("F", 1, 1), BitField("R", 0, 1), BitField("W", 0, 1), BitField("reserved1", 0, 2),
     BitField("ATTR", 1, 3)], R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), IntField("ExpectedDataTransferLength", 0),
    *_sns("CmdSN", "ExpStatSN"), StrFixedLenField("CDB", b"\0" * 16, 16)])
ISCSITaskManagement = _pdu("ISCSITaskManagement", 0x02, _head(
    [BitField("F", 1, 1), BitEnumField("Function", 1, 7, TMF_FUNCTIONS)], R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("ReferencedTaskTag", 0xFFFFFFFF),
    *_sns("CmdSN", "ExpStatSN", "RefCmdSN", "ExpDataSN"), _res("reserved3", 8)])
ISCSILoginRequest = _pdu("ISCSILoginRequest", 0x03, [
    BitField("reserved0", 0, 1), BitField("I", 1, 1), BitEnumField("opcode", 0x03, 6, OPCODES),
    BitField("T", 1, 1), BitField("C", 0, 1), BitField("reserved1", 0, 2),
    BitEnumField("CSG", 1, 2, STAGES), BitEnumField("NSG", 3, 2, STAGES),
    ByteField("VersionMax", 0), ByteField("VersionMin", 0), ByteField("TotalAHSLength", None),
    X3BytesField("DataSegmentLength", None), StrFixedLenField("ISID", b"\x80" + bytes(5), 6),
    XShortField("TSIH", 0), XIntField("ITT", 0), XShortField("CID", 0),
    XShortField("reserved2", 0), *_sns("CmdSN", "ExpStatSN"), _res("reserved3", 16)])
ISCSITextRequest = _pdu("ISCSITextRequest", 0x04, _head(
    [BitField("F", 1, 1), BitField("C", 0, 1), BitField("reserved1", 0, 6)], R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("TTT", 0xFFFFFFFF),
    *_sns("CmdSN", "ExpStatSN"), _res("reserved3", 16)])
ISCSIDataOut = _pdu("ISCSIDataOut", 0x05, _head(_final(), R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("TTT", 0xFFFFFFFF),
    XIntField("reserved3", 0), IntField("ExpStatSN", 0), XIntField("reserved4", 0),
    IntField("DataSN", 0), IntField("BufferOffset", 0), XIntField("reserved5", 0)])
ISCSILogoutRequest = _pdu("ISCSILogoutRequest", 0x06, _head(
    [BitField("F", 1, 1), BitField("ReasonCode", 0, 7)], R2) + [
    _res("reserved3", 8), XIntField("ITT", 0), XShortField("CID", 0),
    XShortField("reserved4", 0), *_sns("CmdSN", "ExpStatSN"), _res("reserved5", 16)])
ISCSISnack = _pdu("ISCSISnack", 0x10, _head(
    [BitField("F", 1, 1), BitField("reserved1", 0, 3), BitField("Type", 0, 4)], R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("TTT", 0xFFFFFFFF),
    XIntField("reserved3", 0), IntField("ExpStatSN", 0), _res("reserved4", 8),
    IntField("BegRun", 0), IntField("RunLength", 0)])
ISCSINopIn = _pdu("ISCSINopIn", 0x20, _head(_final(), R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0xFFFFFFFF), XIntField("TTT", 0xFFFFFFFF),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN"), _res("reserved3", 12)])
ISCSIResponse = _pdu("ISCSIResponse", 0x21, _head(
    [BitField("F", 1, 1), BitField("reserved1", 0, 2), BitField("o", 0, 1), BitField("u", 0, 1),
     BitField("O", 0, 1), BitField("U", 0, 1), BitField("reserved2", 0, 1)],
    [XByteField("Response", 0), XByteField("Status", 0)]) + [
    _res("reserved3", 8), XIntField("ITT", 0), XIntField("SNACKTag", 0),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN", "ExpDataSN", "BidiResidualCount",
          "ResidualCount")])
ISCSITaskManagementResponse = _pdu("ISCSITaskManagementResponse", 0x22, _head(
    _final(), [ByteField("Response", 0), XByteField("reserved2", 0)]) + [
    _res("reserved3", 8), XIntField("ITT", 0), XIntField("reserved4", 0),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN"), _res("reserved5", 12)])
ISCSILoginResponse = _pdu("ISCSILoginResponse", 0x23, [
    BitField("reserved0", 0, 1), BitField("I", 0, 1), BitEnumField("opcode", 0x23, 6, OPCODES),
    BitField("T", 0, 1), BitField("C", 0, 1), BitField("reserved1", 0, 2),
    BitEnumField("CSG", 0, 2, STAGES), BitEnumField("NSG", 0, 2, STAGES),
    ByteField("VersionMax", 0), ByteField("VersionActive", 0), ByteField("TotalAHSLength", None),
    X3BytesField("DataSegmentLength", None), StrFixedLenField("ISID", bytes(6), 6),
    XShortField("TSIH", 0), XIntField("ITT", 0), XIntField("reserved2", 0),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN"), ByteField("StatusClass", 0),
    ByteField("StatusDetail", 0), _res("reserved3", 10)])
ISCSITextResponse = _pdu("ISCSITextResponse", 0x24, _head(
    [BitField("F", 1, 1), BitField("C", 0, 1), BitField("reserved1", 0, 6)], R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("TTT", 0xFFFFFFFF),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN"), _res("reserved3", 12)])
ISCSIDataIn = _pdu("ISCSIDataIn", 0x25, _head(
    [BitField("F", 0, 1), BitField("A", 0, 1), BitField("reserved1", 0, 3), BitField("O", 0, 1),
     BitField("U", 0, 1), BitField("S", 0, 1)],
    [XByteField("reserved2", 0), XByteField("Status", 0)]) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("TTT", 0xFFFFFFFF),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN", "DataSN", "BufferOffset", "ResidualCount")])
ISCSILogoutResponse = _pdu("ISCSILogoutResponse", 0x26, _head(
    _final(), [ByteField("Response", 0), XByteField("reserved2", 0)]) + [
    _res("reserved3", 8), XIntField("ITT", 0), XIntField("reserved4", 0),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN"), XIntField("reserved5", 0),
    ShortField("Time2Wait", 0), ShortField("Time2Retain", 0), XIntField("reserved6", 0)])
ISCSIR2T = _pdu("ISCSIR2T", 0x31, _head(_final(), R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0), XIntField("TTT", 0),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN", "R2TSN", "BufferOffset",
          "DesiredDataTransferLength")])
ISCSIAsyncMessage = _pdu("ISCSIAsyncMessage", 0x32, _head(_final(), R2) + [
    XLongField("LUN", 0), XIntField("ITT", 0xFFFFFFFF), XIntField("reserved3", 0),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN"), ByteField("AsyncEvent", 0),
    ByteField("AsyncVCode", 0), ShortField("Parameter1", 0), ShortField("Parameter2", 0),
    ShortField("Parameter3", 0), XIntField("reserved4", 0)])
ISCSIReject = _pdu("ISCSIReject", 0x3F, _head(
    _final(), [ByteEnumField("Reason", 0, REJECT_REASONS), XByteField("reserved2", 0)]) + [
    _res("reserved3", 8), XIntField("ITT", 0xFFFFFFFF), XIntField("reserved4", 0),
    *_sns("StatSN", "ExpCmdSN", "MaxCmdSN", "DataSN"), _res("reserved5", 8)])


class ISCSIUnknown(ISCSI):
    name = "iSCSI (unknown opcode)"
    fields_desc = [BitField("reserved0", 0, 1), BitField("I", 0, 1),
                   BitEnumField("opcode", 0x3C, 6, OPCODES), XByteField("flags", 0),
                   XShortField("b2_3", 0), ByteField("TotalAHSLength", None),
                   X3BytesField("DataSegmentLength", None),
                   StrFixedLenField("rest", b"\0" * 40, 40)] + _tail()


PDU_CLASSES: dict[int, type] = {}
for _cls in (ISCSINopOut, ISCSICommand, ISCSITaskManagement, ISCSILoginRequest,
             ISCSITextRequest, ISCSIDataOut, ISCSILogoutRequest, ISCSISnack, ISCSINopIn,
             ISCSIResponse, ISCSITaskManagementResponse, ISCSILoginResponse,
             ISCSITextResponse, ISCSIDataIn, ISCSILogoutResponse, ISCSIR2T,
             ISCSIAsyncMessage, ISCSIReject):
    PDU_CLASSES[_cls().opcode] = _cls
REQUEST_CLASSES = [PDU_CLASSES[op] for op in INITIATOR_OPCODES]

bind_layers(TCP, ISCSI, dport=ISCSI_PORT)
bind_layers(TCP, ISCSI, sport=ISCSI_PORT)


# ---------------------------------------------------------------------------------- framing
def build(pdu: Packet, header_digest: bool = False, data_digest: bool = False,
          corrupt_header_digest: bool = False, corrupt_data_digest: bool = False) -> bytes:
    """A PDU's bytes on the wire, with CRC32C digests when negotiated (RFC 7143 11.1)."""
    raw = bytes(pdu)
    header_len = BHS_LEN + raw[4] * 4
    header, rest = raw[:header_len], raw[header_len:]
    out = bytearray(header)
    if header_digest:
        out += struct.pack("<I", crc32c(header) ^ (0xFFFFFFFF if corrupt_header_digest else 0))
    out += rest
    if data_digest and rest:
        out += struct.pack("<I", crc32c(rest) ^ (0xFFFFFFFF if corrupt_data_digest else 0))
    return bytes(out)


@dataclass
class Framed:
    """One PDU cut from a stream: its layer, and whether its digests were right."""

    pdu: Packet
    raw: bytes
    header_digest_ok: bool | None = None
    data_digest_ok: bool | None = None


def split_stream(data: bytes, header_digest: bool = False, data_digest: bool = False
                 ) -> tuple[list[Framed], bytes]:
    """Complete PDUs at the front of `data`, and the bytes left over."""
    out: list[Framed] = []
    pos = 0
    while len(data) - pos >= BHS_LEN:
        ahs = data[pos + 4] * 4
        dsl = int.from_bytes(data[pos + 5:pos + 8], "big")
        hlen = BHS_LEN + ahs + (4 if header_digest else 0)
        dlen = dsl + _pad(dsl) + (4 if data_digest and dsl else 0)
        if len(data) - pos < hlen + dlen:
            break
        header = data[pos:pos + BHS_LEN + ahs]
        body = data[pos + hlen:pos + hlen + dsl + _pad(dsl)]
        hd_ok = dd_ok = None
        if header_digest:
            hd_ok = struct.unpack_from("<I", data, pos + hlen - 4)[0] == crc32c(header)
        if data_digest and dsl:
            dd_ok = struct.unpack_from("<I", data, pos + hlen + dsl + _pad(dsl))[0] == crc32c(body)
        raw = header + body
        out.append(Framed(ISCSI(raw), data[pos:pos + hlen + dlen], hd_ok, dd_ok))
        pos += hlen + dlen
    return out, data[pos:]


@dataclass
class _Direction:
    buffer: bytes = b""


@dataclass
class Dissector:
    """Both directions of one iSCSI connection; digests switch on as the login negotiated."""

    header_digest: bool = False
    data_digest: bool = False
    pending: tuple[bool, bool] | None = None
    _login: dict[str, str] = field(default_factory=dict)
    _dirs: dict[str, _Direction] = field(default_factory=dict)

    def feed(self, direction: str, data: bytes) -> Iterator[Framed]:
        d = self._dirs.setdefault(direction, _Direction())
        d.buffer += data
        while True:
            frames, d.buffer = split_stream(d.buffer, self.header_digest, self.data_digest)
            if not frames:
                return
            for i, frame in enumerate(frames):
                yield frame
                if self._learn(frame.pdu):
                    # digests start with the PDU after the final Login Response (RFC 7143 13.1)
                    rest = b"".join(f.raw for f in frames[i + 1:])
                    d.buffer = rest + d.buffer
                    break
            else:
                continue

    def _learn(self, pdu: Packet) -> bool:
        if pdu.opcode in (0x03, 0x23):
            for key, value in pdu.text_keys:
                if key in ("HeaderDigest", "DataDigest") and "," not in value:
                    self._login[key] = value
            if pdu.opcode == 0x23 and pdu.T and pdu.NSG == 3 and pdu.StatusClass == 0:
                hd = self._login.get("HeaderDigest") == "CRC32C"
                dd = self._login.get("DataDigest") == "CRC32C"
                changed = (hd, dd) != (self.header_digest, self.data_digest)
                self.header_digest, self.data_digest = hd, dd
                return changed
        return False
