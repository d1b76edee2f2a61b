"""The opcode table's types: one row per (operation code, service action).

A row (`OpSpec`) names the command, gives its CDB usage data (which bits of each CDB byte the
device server honours, with the service action in place, exactly as REPORT SUPPORTED OPERATION
CODES returns it), where its fields sit (`Layout`), its handler and its policy flags. From the
rows come dispatch, the reserved-bit check with the exact field pointer, REPORT SUPPORTED
OPERATION CODES, and which commands unit attentions, NOT READY, write protection and
reservations apply to.

The device server contributes the SPC/SBC rows and the copy manager the third-party copy rows;
every operation code and service action number is named here, once.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

from . import sense as S
from .policy import Flag, Pr

if TYPE_CHECKING:
    from .task import ScsiTask


class Opcode(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    SANITIZE = 0x48
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    EXTENDED_COPY = 0x83  # THIRD-PARTY COPY OUT
    RECEIVE_COPY_RESULTS = 0x84  # THIRD-PARTY COPY IN
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE = 0x8B
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


class ServiceActionIn16(IntEnum):
    """Service actions of SERVICE ACTION IN(16) (SBC-3 5.15, 5.16)."""

    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class SanitizeAction(IntEnum):
    """Service actions of SANITIZE (SBC-4 5.30, table 103)."""

    OVERWRITE = 0x01
    BLOCK_ERASE = 0x02
    CRYPTOGRAPHIC_ERASE = 0x03
    EXIT_FAILURE_MODE = 0x1F


class MaintenanceIn(IntEnum):
    """Service actions of MAINTENANCE IN (SPC-4 6.35-6.37)."""

    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C
    REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS = 0x0D


class PrinAction(IntEnum):
    """Service actions of PERSISTENT RESERVE IN (SPC-4 6.15.1)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class ProutAction(IntEnum):
    """Service actions of PERSISTENT RESERVE OUT (SPC-4 6.16.1)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


class ThirdPartyCopyOut(IntEnum):
    """Service actions of operation code 83h (SPC-4 table 95; SBC-3 5.10, 5.46)."""

    EXTENDED_COPY_LID1 = 0x00
    EXTENDED_COPY_LID4 = 0x01
    POPULATE_TOKEN = 0x10
    WRITE_USING_TOKEN = 0x11
    COPY_OPERATION_ABORT = 0x1C


class ThirdPartyCopyIn(IntEnum):
    """Service actions of operation code 84h (SPC-4 table 96; SBC-3 5.22)."""

    COPY_STATUS_LID1 = 0x00
    COPY_DATA_LID1 = 0x01
    OPERATING_PARAMETERS = 0x03
    FAILURE_DETAILS_LID1 = 0x04
    COPY_STATUS_LID4 = 0x05
    COPY_DATA_LID4 = 0x06
    ROD_TOKEN_INFORMATION = 0x07
    REPORT_ALL_ROD_TOKENS = 0x08


SA_IN_BYTE1 = 0x1F

# CDB usage data building blocks (SPC-4 6.35.3 CDB USAGE DATA). Last byte: CONTROL (NACA
# unsupported, so no bit is honoured).
CONTROL = 0x00
GROUP = 0x1F  # GROUP NUMBER
LBA4 = (0xFF,) * 4
LBA8 = (0xFF,) * 8
LEN2 = (0xFF,) * 2
LEN4 = (0xFF,) * 4


def usage(*parts: int | tuple[int, ...]) -> bytes:
    """CDB usage data from bytes and runs of bytes."""
    out = bytearray()
    for p in parts:
        out += bytes(p) if isinstance(p, tuple) else bytes((p,))
    return bytes(out)


_STRUCTS = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I"),
            8: struct.Struct(">Q")}


@dataclass(frozen=True)
class Field:
    """A CDB field: `width` bytes big-endian from byte `offset`, under `mask`."""

    offset: int
    width: int
    mask: int = -1
    # `read` made for this field once: commands read their fields on the hot path.
    read: Callable[[bytes], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "read", _reader(self.offset, self.width, self.mask))


def _reader(offset: int, width: int, mask: int) -> Callable[[bytes], int]:
    fmt = _STRUCTS.get(width)
    if fmt is not None and mask == -1:
        unpack = fmt.unpack_from
        return lambda cdb: unpack(cdb, offset)[0]
    if width == 1:
        return lambda cdb: cdb[offset] & mask
    end = offset + width
    return lambda cdb: int.from_bytes(cdb[offset:end], "big") & mask


@dataclass(frozen=True)
class Layout:
    """Where a row's named CDB fields are; absent fields are None."""

    lba: Field | None = None
    transfer_length: Field | None = None
    allocation_length: Field | None = None
    parameter_list_length: Field | None = None
    list_identifier: Field | None = None
    fua: Field | None = None
    # READ(6), WRITE(6): TRANSFER LENGTH 0 means 256 blocks (SBC-3 5.13, 5.32)
    zero_length_is_256: bool = False


NO_FIELDS = Layout()


