"""SCSI status, sense keys, additional sense codes, and the one exception that carries them.

Every SCSI failure below the device server is raised as `SenseError`, built by a named
constructor (`invalid_field_in_cdb(byte, bit)`, `lba_out_of_range()`, ...). The device server
catches it in one place and encodes it as fixed or descriptor format sense (SPC-4 4.5).
"""

from __future__ import annotations

import struct
from enum import IntEnum


class Status(IntEnum):
    """SAM-5 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class Asc(IntEnum):
    """Additional sense code and qualifier as ASC << 8 | ASCQ (SPC-4 table D.1)."""

    NO_ADDITIONAL_SENSE = 0x0000
    OPERATION_IN_PROGRESS = 0x0016
    LUN_NOT_READY = 0x0400
    LUN_NOT_READY_INITIALIZING_COMMAND_REQUIRED = 0x0402
    LUN_NOT_READY_MANUAL_INTERVENTION_REQUIRED = 0x0403
    LUN_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION = 0x040A
    LUN_NOT_ACCESSIBLE_TARGET_PORT_UNAVAILABLE = 0x040C
    LUN_NOT_READY_SANITIZE_IN_PROGRESS = 0x041B
    LUN_COMMUNICATION_FAILURE = 0x0800
    WRITE_ERROR = 0x0C00
    THIRD_PARTY_DEVICE_FAILURE = 0x0D01
    COPY_TARGET_DEVICE_NOT_REACHABLE = 0x0D02
    INCORRECT_COPY_TARGET_DEVICE_TYPE = 0x0D03
    COPY_TARGET_DEVICE_DATA_UNDERRUN = 0x0D04
    COPY_TARGET_DEVICE_DATA_OVERRUN = 0x0D05
    UNRECOVERED_READ_ERROR = 0x1100
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    MISCOMPARE_DURING_VERIFY = 0x1D00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_TOKEN_OPERATION_CAUSE_NOT_REPORTABLE = 0x2300
    INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE = 0x2301
    INVALID_TOKEN_OPERATION_REMOTE_TOKEN_USAGE_NOT_SUPPORTED = 0x2302
    INVALID_TOKEN_OPERATION_REMOTE_ROD_TOKEN_CREATION_NOT_SUPPORTED = 0x2303
    INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN = 0x2304
    INVALID_TOKEN_OPERATION_TOKEN_CORRUPT = 0x2305
    INVALID_TOKEN_OPERATION_TOKEN_REVOKED = 0x2306
    INVALID_TOKEN_OPERATION_TOKEN_EXPIRED = 0x2307
    INVALID_TOKEN_OPERATION_TOKEN_CANCELLED = 0x2308
    INVALID_TOKEN_OPERATION_TOKEN_DELETED = 0x2309
    INVALID_TOKEN_OPERATION_INVALID_TOKEN_LENGTH = 0x230A
    INVALID_FIELD_IN_CDB = 0x2400
    INVALID_FIELD_IN_INFORMATION_UNIT = 0x0E03
    LOGICAL_UNIT_NOT_SUPPORTED = 0x2500
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    PARAMETER_NOT_SUPPORTED = 0x2601
    PARAMETER_VALUE_INVALID = 0x2602
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604
    TOO_MANY_TARGET_DESCRIPTORS = 0x2606
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = 0x2607
    TOO_MANY_SEGMENT_DESCRIPTORS = 0x2608
    UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = 0x2609
    UNEXPECTED_INEXACT_SEGMENT = 0x260A
    INLINE_DATA_LENGTH_EXCEEDED = 0x260B
    INVALID_OPERATION_FOR_COPY_SOURCE_OR_DESTINATION = 0x260C
    COPY_SEGMENT_GRANULARITY_VIOLATION = 0x260D
    WRITE_PROTECTED = 0x2700
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = 0x2707
    NOT_READY_TO_READY_CHANGE = 0x2800
    POWER_ON_RESET_OR_BUS_DEVICE_RESET = 0x2900
    POWER_ON_OCCURRED = 0x2901
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = 0x2903
    I_T_NEXUS_LOSS_OCCURRED = 0x2907
    PARAMETERS_CHANGED = 0x2A00
    MODE_PARAMETERS_CHANGED = 0x2A01
    RESERVATIONS_PREEMPTED = 0x2A03
    RESERVATIONS_RELEASED = 0x2A04
    REGISTRATIONS_PREEMPTED = 0x2A05
    ASYMMETRIC_ACCESS_STATE_CHANGED = 0x2A06
    CAPACITY_DATA_HAS_CHANGED = 0x2A09
    COMMAND_SEQUENCE_ERROR = 0x2C00
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = 0x2F00
    COMMANDS_CLEARED_BY_DEVICE_SERVER = 0x2F02
    MEDIUM_NOT_PRESENT = 0x3A00
    SANITIZE_COMMAND_FAILED = 0x3103
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    INQUIRY_DATA_HAS_CHANGED = 0x3F03
    REPORTED_LUNS_DATA_HAS_CHANGED = 0x3F0E
    INTERNAL_TARGET_FAILURE = 0x4400
    PROTOCOL_SERVICE_CRC_ERROR = 0x4705
    DATA_PHASE_ERROR = 0x4B00
    INVALID_TARGET_PORT_TRANSFER_TAG = 0x4B01
    TOO_MUCH_WRITE_DATA = 0x4B02
    OVERLAPPED_COMMANDS_ATTEMPTED = 0x4E00
    MEDIUM_REMOVAL_PREVENTED = 0x5302
    INSUFFICIENT_RESOURCES = 0x5503
    INSUFFICIENT_REGISTRATION_RESOURCES = 0x5504


_INFO_DESC = struct.Struct(">BBBxQ")


class SenseError(Exception):
    """A SCSI command failure with its sense data (SPC-4 4.5).

    `field` is a sense-key-specific field pointer (SPC-4 4.5.2.4.2): (in_cdb, byte, bit or None).
    `information` fills the INFORMATION field; `status` is CHECK CONDITION unless a
    constructor says otherwise (RESERVATION CONFLICT carries no sense).
    """

    def __init__(self, key: SenseKey, asc: Asc, *, information: int | None = None,
                 field: tuple[bool, int, int | None] | None = None,
                 sks: bytes | None = None, command_specific: int = 0,
                 status: Status = Status.CHECK_CONDITION,
                 extra_descriptors: bytes = b"") -> None:
        super().__init__(f"{key.name} {asc.name}")
        self.key = key
        self.asc = asc
        self.information = information
        self.field = field
        self.sks = sks
        self.command_specific = command_specific
        self.status = status
        self.extra_descriptors = extra_descriptors

    def sense_key_specific(self) -> bytes | None:
        if self.sks is not None:
            return self.sks
        if self.field is None:
            return None
        in_cdb, byte, bit = self.field
        b0 = 0x80 | (0x40 if in_cdb else 0)
        if bit is not None:
            b0 |= 0x08 | (bit & 7)
        return bytes((b0, (byte >> 8) & 0xFF, byte & 0xFF))

    def encode(self, descriptor_format: bool) -> bytes:
        return encode_sense(self.key, self.asc, descriptor_format, self.information,
                            self.sense_key_specific(), self.command_specific,
                            self.extra_descriptors)


def encode_sense(key: int, asc: int, descriptor_format: bool, information: int | None = None,
                 sks: bytes | None = None, command_specific: int = 0,
                 extra_descriptors: bytes = b"") -> bytes:
    """Sense data in descriptor (72h) or fixed (70h) format, current error."""
    if descriptor_format:
        body = bytearray()
        if information is not None:
            body += _INFO_DESC.pack(0x00, 0x0A, 0x80, information)
        if command_specific:
            body += _INFO_DESC.pack(0x01, 0x0A, 0x00, command_specific)
        if sks is not None:
            body += bytes((0x02, 0x06, 0, 0)) + sks + b"\0"
        body += extra_descriptors
        return bytes((0x72, key, asc >> 8, asc & 0xFF, 0, 0, 0, len(body))) + bytes(body)
    fixed = bytearray(18)
    fixed[0] = 0x70
    fixed[2] = key
    if information is not None:
        fixed[0] |= 0x80
        struct.pack_into(">I", fixed, 3, information & 0xFFFFFFFF)
    fixed[7] = 10
    struct.pack_into(">I", fixed, 8, command_specific & 0xFFFFFFFF)
    fixed[12] = asc >> 8
    fixed[13] = asc & 0xFF
    if sks is not None:
        fixed[15:18] = sks
    return bytes(fixed)


# Named constructors, one per condition.
def invalid_field_in_cdb(byte: int, bit: int | None = None) -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=(True, byte, bit))


def invalid_field_in_parameter_list(byte: int, bit: int | None = None) -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                      field=(False, byte, bit))


def parameter_list_error(asc: Asc, byte: int | None = None, bit: int | None = None) -> SenseError:
    """ILLEGAL REQUEST with any parameter-list ASC, optionally pointing at the field."""
    field = None if byte is None else (False, byte, bit)
    return SenseError(SenseKey.ILLEGAL_REQUEST, asc, field=field)


def parameter_list_length_error() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def invalid_opcode() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE,
                      field=(True, 0, None))


def invalid_service_action(byte: int = 1, bit: int | None = 4) -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=(True, byte, bit))


def invalid_field_in_information_unit() -> SenseError:
    """The Data-Out the fabric carries does not fit the command (SPC-4 table D.1)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)


