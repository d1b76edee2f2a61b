"""Authentication in the login's security stage (RFC 7143 12, RFC 1994).

An Authenticator answers the security keys of each Login Request and says when the stage is
done. `NoAuthentication` serves targets without configured secrets; `ChapAuthenticator`
runs one-way or mutual CHAP (RFC 7143 12.1.3) with MD5 (CHAP_A=5, the algorithm every
implementation must offer) or SHA-256 (CHAP_A=7, the value IANA's "PPP Authentication
Algorithms" registry assigns and RFC 7143's successor uses), whichever the initiator lists first.

Every failure is a LoginError with status 0201 (authentication failure); its reason is for the
log and never contains a secret, a challenge or a response.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import text
from .errors import LoginError, LoginStatus

CHAP_MD5 = 5
CHAP_SHA256 = 7
HASHES: dict[int, Callable[[], Any]] = {
    CHAP_MD5: hashlib.md5,
    CHAP_SHA256: hashlib.sha256,
}
# Our challenge is as long as the digest (RFC 1994 4.1 asks for at least that much randomness).
CHALLENGE_LENGTH = {CHAP_MD5: 16, CHAP_SHA256: 32}
MAX_BINARY = 1024  # longest CHAP_C or CHAP_R, decoded (RFC 7143 12.1.3)
MIN_SECRET = 12  # 96 bits: below this RFC 7143 12.1.3 requires IPsec
MAX_SECRET = 255  # the longest secret common initiators (open-iscsi, libiscsi) accept
MAX_NAME = 255
LEDGER_SIZE = 4096


class Authenticator:
    required = False

    def __init__(self) -> None:
        self.done = False

    def step(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        raise NotImplementedError


class NoAuthentication(Authenticator):
    """AuthMethod=None: the stage ends as soon as the initiator agrees to it."""

    def __init__(self) -> None:
        super().__init__()
        self.done = True

    def step(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        for name, value in keys:
            if name == "AuthMethod":
                answers.append((name, "None" if "None" in value.split(",") else "Reject"))
            else:
                raise LoginError(LoginStatus.INITIATOR_ERROR, f"{name} without CHAP")
        return answers


@dataclass(frozen=True)
class ChapSecret:
    """One CHAP identity: the name sent as CHAP_N and its secret (never shown by repr)."""

    user: str
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class ChapCredentials:
    """What a target (or the discovery service) requires.

    `chap` authenticates the initiator; `mutual`, when set, is how the target proves itself,
    and the initiator must ask for it (a configured mutual identity cannot be skipped).
    """

    chap: ChapSecret
    mutual: ChapSecret | None = None


def chap_response(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 4.1: H(Identifier || secret || Challenge)."""
    h = HASHES[algorithm]()
    h.update(bytes((identifier,)))
    h.update(secret)
    h.update(challenge)
    return h.digest()


def parse_algorithms(value: str) -> list[int]:
    """CHAP_A's list of numbers, in the offerer's order; what is not a number is skipped."""
    out: list[int] = []
    for item in value.split(","):
        item = item.strip()
        if item.isdigit() and len(item) <= 5:
            out.append(int(item))
    return out


class ChallengeLedger:
    """The challenges this target issued lately, on any connection.

    An initiator that hands one back as its own challenge is reflecting it (RFC 7143 12.1.3
    requires the check within a connection; the ledger extends it across connections). Bounded:
    the oldest entries fall out past `size`.
    """

    def __init__(self, size: int = LEDGER_SIZE) -> None:
        self.size = size
        self._issued: OrderedDict[bytes, None] = OrderedDict()

    def issue(self, challenge: bytes) -> None:
        self._issued[challenge] = None
        while len(self._issued) > self.size:
            self._issued.popitem(last=False)

    def __contains__(self, challenge: bytes) -> bool:
        return challenge in self._issued


class _Stage(Enum):
    METHOD = "method"  # waiting for AuthMethod
    ALGORITHM = "algorithm"  # waiting for CHAP_A
    RESPONSE = "response"  # challenge sent, waiting for CHAP_N/CHAP_R
    DONE = "done"


def _fail(reason: str) -> LoginError:
    return LoginError(LoginStatus.AUTHENTICATION_FAILURE, reason)