class Cdb(bytes):
    """A CDB that passed its row's check, with the row; its named fields are read through the
    row's layout. Each row has its own subclass (`OpSpec.parse`) whose properties read the
    fields the row has; reading a field the row does not have is a programming error."""

    __slots__ = ()
    spec: ClassVar[OpSpec]

    def _absent(self, name: str) -> int:
        raise TypeError(f"{self.spec.name} has no {name} field")

    @property
    def lba(self) -> int:
        return self._absent("LOGICAL BLOCK ADDRESS")

    @property
    def transfer_length(self) -> int:
        return self._absent("TRANSFER LENGTH")

    @property
    def allocation_length(self) -> int:
        return self._absent("ALLOCATION LENGTH")

    @property
    def parameter_list_length(self) -> int:
        return self._absent("PARAMETER LIST LENGTH")

    @property
    def list_identifier(self) -> int:
        return self._absent("LIST IDENTIFIER")

    @property
    def fua(self) -> bool:
        return False

    @property
    def extent(self) -> tuple[int, int]:
        """(LOGICAL BLOCK ADDRESS, TRANSFER LENGTH), read together where the row allows."""
        return self.lba, self.transfer_length

    def offset_of(self, name: str) -> int:
        """Byte offset of a layout field, for a field pointer."""
        f = getattr(self.spec.layout, name)
        assert isinstance(f, Field), (self.spec.name, name)
        return f.offset


def extent_struct(layout: Layout) -> struct.Struct | None:
    """One unpack of (LOGICAL BLOCK ADDRESS, TRANSFER LENGTH) where both are whole big-endian
    integers, the address first and 0 meaning no blocks; else None."""
    lba, length = layout.lba, layout.transfer_length
    if lba is None or length is None or lba.mask != -1 or length.mask != -1 \
            or layout.zero_length_is_256 or lba.offset + lba.width > length.offset \
            or lba.width not in _STRUCTS or length.width not in _STRUCTS:
        return None
    return struct.Struct(f">{lba.offset}x{_STRUCTS[lba.width].format[1:]}"
                         f"{length.offset - lba.offset - lba.width}x"
                         f"{_STRUCTS[length.width].format[1:]}")


def _cdb_class(spec: OpSpec) -> type[Cdb]:
    """The CDB type of one row: its fields' properties call their readers directly."""
    layout = spec.layout
    namespace: dict[str, Any] = {"__slots__": (), "spec": spec}
    for name in ("lba", "allocation_length", "parameter_list_length", "list_identifier"):
        f = getattr(layout, name)
        if f is not None:
            namespace[name] = property(f.read)
    length = layout.transfer_length
    if length is not None:
        read = length.read
        namespace["transfer_length"] = property(
            (lambda cdb: read(cdb) or 256) if layout.zero_length_is_256 else read)
        both = extent_struct(layout)
        if both is not None:
            namespace["extent"] = property(both.unpack_from)
    fua_field = layout.fua
    if fua_field is not None:
        if fua_field.width == 1:
            at, bit = fua_field.offset, fua_field.mask
            namespace["fua"] = property(lambda cdb: cdb[at] & bit != 0)
        else:
            fua = fua_field.read
            namespace["fua"] = property(lambda cdb: bool(fua(cdb)))
    return type("Cdb", (Cdb,), namespace)


# A handler runs one command on a logical unit: (logical unit, task, CDB). The unit is the
# device server's; each side types it with the interface it needs.
Handler = Callable[[Any, "ScsiTask", Cdb], Awaitable[None]]
# A handler's synchronous form, for the common case of a block command: it reads the CDB's
# fields through the row's precomputed readers (`OpSpec.extent`, `fua_byte`, `fua_bit`), with
# no `Cdb` made, and either completes the command without waiting (True) or declines, having
# changed nothing (False): the coroutine handler then runs, and reports any error.
NowHandler = Callable[[Any, "ScsiTask", "OpSpec"], bool]