def lba_out_of_range() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)


def logical_unit_not_supported() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)


def write_protected() -> SenseError:
    return SenseError(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def space_allocation_failed() -> SenseError:
    return SenseError(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)


def not_ready(asc: Asc = Asc.LUN_NOT_READY_INITIALIZING_COMMAND_REQUIRED) -> SenseError:
    return SenseError(SenseKey.NOT_READY, asc)


def asymmetric_access_state_transition() -> SenseError:
    """A command that needs the medium while the target port group is transitioning
    (SPC-4 5.15.2.4.6)."""
    return SenseError(SenseKey.NOT_READY,
                      Asc.LUN_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION)


def port_unavailable() -> SenseError:
    """NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (SPC-4
    5.15.2.4.5): this gateway cannot reach state the command depends on; another path may."""
    return SenseError(SenseKey.NOT_READY, Asc.LUN_NOT_ACCESSIBLE_TARGET_PORT_UNAVAILABLE)


def medium_error(asc: Asc, lba: int | None = None) -> SenseError:
    return SenseError(SenseKey.MEDIUM_ERROR, asc, information=lba)


def miscompare(offset: int) -> SenseError:
    return SenseError(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=offset)


def internal_target_failure() -> SenseError:
    return SenseError(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


def unit_attention(asc: Asc) -> SenseError:
    return SenseError(SenseKey.UNIT_ATTENTION, asc)


def aborted_command(asc: Asc) -> SenseError:
    return SenseError(SenseKey.ABORTED_COMMAND, asc)


def task_aborted() -> SenseError:
    """TASK ABORTED status, for a copy stopped by COPY OPERATION ABORT (SPC-4 6.3)."""
    return SenseError(SenseKey.ABORTED_COMMAND, Asc.NO_ADDITIONAL_SENSE,
                      status=Status.TASK_ABORTED)


def saving_parameters_not_supported(byte: int, bit: int) -> SenseError:
    """Saved mode pages asked for where none can be saved (SPC-4 6.11, 6.12)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED,
                      field=(True, byte, bit))


def medium_removal_prevented() -> SenseError:
    """LOEJ while a nexus prevents medium removal (SBC-3 5.20)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)


def progress_indication(done: int, total: int) -> bytes:
    """Sense-key specific progress indication (SPC-4 4.5.2.4.4): SKSV, then the fraction done
    of 65536."""
    fraction = min(0xFFFF, done * 0x10000 // total) if total else 0
    return bytes((0x80, fraction >> 8, fraction & 0xFF))


def sanitize_in_progress(done: int, total: int) -> SenseError:
    """NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS with how far it is (SBC-4
    4.11.3): the answer to every command but the few a sanitize lets through, and to REQUEST
    SENSE."""
    return SenseError(SenseKey.NOT_READY, Asc.LUN_NOT_READY_SANITIZE_IN_PROGRESS,
                      sks=progress_indication(done, total))


def sanitize_failed() -> SenseError:
    """MEDIUM ERROR, SANITIZE COMMAND FAILED (SBC-4 4.11.4): the sanitize operation did not
    complete, and the unit stays in failure mode until one does or EXIT FAILURE MODE."""
    return SenseError(SenseKey.MEDIUM_ERROR, Asc.SANITIZE_COMMAND_FAILED)


def no_sense() -> SenseError:
    """Nothing to report: what REQUEST SENSE returns for a healthy unit (SPC-4 6.39)."""
    return SenseError(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE)


def reservation_conflict() -> SenseError:
    return SenseError(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE,
                      status=Status.RESERVATION_CONFLICT)


def invalid_release() -> SenseError:
    """RELEASE by the holder with another TYPE or SCOPE (SPC-4 5.13.11.2)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)


def insufficient_registration_resources() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INSUFFICIENT_REGISTRATION_RESOURCES)


def insufficient_resources() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.INSUFFICIENT_RESOURCES)


# Third-party copy (SPC-4 6.4.5, 5.17.6).
FORWARDED_FROM_SOURCE = 1  # SENSE DATA SOURCE in the forwarded sense data descriptor
FORWARDED_FROM_DESTINATION = 2


def forwarded_sense(source: int, status: int, sense: bytes | None) -> bytes:
    """Forwarded sense data descriptor (SPC-4 4.5.2.9): what a copy source or destination said."""
    body = (sense or b"")[:250]
    return bytes((0x0C, 2 + len(body), source & 0x0F, status)) + body


def segment_pointer(byte: int, bit: int | None = None) -> bytes:
    """Sense-key specific segment pointer (SPC-4 4.5.2.4.6) into the parameter list (SD=0)."""
    b0 = 0x80 | (0x08 | (bit & 7) if bit is not None else 0)
    return bytes((b0, (byte >> 8) & 0xFF, byte & 0xFF))


def copy_aborted(asc: Asc, segment: int, *, residual: int | None = None,
                 pointer: int | None = None, forwarded: bytes = b"") -> SenseError:
    """COPY ABORTED: the segment being processed goes in COMMAND-SPECIFIC INFORMATION, the blocks
    it left uncopied in INFORMATION, the descriptor at fault in the segment pointer."""
    return SenseError(SenseKey.COPY_ABORTED, asc, information=residual,
                      sks=None if pointer is None else segment_pointer(pointer),
                      command_specific=segment, extra_descriptors=forwarded)


def copy_target_not_reachable(segment: int, pointer: int) -> SenseError:
    return copy_aborted(Asc.COPY_TARGET_DEVICE_NOT_REACHABLE, segment, pointer=pointer)


def operation_in_progress() -> SenseError:
    """A copy with the same list identifier is still active (SPC-4 6.4.3.2)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.OPERATION_IN_PROGRESS)


def invalid_token(asc: Asc, byte: int | None = None) -> SenseError:
    """INVALID TOKEN OPERATION, with the reason in the qualifier (SPC-4 5.17.6.4)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, asc,
                      field=None if byte is None else (False, byte, None))