class ChapAuthenticator(Authenticator):
    """The target side of CHAP (RFC 7143 12.1.3), one Login Request's security keys at a time:

    1. AuthMethod=<list with CHAP>             → AuthMethod=CHAP
    2. CHAP_A=<A1,A2,...>                       → CHAP_A=<A> CHAP_I=<I> CHAP_C=<C>
    3. CHAP_N CHAP_R [CHAP_I CHAP_C]            → [CHAP_N CHAP_R] (mutual)
    """

    required = True

    def __init__(self, credentials: ChapCredentials, ledger: ChallengeLedger | None = None,
                 algorithms: tuple[int, ...] = (CHAP_MD5, CHAP_SHA256)) -> None:
        super().__init__()
        self.credentials = credentials
        self.ledger = ledger if ledger is not None else ChallengeLedger()
        self.algorithms = algorithms
        self.stage = _Stage.METHOD
        self.algorithm = 0
        self.identifier = 0
        self.challenge = b""

    def step(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        offered: dict[str, str] = {}
        for name, value in keys:
            if name in offered:
                raise _fail(f"{name} offered twice")
            offered[name] = value
        answers: list[tuple[str, str]] = []
        if self.stage is _Stage.METHOD:
            answers += self._method(offered.pop("AuthMethod", None))
            if "CHAP_A" not in offered:
                self._nothing_else(offered)
                return answers
        if self.stage is _Stage.ALGORITHM:
            answers += self._algorithm(offered.pop("CHAP_A", None))
        elif self.stage is _Stage.RESPONSE:
            answers += self._response(offered)
        self._nothing_else(offered)
        return answers

    @staticmethod
    def _nothing_else(offered: dict[str, str]) -> None:
        if offered:
            raise _fail(f"unexpected {sorted(offered)[0]}")

    def _method(self, value: str | None) -> list[tuple[str, str]]:
        if value is None:
            raise _fail("AuthMethod missing")
        if "CHAP" not in value.split(","):
            raise _fail(f"CHAP required, initiator offered AuthMethod={value[:64]}")
        self.stage = _Stage.ALGORITHM
        return [("AuthMethod", "CHAP")]

    def _algorithm(self, value: str | None) -> list[tuple[str, str]]:
        if value is None:
            raise _fail("CHAP_A missing")
        chosen = next((a for a in parse_algorithms(value) if a in self.algorithms), None)
        if chosen is None:
            raise _fail(f"no supported CHAP algorithm in CHAP_A={value[:64]}")
        self.algorithm = chosen
        self.identifier = secrets.randbelow(256)
        self.challenge = secrets.token_bytes(CHALLENGE_LENGTH[chosen])
        self.ledger.issue(self.challenge)
        self.stage = _Stage.RESPONSE
        return [("CHAP_A", str(chosen)), ("CHAP_I", str(self.identifier)),
                ("CHAP_C", text.encode_binary(self.challenge))]

    def _response(self, offered: dict[str, str]) -> list[tuple[str, str]]:
        name = offered.pop("CHAP_N", None)
        raw_response = offered.pop("CHAP_R", None)
        their_id = offered.pop("CHAP_I", None)
        their_challenge = offered.pop("CHAP_C", None)
        if name is None or raw_response is None:
            raise _fail("CHAP_N or CHAP_R missing")
        response = _binary(raw_response, "CHAP_R")
        creds = self.credentials
        expected = chap_response(self.algorithm, self.identifier, creds.chap.secret,
                                 self.challenge)
        # Both comparisons always run, in constant time, whatever the first one says.
        user_ok = hmac.compare_digest(name.encode(), creds.chap.user.encode())
        response_ok = hmac.compare_digest(response, expected)
        if not user_ok:
            raise _fail("unknown CHAP user")
        if not response_ok:
            raise _fail("wrong CHAP response")
        if creds.mutual is not None and hmac.compare_digest(
                response, chap_response(self.algorithm, self.identifier, creds.mutual.secret,
                                        self.challenge)):
            raise _fail("CHAP response made with the target's own secret")
        answers: list[tuple[str, str]] = []
        if (their_id is None) != (their_challenge is None):
            raise _fail("CHAP_I and CHAP_C must come together")
        if their_challenge is None:
            if creds.mutual is not None:
                raise _fail("mutual CHAP is configured but the initiator did not ask for it")
        else:
            assert their_id is not None
            if creds.mutual is None:
                raise _fail("initiator asked for mutual CHAP; the target has no identity")
            if not their_id.isdigit() or int(their_id) > 255:
                raise _fail("CHAP_I is not a number 0..255")
            challenge = _binary(their_challenge, "CHAP_C")
            if hmac.compare_digest(challenge, self.challenge) or challenge in self.ledger:
                raise _fail("initiator reflected a challenge of ours")
            answers = [("CHAP_N", creds.mutual.user),
                       ("CHAP_R", text.encode_binary(chap_response(
                           self.algorithm, int(their_id), creds.mutual.secret, challenge)))]
        self.stage = _Stage.DONE
        self.done = True
        return answers


def _binary(value: str, key: str) -> bytes:
    try:
        return text.decode_binary(value, MAX_BINARY)
    except ValueError:
        raise _fail(f"{key} is not a binary value of 1..{MAX_BINARY} bytes") from None