@dataclass(frozen=True)
class OpSpec:
    opcode: int
    sa: int | None
    name: str
    usage: bytes
    handler: Handler
    flags: Flag = Flag.CONFLICTS_SPC2
    pr: Pr = Pr.ALLOWED
    timeout: int = 30  # RECOMMENDED COMMAND TIMEOUT, seconds (SPC-4 6.35.4)
    fields: tuple[tuple[int, int, int], ...] = ()  # multi-bit fields: (byte, msb, lsb)
    layout: Layout = NO_FIELDS
    now: NowHandler | None = None  # the handler's synchronous form, where it has one
    _mask: int = field(default=0, repr=False, compare=False)
    # The policy flags as plain booleans: enum.Flag arithmetic is slow on the hot path.
    ua_exempt: bool = field(init=False, default=False, repr=False, compare=False)
    medium: bool = field(init=False, default=False, repr=False, compare=False)
    writes: bool = field(init=False, default=False, repr=False, compare=False)
    spc2: bool = field(init=False, default=False, repr=False, compare=False)
    during_sanitize: bool = field(init=False, default=False, repr=False, compare=False)
    _cdb: type[Cdb] = field(init=False, default=Cdb, repr=False, compare=False)
    cdb_len: int = field(init=False, default=0, repr=False, compare=False)  # len(usage)
    # The bits of the CDB (as one big-endian integer) the row does not define: `check` fails
    # when any is set.
    reserved: int = field(init=False, default=0, repr=False, compare=False)
    # For `now`: (LBA, TRANSFER LENGTH) in one unpack, and where FUA is (byte, bit mask).
    extent: struct.Struct | None = field(init=False, default=None, repr=False, compare=False)
    fua_byte: int = field(init=False, default=0, repr=False, compare=False)
    fua_bit: int = field(init=False, default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        usage = bytearray(self.usage)
        assert usage[0] == self.opcode, self.name
        if self.sa is not None:
            assert usage[1] & SA_IN_BYTE1 == self.sa, self.name
            usage[1] |= SA_IN_BYTE1
        usage[0] = 0xFF
        object.__setattr__(self, "_mask", int.from_bytes(usage, "big"))
        object.__setattr__(self, "ua_exempt", bool(self.flags & Flag.UA_EXEMPT))
        object.__setattr__(self, "medium", bool(self.flags & Flag.MEDIUM))
        object.__setattr__(self, "writes", bool(self.flags & Flag.WRITES))
        object.__setattr__(self, "spc2", bool(self.flags & Flag.CONFLICTS_SPC2))
        object.__setattr__(self, "during_sanitize", bool(self.flags & Flag.DURING_SANITIZE))
        object.__setattr__(self, "_cdb", _cdb_class(self))
        object.__setattr__(self, "cdb_len", len(self.usage))
        width = 8 * len(self.usage)
        object.__setattr__(self, "reserved", ~self._mask & ((1 << width) - 1))
        object.__setattr__(self, "extent", extent_struct(self.layout))
        fua = self.layout.fua
        if fua is not None and fua.width == 1:
            object.__setattr__(self, "fua_byte", fua.offset)
            object.__setattr__(self, "fua_bit", fua.mask)
        assert self.now is None or self.extent is not None, self.name

    def check(self, cdb: bytes) -> None:
        """ILLEGAL REQUEST at the first bit the command does not define (SPC-4 4.5.2.4.2)."""
        if len(cdb) < self.cdb_len:
            raise S.invalid_field_in_cdb(0, None)
        if not int.from_bytes(cdb, "big") & self.reserved:
            return
        n = self.cdb_len
        for i in range(1, n):
            allowed = (self._mask >> (8 * (n - 1 - i))) & 0xFF
            bad = cdb[i] & ~allowed
            if bad:
                bit = bad.bit_length() - 1
                for byte, msb, lsb in self.fields:
                    if byte == i and lsb <= bit <= msb:
                        bit = msb  # point at the most significant bit of the field
                raise S.invalid_field_in_cdb(i, bit)

    def parse(self, raw: bytes | bytearray | memoryview) -> Cdb:
        """The row's CDB out of the command's CDB bytes, checked."""
        cdb = self._cdb(raw[:self.cdb_len])
        self.check(cdb)
        return cdb

    def timeouts_descriptor(self) -> bytes:
        return bytes((0, 0x0A, 0, 0)) + (0).to_bytes(4, "big") + self.timeout.to_bytes(4, "big")


class OpTable:
    def __init__(self, specs: Iterable[OpSpec]) -> None:
        self.specs = sorted(specs, key=lambda s: (s.opcode, s.sa or 0))
        self.plain: dict[int, OpSpec] = {}  # operation codes without service actions
        self._by_sa: dict[int, dict[int, OpSpec]] = {}
        for spec in self.specs:
            if spec.sa is None:
                assert spec.opcode not in self.plain and spec.opcode not in self._by_sa
                self.plain[spec.opcode] = spec
            else:
                assert spec.opcode not in self.plain
                actions = self._by_sa.setdefault(spec.opcode, {})
                assert spec.sa not in actions, spec.name
                actions[spec.sa] = spec

    def lookup(self, cdb: bytes | memoryview) -> OpSpec:
        opcode = cdb[0]
        spec = self.plain.get(opcode)
        if spec is not None:
            return spec
        actions = self._by_sa.get(opcode)
        if actions is None:
            raise S.invalid_opcode()
        spec = actions.get(cdb[1] & SA_IN_BYTE1)
        if spec is None:
            raise S.invalid_service_action(1, 4)
        return spec

    def get(self, opcode: int, sa: int | None) -> OpSpec | None:
        if sa is None:
            return self.plain.get(opcode)
        return self._by_sa.get(opcode, {}).get(sa)

    def has_service_actions(self, opcode: int) -> bool:
        return opcode in self._by_sa

    def known_opcode(self, opcode: int) -> bool:
        return opcode in self.plain or opcode in self._by_sa

    def extended(self, specs: Iterable[OpSpec]) -> OpTable:
        return OpTable([*self.specs, *specs])
