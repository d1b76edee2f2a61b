"""A compact iSCSI initiator (RFC 7143) for pytarget's tests, benchmarks and fuzzer.

`protocol.InitiatorConnection` is the sans-I/O connection; `client.Initiator` drives it over an
asyncio TCP stream; `pdus` builds the initiator's request PDUs.
"""

from .chap import AuthenticationFailed, ChapAuthenticator
from .client import CommandResult, Initiator, InitiatorError
from .protocol import InitiatorConnection, ProtocolError

__all__ = ["AuthenticationFailed", "ChapAuthenticator", "CommandResult", "Initiator",
           "InitiatorConnection", "InitiatorError", "ProtocolError"]
