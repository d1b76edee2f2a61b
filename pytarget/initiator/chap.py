"""The initiator side of CHAP (RFC 7143 12.1.3, RFC 1994): one-way, or mutual when the target's
identity is given, with SHA-256 (CHAP_A=7) preferred and MD5 (CHAP_A=5) always offered.

A target that answers mutual CHAP wrongly, or not at all, fails the login with
`AuthenticationFailed` (the initiator must then close the connection, RFC 7143 12.1.3).
"""

from __future__ import annotations

import hmac
import secrets

from ..iscsi import text
from ..iscsi.auth import CHALLENGE_LENGTH, CHAP_MD5, CHAP_SHA256, HASHES, MAX_BINARY, chap_response
from .protocol import Authenticator, ProtocolError


class AuthenticationFailed(ProtocolError):
    """The target did not prove its identity (mutual CHAP)."""


class ChapAuthenticator(Authenticator):
    methods = "CHAP"

    def __init__(self, user: str, secret: bytes | str, *, target_user: str | None = None,
                 target_secret: bytes | str | None = None,
                 algorithms: tuple[int, ...] = (CHAP_SHA256, CHAP_MD5)) -> None:
        self.user = user
        self.secret = secret.encode() if isinstance(secret, str) else secret
        if (target_user is None) != (target_secret is None):
            raise ValueError("mutual CHAP needs both target_user and target_secret")
        self.target_user = target_user
        self.target_secret = (target_secret.encode() if isinstance(target_secret, str)
                              else target_secret)
        self.algorithms = algorithms
        self.stage = "method"
        self.algorithm = 0
        self.identifier = 0
        self.challenge = b""  # ours, for mutual CHAP
        self.target_challenge = b""
        self.verified = False

    @property
    def mutual(self) -> bool:
        return self.target_secret is not None

    @property
    def ready(self) -> bool:
        return self.stage in ("responded", "done")

    def mutual_challenge(self, length: int) -> bytes:
        """The challenge we send for mutual CHAP (tests override this to misbehave)."""
        return secrets.token_bytes(length)

    def step(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        got = dict(keys)
        if self.stage == "method":
            if got.get("AuthMethod") != "CHAP":
                raise ProtocolError(f"target chose AuthMethod={got.get('AuthMethod')}")
            self.stage = "algorithm"
            return [("CHAP_A", ",".join(str(a) for a in self.algorithms))]
        if self.stage == "algorithm":
            return self._answer(got)
        if self.stage == "responded":
            self._verify(got)
            return []
        return []

    def complete(self, keys: list[tuple[str, str]]) -> None:
        if self.stage == "responded":
            self._verify(dict(keys))
        if self.stage != "done":
            raise AuthenticationFailed("target left the security stage before CHAP ended")

    def _answer(self, got: dict[str, str]) -> list[tuple[str, str]]:
        try:
            algorithm = int(got["CHAP_A"])
            identifier = int(got["CHAP_I"])
            challenge = text.decode_binary(got["CHAP_C"], MAX_BINARY)
        except (KeyError, ValueError):
            raise ProtocolError("target sent no usable CHAP_A, CHAP_I and CHAP_C") from None
        if algorithm not in self.algorithms or algorithm not in HASHES:
            raise ProtocolError(f"target chose CHAP_A={algorithm}, which we did not offer")
        if not 0 <= identifier <= 255:
            raise ProtocolError(f"CHAP_I={identifier}")
        self.algorithm = algorithm
        self.target_challenge = challenge
        answers = [("CHAP_N", self.user),
                   ("CHAP_R", text.encode_binary(
                       chap_response(algorithm, identifier, self.secret, challenge)))]
        if self.mutual:
            self.identifier = secrets.randbelow(256)
            self.challenge = self.mutual_challenge(CHALLENGE_LENGTH[algorithm])
            answers += [("CHAP_I", str(self.identifier)),
                        ("CHAP_C", text.encode_binary(self.challenge))]
            self.stage = "responded"
        else:
            self.stage = "done"
        return answers

    def _verify(self, got: dict[str, str]) -> None:
        assert self.target_secret is not None and self.target_user is not None
        name, raw = got.get("CHAP_N"), got.get("CHAP_R")
        if name is None or raw is None:
            raise AuthenticationFailed("target did not answer our CHAP challenge")
        try:
            response = text.decode_binary(raw, MAX_BINARY)
        except ValueError:
            raise AuthenticationFailed("target's CHAP_R is not a binary value") from None
        expected = chap_response(self.algorithm, self.identifier, self.target_secret,
                                 self.challenge)
        name_ok = hmac.compare_digest(name.encode(), self.target_user.encode())
        if not (hmac.compare_digest(response, expected) and name_ok):
            raise AuthenticationFailed("target failed mutual CHAP authentication")
        self.stage = "done"
        self.verified = True
