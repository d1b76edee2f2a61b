"""Text key=value encoding for Login and Text PDUs (RFC 7143 6.1)."""

from __future__ import annotations

import base64
import binascii

from .errors import LoginError, LoginStatus

MAX_KEY_NAME = 63
MAX_VALUE = 8192  # longest value any standard key may carry (CHAP binary values)
MAX_TEXT_BYTES = 65536  # one login or text exchange, all PDUs together
MAX_KEYS = 256


def parse(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Split a complete text segment into ordered (key, value) pairs.

    Raises LoginError(INITIATOR_ERROR) for malformed pairs and for texts over the bounds.
    """
    raw = bytes(data)
    if len(raw) > MAX_TEXT_BYTES:
        raise LoginError(LoginStatus.INITIATOR_ERROR, "text too long")
    pairs: list[tuple[str, str]] = []
    for item in raw.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key or len(key) > MAX_KEY_NAME or len(value) > MAX_VALUE:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "malformed key=value pair")
        try:
            pairs.append((key.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "text is not UTF-8") from None
        if len(pairs) > MAX_KEYS:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "too many keys")
    return pairs


def encode(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


_HEX = frozenset("0123456789abcdefABCDEF")


def decode_binary(value: str, limit: int) -> bytes:
    """An RFC 7143 6.1 binary-value: `0x` hex (an odd digit count is padded) or `0b` base64.

    Raises ValueError unless the decoded value has 1..limit bytes.
    """
    prefix, body = value[:2].lower(), value[2:]
    if len(body) > 2 * limit + 8:
        raise ValueError("too long")
    if prefix == "0x":
        if not body or not _HEX.issuperset(body):
            raise ValueError("not hex")
        raw = bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
    elif prefix == "0b":
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64") from None
    else:
        raise ValueError("no 0x or 0b prefix")
    if not 0 < len(raw) <= limit:
        raise ValueError("length")
    return raw


def encode_binary(value: bytes) -> str:
    return "0x" + value.hex()
