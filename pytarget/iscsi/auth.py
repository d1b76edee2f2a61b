"""Authentication in the login's security stage (RFC 7143 12).

An Authenticator answers the security keys of each Login Request and says when the stage is
done. `NoAuthentication` serves targets without configured secrets.
"""

from __future__ import annotations

from .errors import LoginError, LoginStatus


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
