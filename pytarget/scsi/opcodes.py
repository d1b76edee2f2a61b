"""The opcode table: one row per (operation code, service action).

A row names the command, gives its CDB usage data (which bits of each CDB byte the device server
honours, with the service action in place, exactly as REPORT SUPPORTED OPERATION CODES returns
it), its handler, and its policy flags. From the table come dispatch, the reserved-bit check
with the exact field pointer, REPORT SUPPORTED OPERATION CODES, and which commands unit
attentions, NOT READY, write protection and reservations apply to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from ..copy import commands as copy
from ..core import sense as S
from ..core.policy import Flag, Pr
from . import pr, provisioning, sbc, spc

if TYPE_CHECKING:
    from ..core.task import ScsiTask
    from .device import LogicalUnit

Handler = Callable[["LogicalUnit", "ScsiTask", bytes], Awaitable[None]]


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
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE = 0x8B
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


SA_IN_BYTE1 = 0x1F


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
    _mask: int = field(default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        usage = bytearray(self.usage)
        assert usage[0] == self.opcode, self.name
        if self.sa is not None:
            assert usage[1] & SA_IN_BYTE1 == self.sa, self.name
            usage[1] |= SA_IN_BYTE1
        usage[0] = 0xFF
        object.__setattr__(self, "_mask", int.from_bytes(usage, "big"))
        # The policy flags as plain booleans: enum.Flag arithmetic is slow on the hot path.
        object.__setattr__(self, "ua_exempt", bool(self.flags & Flag.UA_EXEMPT))
        object.__setattr__(self, "medium", bool(self.flags & Flag.MEDIUM))
        object.__setattr__(self, "writes", bool(self.flags & Flag.WRITES))
        object.__setattr__(self, "spc2", bool(self.flags & Flag.CONFLICTS_SPC2))

    @property
    def cdb_len(self) -> int:
        return len(self.usage)

    def check(self, cdb: bytes) -> None:
        """ILLEGAL REQUEST at the first bit the command does not define (SPC-4 4.5.2.4.2)."""
        if len(cdb) < self.cdb_len:
            raise S.invalid_field_in_cdb(0, None)
        value = int.from_bytes(cdb, "big")
        if not value & ~self._mask:
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

    def timeouts_descriptor(self) -> bytes:
        return bytes((0, 0x0A, 0, 0)) + (0).to_bytes(4, "big") + self.timeout.to_bytes(4, "big")


class OpTable:
    def __init__(self, specs: Iterable[OpSpec]) -> None:
        self.specs = sorted(specs, key=lambda s: (s.opcode, s.sa or 0))
        self._plain: dict[int, OpSpec] = {}
        self._by_sa: dict[int, dict[int, OpSpec]] = {}
        for spec in self.specs:
            if spec.sa is None:
                assert spec.opcode not in self._plain and spec.opcode not in self._by_sa
                self._plain[spec.opcode] = spec
            else:
                assert spec.opcode not in self._plain
                self._by_sa.setdefault(spec.opcode, {})[spec.sa] = spec

    def lookup(self, cdb: bytes | memoryview) -> OpSpec:
        opcode = cdb[0]
        spec = self._plain.get(opcode)
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
            return self._plain.get(opcode)
        return self._by_sa.get(opcode, {}).get(sa)

    def has_service_actions(self, opcode: int) -> bool:
        return opcode in self._by_sa

    def known_opcode(self, opcode: int) -> bool:
        return opcode in self._plain or opcode in self._by_sa

    def extended(self, specs: Iterable[OpSpec]) -> OpTable:
        return OpTable([*self.specs, *specs])


# CDB usage masks. Last byte: CONTROL (NACA unsupported, so no bit is honoured).
C = 0x00
RW_FLAGS_READ = 0x1E  # DPO FUA RARC FUA_NV (RDPROTECT unsupported: no protection information)
RW_FLAGS_WRITE = 0x1A  # DPO FUA FUA_NV
VERIFY_FLAGS = 0x16  # DPO BYTCHK
GROUP = 0x1F
LBA4 = (0xFF,) * 4
LBA8 = (0xFF,) * 8
LEN2 = (0xFF,) * 2
LEN4 = (0xFF,) * 4

A = Flag.UA_EXEMPT
M = Flag.MEDIUM | Flag.CONFLICTS_SPC2
W = Flag.MEDIUM | Flag.WRITES | Flag.CONFLICTS_SPC2
R2 = Flag.CONFLICTS_SPC2


def _u(*parts: int | tuple[int, ...]) -> bytes:
    out = bytearray()
    for p in parts:
        out += bytes(p) if isinstance(p, tuple) else bytes((p,))
    return bytes(out)


PROTECT = ((1, 7, 5),)  # RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT


def rw_specs(name: str, ops: tuple[int | None, int, int, int], flags_byte: int,
             handler: Handler, fl: Flag, pr: Pr) -> list[OpSpec]:
    """The 6/10/12/16-byte variants of one block command."""
    op6, op10, op12, op16 = ops
    specs = [
        OpSpec(op10, None, f"{name}(10)", _u(op10, flags_byte, LBA4, GROUP, LEN2, C), handler,
               fl, pr, fields=PROTECT),
        OpSpec(op12, None, f"{name}(12)", _u(op12, flags_byte, LBA4, LEN4, GROUP, C), handler,
               fl, pr, fields=PROTECT),
        OpSpec(op16, None, f"{name}(16)", _u(op16, flags_byte, LBA8, LEN4, GROUP, C), handler,
               fl, pr, fields=PROTECT),
    ]
    if op6 is not None:
        specs.append(OpSpec(op6, None, f"{name}(6)", _u(op6, 0x1F, 0xFF, 0xFF, 0xFF, C), handler, fl, pr))
    return specs


O = Opcode
SBC_SPECS: list[OpSpec] = [
    OpSpec(O.TEST_UNIT_READY, None, "TEST UNIT READY", _u(O.TEST_UNIT_READY, 0, 0, 0, 0, C),
           spc.test_unit_ready, M),
    OpSpec(O.REQUEST_SENSE, None, "REQUEST SENSE", _u(O.REQUEST_SENSE, 0x01, 0, 0, 0xFF, C),
           spc.request_sense, A),
    OpSpec(O.INQUIRY, None, "INQUIRY", _u(O.INQUIRY, 0x01, 0xFF, 0xFF, 0xFF, C), spc.inquiry, A),
    OpSpec(O.MODE_SELECT_6, None, "MODE SELECT(6)", _u(O.MODE_SELECT_6, 0x11, 0, 0, 0xFF, C),
           spc.mode_select, R2, Pr.WRITE),
    OpSpec(O.MODE_SELECT_10, None, "MODE SELECT(10)",
           _u(O.MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, LEN2, C), spc.mode_select, R2, Pr.WRITE),
    OpSpec(O.MODE_SENSE_6, None, "MODE SENSE(6)", _u(O.MODE_SENSE_6, 0x08, 0xFF, 0xFF, 0xFF, C),
           spc.mode_sense, R2, Pr.READ),
    OpSpec(O.MODE_SENSE_10, None, "MODE SENSE(10)",
           _u(O.MODE_SENSE_10, 0x18, 0xFF, 0xFF, 0, 0, 0, LEN2, C), spc.mode_sense, R2, Pr.READ),
    OpSpec(O.RESERVE_6, None, "RESERVE(6)", _u(O.RESERVE_6, 0, 0, 0, 0, C), spc.reserve,
           Flag.NONE, Pr.WRITE),
    OpSpec(O.RELEASE_6, None, "RELEASE(6)", _u(O.RELEASE_6, 0, 0, 0, 0, C), spc.release,
           Flag.NONE, Pr.WRITE),
    OpSpec(O.RESERVE_10, None, "RESERVE(10)", _u(O.RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, C),
           spc.reserve, Flag.NONE, Pr.WRITE),
    OpSpec(O.RELEASE_10, None, "RELEASE(10)", _u(O.RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, C),
           spc.release, Flag.NONE, Pr.WRITE),
    OpSpec(O.START_STOP_UNIT, None, "START STOP UNIT",
           _u(O.START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, C), sbc.start_stop_unit, R2, Pr.START_STOP),
    OpSpec(O.PREVENT_ALLOW_MEDIUM_REMOVAL, None, "PREVENT ALLOW MEDIUM REMOVAL",
           _u(O.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0x03, C), sbc.prevent_allow_medium_removal,
           R2, Pr.PREVENT_ALLOW),
    OpSpec(O.READ_CAPACITY_10, None, "READ CAPACITY(10)",
           _u(O.READ_CAPACITY_10, 0, LBA4, 0, 0, 0x01, C), sbc.read_capacity_10, M),
    OpSpec(O.SERVICE_ACTION_IN_16, 0x10, "READ CAPACITY(16)",
           _u(O.SERVICE_ACTION_IN_16, 0x10, LBA8, LEN4, 0x01, C), sbc.read_capacity_16, M),
    OpSpec(O.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)",
           _u(O.SYNCHRONIZE_CACHE_10, 0x06, LBA4, GROUP, LEN2, C), sbc.synchronize_cache, M,
           Pr.WRITE),
    OpSpec(O.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)",
           _u(O.SYNCHRONIZE_CACHE_16, 0x06, LBA8, LEN4, GROUP, C), sbc.synchronize_cache, M,
           Pr.WRITE),
    OpSpec(O.PRE_FETCH_10, None, "PRE-FETCH(10)", _u(O.PRE_FETCH_10, 0x02, LBA4, GROUP, LEN2, C),
           sbc.pre_fetch, M, Pr.READ),
    OpSpec(O.PRE_FETCH_16, None, "PRE-FETCH(16)", _u(O.PRE_FETCH_16, 0x02, LBA8, LEN4, GROUP, C),
           sbc.pre_fetch, M, Pr.READ),
    OpSpec(O.READ_DEFECT_DATA_10, None, "READ DEFECT DATA(10)",
           _u(O.READ_DEFECT_DATA_10, 0, 0x1F, 0, 0, 0, 0, LEN2, C), sbc.read_defect_data, M,
           Pr.READ),
    OpSpec(O.READ_DEFECT_DATA_12, None, "READ DEFECT DATA(12)",
           _u(O.READ_DEFECT_DATA_12, 0x1F, LEN4, LEN4, 0, C), sbc.read_defect_data, M, Pr.READ),
    OpSpec(O.REPORT_LUNS, None, "REPORT LUNS", _u(O.REPORT_LUNS, 0, 0xFF, 0, 0, 0, LEN4, 0, C),
           spc.report_luns, A),
    OpSpec(O.PERSISTENT_RESERVE_IN, 0x00, "PERSISTENT RESERVE IN (READ KEYS)",
           _u(O.PERSISTENT_RESERVE_IN, 0x00, 0, 0, 0, 0, 0, LEN2, C), pr.persistent_reserve_in,
           R2, Pr.PR),
    OpSpec(O.PERSISTENT_RESERVE_IN, 0x01, "PERSISTENT RESERVE IN (READ RESERVATION)",
           _u(O.PERSISTENT_RESERVE_IN, 0x01, 0, 0, 0, 0, 0, LEN2, C), pr.persistent_reserve_in,
           R2, Pr.PR),
    OpSpec(O.PERSISTENT_RESERVE_IN, 0x02, "PERSISTENT RESERVE IN (REPORT CAPABILITIES)",
           _u(O.PERSISTENT_RESERVE_IN, 0x02, 0, 0, 0, 0, 0, LEN2, C), pr.persistent_reserve_in,
           R2, Pr.PR),
    OpSpec(O.PERSISTENT_RESERVE_IN, 0x03, "PERSISTENT RESERVE IN (READ FULL STATUS)",
           _u(O.PERSISTENT_RESERVE_IN, 0x03, 0, 0, 0, 0, 0, LEN2, C), pr.persistent_reserve_in,
           R2, Pr.PR),
    *[OpSpec(O.PERSISTENT_RESERVE_OUT, sa, f"PERSISTENT RESERVE OUT ({name})",
             _u(O.PERSISTENT_RESERVE_OUT, sa, 0xFF, 0, 0, LEN4, C), pr.persistent_reserve_out,
             R2, Pr.PR)
      for sa, name in ((0, "REGISTER"), (1, "RESERVE"), (2, "RELEASE"), (3, "CLEAR"),
                       (4, "PREEMPT"), (5, "PREEMPT AND ABORT"),
                       (6, "REGISTER AND IGNORE EXISTING KEY"), (7, "REGISTER AND MOVE"))],
    OpSpec(O.MAINTENANCE_IN, 0x0A, "REPORT TARGET PORT GROUPS",
           _u(O.MAINTENANCE_IN, 0xEA, 0, 0, 0, 0, LEN4, 0, C), spc.report_target_port_groups),
    OpSpec(O.MAINTENANCE_IN, 0x0C, "REPORT SUPPORTED OPERATION CODES",
           _u(O.MAINTENANCE_IN, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, LEN4, 0, C),
           spc.report_supported_operation_codes, pr=Pr.READ),
    OpSpec(O.MAINTENANCE_IN, 0x0D, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
           _u(O.MAINTENANCE_IN, 0x0D, 0x80, 0, 0, 0, LEN4, 0, C), spc.report_supported_tmf,
           pr=Pr.READ),
    *rw_specs("READ", (O.READ_6, O.READ_10, O.READ_12, O.READ_16), RW_FLAGS_READ, sbc.read, M,
              Pr.READ),
    *rw_specs("WRITE", (O.WRITE_6, O.WRITE_10, O.WRITE_12, O.WRITE_16), RW_FLAGS_WRITE,
              sbc.write, W, Pr.WRITE),
    OpSpec(O.ORWRITE, None, "ORWRITE(16)", _u(O.ORWRITE, RW_FLAGS_WRITE, LBA8, LEN4, GROUP, C),
           sbc.orwrite, W, Pr.WRITE, fields=PROTECT),
    OpSpec(O.COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
           _u(O.COMPARE_AND_WRITE, RW_FLAGS_WRITE, LBA8, 0, 0, 0, 0xFF, GROUP, C),
           sbc.compare_and_write, W, Pr.WRITE, fields=PROTECT),
    OpSpec(O.WRITE_SAME_10, None, "WRITE SAME(10)",
           _u(O.WRITE_SAME_10, 0x18, LBA4, GROUP, LEN2, C), provisioning.write_same, W, Pr.WRITE,
           fields=PROTECT),
    OpSpec(O.WRITE_SAME_16, None, "WRITE SAME(16)",
           _u(O.WRITE_SAME_16, 0x19, LBA8, LEN4, GROUP, C), provisioning.write_same, W, Pr.WRITE,
           fields=PROTECT),
    OpSpec(O.SERVICE_ACTION_IN_16, 0x12, "GET LBA STATUS",
           _u(O.SERVICE_ACTION_IN_16, 0x12, LBA8, LEN4, 0, C), provisioning.get_lba_status, M,
           Pr.READ),
    *rw_specs("VERIFY", (None, O.VERIFY_10, O.VERIFY_12, O.VERIFY_16), VERIFY_FLAGS,
              sbc.verify, M, Pr.READ),
    *rw_specs("WRITE AND VERIFY",
              (None, O.WRITE_AND_VERIFY_10, O.WRITE_AND_VERIFY_12, O.WRITE_AND_VERIFY_16),
              VERIFY_FLAGS, sbc.write_and_verify, W, Pr.WRITE),
]

UNMAP_SPEC = OpSpec(O.UNMAP, None, "UNMAP", _u(O.UNMAP, 0x01, 0, 0, 0, 0, GROUP, LEN2, C),
                    provisioning.unmap, W, Pr.WRITE)

# Third-party copy (SPC-4 6.3, 6.4, 6.18; SBC-3 5.10, 5.22, 5.46). Sub-commands apply the
# reservation policy on each copy source and destination; the copy manager's own unit only
# conflicts like the command's own effect (POPULATE TOKEN reads, WRITE USING TOKEN writes).
_LIST_ID4 = LEN4
COPY_SPECS: list[OpSpec] = [
    OpSpec(O.EXTENDED_COPY, 0x00, "EXTENDED COPY(LID1)",
           _u(O.EXTENDED_COPY, 0x00, (0,) * 8, LEN4, 0, C), copy.extended_copy, R2),
    OpSpec(O.EXTENDED_COPY, 0x01, "EXTENDED COPY(LID4)",
           _u(O.EXTENDED_COPY, 0x01, (0,) * 8, LEN4, 0, C), copy.extended_copy, R2),
    OpSpec(O.EXTENDED_COPY, 0x10, "POPULATE TOKEN",
           _u(O.EXTENDED_COPY, 0x10, (0,) * 4, _LIST_ID4, LEN4, GROUP, C), copy.populate_token,
           M, Pr.READ),
    OpSpec(O.EXTENDED_COPY, 0x11, "WRITE USING TOKEN",
           _u(O.EXTENDED_COPY, 0x11, (0,) * 4, _LIST_ID4, LEN4, GROUP, C),
           copy.write_using_token, W, Pr.WRITE),
    OpSpec(O.EXTENDED_COPY, 0x1C, "COPY OPERATION ABORT",
           _u(O.EXTENDED_COPY, 0x1C, _LIST_ID4, (0,) * 9, C), copy.copy_operation_abort, R2),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x00, "RECEIVE COPY STATUS(LID1)",
           _u(O.RECEIVE_COPY_RESULTS, 0x00, 0xFF, (0,) * 7, LEN4, 0, C),
           copy.receive_copy_status_lid1, R2, Pr.READ),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x01, "RECEIVE COPY DATA(LID1)",
           _u(O.RECEIVE_COPY_RESULTS, 0x01, 0xFF, (0,) * 7, LEN4, 0, C), copy.receive_copy_data,
           R2, Pr.READ),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x03, "RECEIVE COPY OPERATING PARAMETERS",
           _u(O.RECEIVE_COPY_RESULTS, 0x03, (0,) * 8, LEN4, 0, C),
           copy.receive_copy_operating_parameters, R2, Pr.READ),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x04, "RECEIVE COPY FAILURE DETAILS(LID1)",
           _u(O.RECEIVE_COPY_RESULTS, 0x04, 0xFF, (0,) * 7, LEN4, 0, C),
           copy.receive_copy_failure_details, R2, Pr.READ),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x05, "RECEIVE COPY STATUS(LID4)",
           _u(O.RECEIVE_COPY_RESULTS, 0x05, _LIST_ID4, (0,) * 4, LEN4, 0, C),
           copy.receive_copy_status_lid4, R2, Pr.READ),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x06, "RECEIVE COPY DATA(LID4)",
           _u(O.RECEIVE_COPY_RESULTS, 0x06, _LIST_ID4, (0,) * 4, LEN4, 0, C),
           copy.receive_copy_data, R2, Pr.READ),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x07, "RECEIVE ROD TOKEN INFORMATION",
           _u(O.RECEIVE_COPY_RESULTS, 0x07, _LIST_ID4, (0,) * 4, LEN4, 0, C),
           copy.receive_rod_token_information, R2, Pr.READ),
    OpSpec(O.RECEIVE_COPY_RESULTS, 0x08, "REPORT ALL ROD TOKENS",
           _u(O.RECEIVE_COPY_RESULTS, 0x08, (0,) * 8, LEN4, 0, C), copy.report_all_rod_tokens,
           R2, Pr.READ),
]

# Thin LUNs accept UNMAP; fully provisioned ones do not know the command, as a disk would not.
SBC_TABLE = OpTable([*SBC_SPECS, *COPY_SPECS, UNMAP_SPEC])
SBC_THICK_TABLE = OpTable([*SBC_SPECS, *COPY_SPECS])

# A LUN with no logical unit answers only these (SPC-4 4.6.4); the rest get LOGICAL UNIT NOT
# SUPPORTED from `lookup` below.
NO_LU_OPCODES = frozenset({O.INQUIRY, O.REQUEST_SENSE, O.REPORT_LUNS})


class _NoLuTable(OpTable):
    def lookup(self, cdb: bytes | memoryview) -> OpSpec:
        if cdb[0] not in NO_LU_OPCODES:
            raise S.logical_unit_not_supported()
        return super().lookup(cdb)


NO_LU_TABLE = _NoLuTable([s for s in SBC_SPECS if s.opcode in NO_LU_OPCODES])

