"""The device server's rows of the opcode table (SPC-4, SBC-3), and the table of each kind of
logical unit joined with the rows other services contribute (the copy manager's).

The row types are in `core.table`; this module only says which SPC and SBC commands exist,
with their CDB usage data, field layout, handler and policy.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..core import sense as S
from ..core.policy import Flag, Pr
from ..core.table import (
    CONTROL,
    GROUP,
    LBA4,
    LBA8,
    LEN2,
    LEN4,
    Field,
    Handler,
    Layout,
    MaintenanceIn,
    NowHandler,
    Opcode,
    OpSpec,
    OpTable,
    PrinAction,
    ProutAction,
    SanitizeAction,
    ServiceActionIn16,
)
from ..core.table import usage as _u
from . import pr, provisioning, sanitize, sbc, spc

C = CONTROL
RW_FLAGS_READ = 0x1E  # DPO FUA RARC FUA_NV (RDPROTECT unsupported: no protection information)
RW_FLAGS_WRITE = 0x1A  # DPO FUA FUA_NV
VERIFY_FLAGS = 0x16  # DPO BYTCHK

A = Flag.UA_EXEMPT
# INQUIRY, REPORT LUNS and REQUEST SENSE: also while a sanitize operation runs (SBC-4 4.11.3)
AS = Flag.UA_EXEMPT | Flag.DURING_SANITIZE
M = Flag.MEDIUM | Flag.CONFLICTS_SPC2
W = Flag.MEDIUM | Flag.WRITES | Flag.CONFLICTS_SPC2
R2 = Flag.CONFLICTS_SPC2

PROTECT = ((1, 7, 5),)  # RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT

# Field layouts (SBC-3 5, SPC-4 6).
FUA = Field(1, 1, 0x08)
LBA_6 = Field(1, 3, 0x1FFFFF)
LBA_10 = Field(2, 4)
LBA_16 = Field(2, 8)
BLOCKS_10 = Field(7, 2)
BLOCKS_12 = Field(6, 4)
BLOCKS_16 = Field(10, 4)
ALLOC_6 = Field(4, 1)
ALLOC_10 = Field(7, 2)
ALLOC_12 = Field(6, 4)
ALLOC_16 = Field(10, 4)


def _blocks(lba: Field, length: Field, fua: bool) -> Layout:
    return Layout(lba=lba, transfer_length=length, fua=FUA if fua else None)


L6 = Layout(lba=LBA_6, transfer_length=Field(4, 1), zero_length_is_256=True)
L10 = _blocks(LBA_10, BLOCKS_10, fua=False)
L16 = _blocks(LBA_16, BLOCKS_16, fua=False)


def rw_specs(name: str, ops: tuple[int | None, int, int, int], flags_byte: int,
             handler: Handler, fl: Flag, pr: Pr, fua: bool,
             now: NowHandler | None = None) -> list[OpSpec]:
    """The 6/10/12/16-byte variants of one block command."""
    op6, op10, op12, op16 = ops
    specs = [
        OpSpec(op10, None, f"{name}(10)", _u(op10, flags_byte, LBA4, GROUP, LEN2, C), handler,
               fl, pr, fields=PROTECT, layout=_blocks(LBA_10, BLOCKS_10, fua), now=now),
        OpSpec(op12, None, f"{name}(12)", _u(op12, flags_byte, LBA4, LEN4, GROUP, C), handler,
               fl, pr, fields=PROTECT, layout=_blocks(LBA_10, BLOCKS_12, fua), now=now),
        OpSpec(op16, None, f"{name}(16)", _u(op16, flags_byte, LBA8, LEN4, GROUP, C), handler,
               fl, pr, fields=PROTECT, layout=_blocks(LBA_16, BLOCKS_16, fua), now=now),
    ]
    if op6 is not None:
        specs.append(OpSpec(op6, None, f"{name}(6)", _u(op6, 0x1F, 0xFF, 0xFF, 0xFF, C), handler,
                            fl, pr, layout=L6))
    return specs


def _prin(sa: PrinAction, name: str, handler: Handler) -> OpSpec:
    return OpSpec(Opcode.PERSISTENT_RESERVE_IN, sa, f"PERSISTENT RESERVE IN ({name})",
                  _u(Opcode.PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, LEN2, C), handler, R2,
                  Pr.PR, layout=Layout(allocation_length=ALLOC_10))


def _prout(sa: ProutAction, name: str, handler: Handler) -> OpSpec:
    return OpSpec(Opcode.PERSISTENT_RESERVE_OUT, sa, f"PERSISTENT RESERVE OUT ({name})",
                  _u(Opcode.PERSISTENT_RESERVE_OUT, sa, 0xFF, 0, 0, LEN4, C), handler, R2, Pr.PR,
                  layout=Layout(parameter_list_length=Field(5, 4)))


Op = Opcode
SBC_SPECS: list[OpSpec] = [
    OpSpec(Op.TEST_UNIT_READY, None, "TEST UNIT READY", _u(Op.TEST_UNIT_READY, 0, 0, 0, 0, C),
           spc.test_unit_ready, M),
    OpSpec(Op.REQUEST_SENSE, None, "REQUEST SENSE", _u(Op.REQUEST_SENSE, 0x01, 0, 0, 0xFF, C),
           spc.request_sense, AS, layout=Layout(allocation_length=ALLOC_6)),
    OpSpec(Op.INQUIRY, None, "INQUIRY", _u(Op.INQUIRY, 0x01, 0xFF, 0xFF, 0xFF, C), spc.inquiry, AS,
           layout=Layout(allocation_length=Field(3, 2))),
    OpSpec(Op.MODE_SELECT_6, None, "MODE SELECT(6)", _u(Op.MODE_SELECT_6, 0x11, 0, 0, 0xFF, C),
           spc.mode_select_6, R2, Pr.WRITE, layout=Layout(parameter_list_length=ALLOC_6)),
    OpSpec(Op.MODE_SELECT_10, None, "MODE SELECT(10)",
           _u(Op.MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, LEN2, C), spc.mode_select_10, R2, Pr.WRITE,
           layout=Layout(parameter_list_length=ALLOC_10)),
    OpSpec(Op.MODE_SENSE_6, None, "MODE SENSE(6)", _u(Op.MODE_SENSE_6, 0x08, 0xFF, 0xFF, 0xFF, C),
           spc.mode_sense_6, R2, Pr.READ, layout=Layout(allocation_length=ALLOC_6)),
    OpSpec(Op.MODE_SENSE_10, None, "MODE SENSE(10)",
           _u(Op.MODE_SENSE_10, 0x18, 0xFF, 0xFF, 0, 0, 0, LEN2, C), spc.mode_sense_10, R2,
           Pr.READ, layout=Layout(allocation_length=ALLOC_10)),
    OpSpec(Op.RESERVE_6, None, "RESERVE(6)", _u(Op.RESERVE_6, 0, 0, 0, 0, C), spc.reserve,
           Flag.NONE, Pr.WRITE),
    OpSpec(Op.RELEASE_6, None, "RELEASE(6)", _u(Op.RELEASE_6, 0, 0, 0, 0, C), spc.release,
           Flag.NONE, Pr.WRITE),
    OpSpec(Op.RESERVE_10, None, "RESERVE(10)", _u(Op.RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, C),
           spc.reserve, Flag.NONE, Pr.WRITE),
    OpSpec(Op.RELEASE_10, None, "RELEASE(10)", _u(Op.RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, C),
           spc.release, Flag.NONE, Pr.WRITE),
    OpSpec(Op.START_STOP_UNIT, None, "START STOP UNIT",
           _u(Op.START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, C), sbc.start_stop_unit, R2, Pr.START_STOP),
    OpSpec(Op.PREVENT_ALLOW_MEDIUM_REMOVAL, None, "PREVENT ALLOW MEDIUM REMOVAL",
           _u(Op.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0x03, C), sbc.prevent_allow_medium_removal,
           R2, Pr.PREVENT_ALLOW),
    OpSpec(Op.READ_CAPACITY_10, None, "READ CAPACITY(10)",
           _u(Op.READ_CAPACITY_10, 0, LBA4, 0, 0, 0x01, C), sbc.read_capacity_10, M,
           layout=Layout(lba=LBA_10)),
    OpSpec(Op.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16, "READ CAPACITY(16)",
           _u(Op.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16, LBA8, LEN4, 0x01, C),
           sbc.read_capacity_16, M, layout=Layout(lba=LBA_16, allocation_length=ALLOC_16)),
    OpSpec(Op.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)",
           _u(Op.SYNCHRONIZE_CACHE_10, 0x06, LBA4, GROUP, LEN2, C), sbc.synchronize_cache, M,
           Pr.WRITE, layout=L10),
    OpSpec(Op.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)",
           _u(Op.SYNCHRONIZE_CACHE_16, 0x06, LBA8, LEN4, GROUP, C), sbc.synchronize_cache, M,
           Pr.WRITE, layout=L16),
    OpSpec(Op.PRE_FETCH_10, None, "PRE-FETCH(10)", _u(Op.PRE_FETCH_10, 0x02, LBA4, GROUP, LEN2, C),
           sbc.pre_fetch, M, Pr.READ, layout=L10),
    OpSpec(Op.PRE_FETCH_16, None, "PRE-FETCH(16)", _u(Op.PRE_FETCH_16, 0x02, LBA8, LEN4, GROUP, C),
           sbc.pre_fetch, M, Pr.READ, layout=L16),
    OpSpec(Op.READ_DEFECT_DATA_10, None, "READ DEFECT DATA(10)",
           _u(Op.READ_DEFECT_DATA_10, 0, 0x1F, 0, 0, 0, 0, LEN2, C), sbc.read_defect_data_10, M,
           Pr.READ, layout=Layout(allocation_length=ALLOC_10)),
    OpSpec(Op.READ_DEFECT_DATA_12, None, "READ DEFECT DATA(12)",
           _u(Op.READ_DEFECT_DATA_12, 0x1F, LEN4, LEN4, 0, C), sbc.read_defect_data_12, M,
           Pr.READ, layout=Layout(allocation_length=ALLOC_12)),
    OpSpec(Op.REPORT_LUNS, None, "REPORT LUNS", _u(Op.REPORT_LUNS, 0, 0xFF, 0, 0, 0, LEN4, 0, C),
           spc.report_luns, AS, layout=Layout(allocation_length=ALLOC_12)),
    _prin(PrinAction.READ_KEYS, "READ KEYS", pr.read_keys),
    _prin(PrinAction.READ_RESERVATION, "READ RESERVATION", pr.read_reservation),
    _prin(PrinAction.REPORT_CAPABILITIES, "REPORT CAPABILITIES", pr.report_capabilities),
    _prin(PrinAction.READ_FULL_STATUS, "READ FULL STATUS", pr.read_full_status),
    _prout(ProutAction.REGISTER, "REGISTER", pr.register),
    _prout(ProutAction.RESERVE, "RESERVE", pr.reserve),
    _prout(ProutAction.RELEASE, "RELEASE", pr.release),
    _prout(ProutAction.CLEAR, "CLEAR", pr.clear),
    _prout(ProutAction.PREEMPT, "PREEMPT", pr.preempt),
    _prout(ProutAction.PREEMPT_AND_ABORT, "PREEMPT AND ABORT", pr.preempt_and_abort),
    _prout(ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY, "REGISTER AND IGNORE EXISTING KEY",
           pr.register_and_ignore_existing_key),
    _prout(ProutAction.REGISTER_AND_MOVE, "REGISTER AND MOVE", pr.register_and_move),
    OpSpec(Op.MAINTENANCE_IN, MaintenanceIn.REPORT_TARGET_PORT_GROUPS, "REPORT TARGET PORT GROUPS",
           _u(Op.MAINTENANCE_IN, 0xE0 | MaintenanceIn.REPORT_TARGET_PORT_GROUPS, 0, 0, 0, 0, LEN4,
              0, C), spc.report_target_port_groups, layout=Layout(allocation_length=ALLOC_12)),
    OpSpec(Op.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
           "REPORT SUPPORTED OPERATION CODES",
           _u(Op.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES, 0x87, 0xFF, 0xFF,
              0xFF, LEN4, 0, C),
           spc.report_supported_operation_codes, pr=Pr.READ,
           layout=Layout(allocation_length=ALLOC_12)),
    OpSpec(Op.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
           "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
           _u(Op.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS, 0x80, 0,
              0, 0, LEN4, 0, C), spc.report_supported_tmf, pr=Pr.READ,
           layout=Layout(allocation_length=ALLOC_12)),
    *rw_specs("READ", (Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16), RW_FLAGS_READ, sbc.read, M,
              Pr.READ, fua=True, now=sbc.read_now),
    *rw_specs("WRITE", (Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16), RW_FLAGS_WRITE,
              sbc.write, W, Pr.WRITE, fua=True, now=sbc.write_now),
    OpSpec(Op.ORWRITE, None, "ORWRITE(16)", _u(Op.ORWRITE, RW_FLAGS_WRITE, LBA8, LEN4, GROUP, C),
           sbc.orwrite, W, Pr.WRITE, fields=PROTECT,
           layout=_blocks(LBA_16, BLOCKS_16, fua=True)),
    OpSpec(Op.COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
           _u(Op.COMPARE_AND_WRITE, RW_FLAGS_WRITE, LBA8, 0, 0, 0, 0xFF, GROUP, C),
           sbc.compare_and_write, W, Pr.WRITE, fields=PROTECT,
           layout=_blocks(LBA_16, Field(13, 1), fua=True)),
    OpSpec(Op.WRITE_SAME_10, None, "WRITE SAME(10)",
           _u(Op.WRITE_SAME_10, 0x18, LBA4, GROUP, LEN2, C), provisioning.write_same, W, Pr.WRITE,
           fields=PROTECT, layout=L10),
    OpSpec(Op.WRITE_SAME_16, None, "WRITE SAME(16)",
           _u(Op.WRITE_SAME_16, 0x19, LBA8, LEN4, GROUP, C), provisioning.write_same, W, Pr.WRITE,
           fields=PROTECT, layout=L16),
    OpSpec(Op.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS, "GET LBA STATUS",
           _u(Op.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS, LBA8, LEN4, 0, C),
           provisioning.get_lba_status, M, Pr.READ,
           layout=Layout(lba=LBA_16, allocation_length=ALLOC_16)),
    *rw_specs("VERIFY", (None, Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16), VERIFY_FLAGS,
              sbc.verify, M, Pr.READ, fua=False),
    *rw_specs("WRITE AND VERIFY",
              (None, Op.WRITE_AND_VERIFY_10, Op.WRITE_AND_VERIFY_12, Op.WRITE_AND_VERIFY_16),
              VERIFY_FLAGS, sbc.write_and_verify, W, Pr.WRITE, fua=False),
]



def _sanitize(sa: SanitizeAction, name: str, flags: Flag) -> OpSpec:
    """SANITIZE (SBC-4 5.30): byte 1 holds IMMED (bit 7), AUSE (bit 5) and the service action;
    ZNR (bit 6, zoned devices only) is not honoured."""
    return OpSpec(Op.SANITIZE, sa, f"SANITIZE ({name})",
                  _u(Op.SANITIZE, 0xA0 | sa, 0, 0, 0, 0, 0, LEN2, C), sanitize.sanitize, flags,
                  Pr.WRITE, timeout=sanitize.RECOMMENDED_TIMEOUT,
                  layout=Layout(parameter_list_length=Field(7, 2)))


# CRYPTOGRAPHIC ERASE has no row: no backstore keeps its blocks under a key the device server
# could change, so the service action is rejected as unknown (INVALID FIELD IN CDB).
SANITIZE_SPECS = [
    _sanitize(SanitizeAction.OVERWRITE, "OVERWRITE", W),
    _sanitize(SanitizeAction.BLOCK_ERASE, "BLOCK ERASE", W),
    _sanitize(SanitizeAction.EXIT_FAILURE_MODE, "EXIT FAILURE MODE", M),
]

# WRITE ATOMIC(16) (SBC-4 5.48): ATOMIC BOUNDARY (bytes 10-11) is not honoured (MAXIMUM ATOMIC
# BOUNDARY SIZE 0), so a non-zero boundary is an invalid field; TRANSFER LENGTH is 2 bytes.
WRITE_ATOMIC_SPEC = OpSpec(
    Op.WRITE_ATOMIC_16, None, "WRITE ATOMIC(16)",
    _u(Op.WRITE_ATOMIC_16, 0x18, LBA8, 0, 0, LEN2, GROUP, C), sbc.write_atomic_16, W, Pr.WRITE,
    fields=PROTECT, layout=_blocks(LBA_16, Field(12, 2), fua=True))

UNMAP_SPEC = OpSpec(Op.UNMAP, None, "UNMAP", _u(Op.UNMAP, 0x01, 0, 0, 0, 0, GROUP, LEN2, C),
                    provisioning.unmap, W, Pr.WRITE,
                    layout=Layout(parameter_list_length=ALLOC_10))


def lu_table(thin: bool, services: Iterable[OpSpec] = (), compare_and_write: bool = True,
             atomic: bool = False, sanitize: bool = True) -> OpTable:
    """The table of a direct-access logical unit, with the rows of the services that serve it.

    Thin LUNs accept UNMAP; fully provisioned ones do not know the command, as a disk would not.
    A unit whose medium offers no atomic COMPARE AND WRITE of one block does not know that
    command either (MAXIMUM COMPARE AND WRITE LENGTH 0, SBC-3 6.6.3). WRITE ATOMIC(16) exists
    only where the backstore writes atomically, SANITIZE only where it is asked for.
    """
    specs = SBC_SPECS if compare_and_write else [
        s for s in SBC_SPECS if s.opcode != Op.COMPARE_AND_WRITE]
    return OpTable([*specs, *(SANITIZE_SPECS if sanitize else ()), *services,
                    *((UNMAP_SPEC,) if thin else ()), *((WRITE_ATOMIC_SPEC,) if atomic else ())])


# A LUN with no logical unit answers only these (SPC-4 4.6.4); the rest get LOGICAL UNIT NOT
# SUPPORTED from `lookup` below.
NO_LU_OPCODES = frozenset({Op.INQUIRY, Op.REQUEST_SENSE, Op.REPORT_LUNS})


class _NoLuTable(OpTable):
    def lookup(self, cdb: bytes | memoryview) -> OpSpec:
        if cdb[0] not in NO_LU_OPCODES:
            raise S.logical_unit_not_supported()
        return super().lookup(cdb)


NO_LU_TABLE = _NoLuTable([s for s in SBC_SPECS if s.opcode in NO_LU_OPCODES])
