"""iSCSI protocol faults: login failures and PDU-level errors, each carrying its wire code."""

from __future__ import annotations

from enum import IntEnum

from .pdu import RejectReason


class LoginStatus(IntEnum):
    """Status-Class << 8 | Status-Detail of a Login Response (RFC 7143 11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class IscsiError(Exception):
    """Base of the iSCSI protocol fault family (never a SCSI sense condition)."""


class LoginError(IscsiError):
    """Ends a login with a non-zero status; the connection closes after the response."""

    def __init__(self, status: LoginStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class PduReject(IscsiError):
    """A PDU answered with a Reject PDU; the connection stays up (RFC 7143 11.17)."""

    def __init__(self, reason: RejectReason, message: str, data_sn: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.data_sn = data_sn


class ConnectionFatal(IscsiError):
    """A fault after which the byte stream cannot be trusted: the connection is dropped."""
