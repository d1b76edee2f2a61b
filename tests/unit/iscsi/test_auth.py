"""CHAP in the security stage (RFC 7143 12.1.3): the target's state machine key by key, the
binary-value encodings, and the project's initiator against it through the in-memory Pair."""

from __future__ import annotations

import base64
import hashlib

import pytest

from pytarget.initiator.chap import AuthenticationFailed
from pytarget.initiator.chap import ChapAuthenticator as InitiatorChap
from pytarget.initiator.protocol import LoginComplete, LoginFailed
from pytarget.iscsi import text
from pytarget.iscsi.auth import (
    CHAP_MD5,
    CHAP_SHA256,
    ChallengeLedger,
    ChapAuthenticator,
    ChapCredentials,
    ChapSecret,
    chap_response,
    parse_algorithms,
)
from pytarget.iscsi.errors import LoginError, LoginStatus

from .harness import TARGET, Pair, make_registry

USER, SECRET = "alice", b"alice-secret-1"
TUSER, TSECRET = "target", b"target-secret-2"
ONE_WAY = ChapCredentials(ChapSecret(USER, SECRET))
MUTUAL = ChapCredentials(ChapSecret(USER, SECRET), ChapSecret(TUSER, TSECRET))


def challenged(creds: ChapCredentials = ONE_WAY, algorithms: str = "5",
               ledger: ChallengeLedger | None = None) -> tuple[ChapAuthenticator, dict[str, str]]:
    auth = ChapAuthenticator(creds, ledger)
    assert auth.step([("AuthMethod", "CHAP,None")]) == [("AuthMethod", "CHAP")]
    answer = dict(auth.step([("CHAP_A", algorithms)]))
    assert not auth.done
    return auth, answer


def respond(answer: dict[str, str], secret: bytes = SECRET) -> str:
    algorithm = int(answer["CHAP_A"])
    challenge = text.decode_binary(answer["CHAP_C"], 1024)
    return text.encode_binary(chap_response(algorithm, int(answer["CHAP_I"]), secret, challenge))


def fails(auth: ChapAuthenticator, keys: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(LoginError) as info:
        auth.step(keys)
    assert info.value.status == LoginStatus.AUTHENTICATION_FAILURE
    assert reason in info.value.reason
    assert SECRET.decode() not in info.value.reason and TSECRET.decode() not in info.value.reason


# ---------------------------------------------------------------------------------- target side
@pytest.mark.parametrize("offer,chosen,length", [("5", 5, 16), ("7,5", 7, 32), ("5,7", 5, 16),
                                                 ("6,7", 7, 32), ("0x7,5", 5, 16)])
def test_algorithm_is_the_first_supported_in_the_initiators_order(offer: str, chosen: int,
                                                                   length: int) -> None:
    _, answer = challenged(algorithms=offer)
    assert int(answer["CHAP_A"]) == chosen
    assert 0 <= int(answer["CHAP_I"]) <= 255
    assert len(text.decode_binary(answer["CHAP_C"], 1024)) == length


def test_one_way() -> None:
    auth, answer = challenged()
    assert auth.step([("CHAP_N", USER), ("CHAP_R", respond(answer))]) == []
    assert auth.done
    assert auth.step([]) == []  # a later empty security-stage request is fine


def test_sha256_response_matches_rfc1994_construction() -> None:
    auth, answer = challenged(algorithms="7")
    challenge = text.decode_binary(answer["CHAP_C"], 1024)
    digest = hashlib.sha256(bytes((int(answer["CHAP_I"]),)) + SECRET + challenge).digest()
    auth.step([("CHAP_N", USER), ("CHAP_R", "0b" + base64.b64encode(digest).decode())])
    assert auth.done


def test_mutual() -> None:
    auth, answer = challenged(MUTUAL)
    mine = bytes(range(16))
    reply = dict(auth.step([("CHAP_N", USER), ("CHAP_R", respond(answer)), ("CHAP_I", "9"),
                            ("CHAP_C", text.encode_binary(mine))]))
    assert reply["CHAP_N"] == TUSER
    assert text.decode_binary(reply["CHAP_R"], 1024) == chap_response(CHAP_MD5, 9, TSECRET, mine)
    assert auth.done


def test_challenges_differ() -> None:
    seen = {challenged()[1]["CHAP_C"] for _ in range(50)}
    assert len(seen) == 50


def test_wrong_secret() -> None:
    auth, answer = challenged()
    fails(auth, [("CHAP_N", USER), ("CHAP_R", respond(answer, b"not-the-secret"))],
          "wrong CHAP response")
    assert not auth.done


def test_wrong_user() -> None:
    auth, answer = challenged()
    fails(auth, [("CHAP_N", "mallory"), ("CHAP_R", respond(answer))], "unknown CHAP user")


def test_response_of_the_wrong_length() -> None:
    auth, _ = challenged()
    fails(auth, [("CHAP_N", USER), ("CHAP_R", "0x00")], "wrong CHAP response")


@pytest.mark.parametrize("value", ["", "0x", "0xzz", "0b!!!", "12", "0x" + "00" * 1025])
def test_response_not_a_binary_value(value: str) -> None:
    auth, _ = challenged()
    fails(auth, [("CHAP_N", USER), ("CHAP_R", value)], "CHAP_R")


def test_reflected_challenge_refused() -> None:
    """The initiator hands our own challenge back as its mutual challenge (RFC 7143 12.1.3)."""
    auth, answer = challenged(MUTUAL)
    fails(auth, [("CHAP_N", USER), ("CHAP_R", respond(answer)), ("CHAP_I", answer["CHAP_I"]),
                 ("CHAP_C", answer["CHAP_C"])], "reflected")
    assert not auth.done


def test_challenge_from_another_connection_refused() -> None:
    ledger = ChallengeLedger()
    _, other = challenged(MUTUAL, ledger=ledger)
    auth, answer = challenged(MUTUAL, ledger=ledger)
    fails(auth, [("CHAP_N", USER), ("CHAP_R", respond(answer)), ("CHAP_I", "1"),
                 ("CHAP_C", other["CHAP_C"])], "reflected")


def test_ledger_is_bounded() -> None:
    ledger = ChallengeLedger(size=3)
    for i in range(5):
        ledger.issue(bytes([i]))
    assert bytes([0]) not in ledger and bytes([4]) in ledger


def test_response_made_with_the_targets_secret_refused() -> None:
    auth, answer = challenged(MUTUAL)
    fails(auth, [("CHAP_N", USER), ("CHAP_R", respond(answer, TSECRET))], "wrong CHAP response")


def test_unsupported_algorithm() -> None:
    auth = ChapAuthenticator(ONE_WAY)
    auth.step([("AuthMethod", "CHAP")])
    fails(auth, [("CHAP_A", "6,128")], "no supported CHAP algorithm")


def test_chap_not_offered() -> None:
    fails(ChapAuthenticator(ONE_WAY), [("AuthMethod", "None")], "CHAP required")


@pytest.mark.parametrize("keys,reason", [
    ([], "AuthMethod missing"),
    ([("CHAP_A", "5")], "AuthMethod missing"),
])
def test_missing_auth_method(keys: list[tuple[str, str]], reason: str) -> None:
    fails(ChapAuthenticator(ONE_WAY), keys, reason)


def test_missing_algorithm() -> None:
    auth = ChapAuthenticator(ONE_WAY)
    auth.step([("AuthMethod", "CHAP")])
    fails(auth, [], "CHAP_A missing")


@pytest.mark.parametrize("keys", [[("CHAP_N", USER)], [("CHAP_R", "0x00")], []])
def test_missing_name_or_response(keys: list[tuple[str, str]]) -> None:
    auth, _ = challenged()
    fails(auth, keys, "CHAP_N or CHAP_R missing")


def test_mutual_required_when_configured() -> None:
    auth, answer = challenged(MUTUAL)
    fails(auth, [("CHAP_N", USER), ("CHAP_R", respond(answer))], "mutual CHAP is configured")


def test_mutual_asked_without_target_identity() -> None:
    auth, answer = challenged(ONE_WAY)
    fails(auth, [("CHAP_N", USER), ("CHAP_R", respond(answer)), ("CHAP_I", "1"),
                 ("CHAP_C", "0x" + "ab" * 16)], "no identity")


@pytest.mark.parametrize("extra", [[("CHAP_I", "1")], [("CHAP_C", "0x0102")],
                                   [("CHAP_I", "256"), ("CHAP_C", "0x0102")],
                                   [("CHAP_I", "x"), ("CHAP_C", "0x0102")]])
def test_malformed_mutual_keys(extra: list[tuple[str, str]]) -> None:
    auth, answer = challenged(MUTUAL)
    with pytest.raises(LoginError) as info:
        auth.step([("CHAP_N", USER), ("CHAP_R", respond(answer))] + extra)
    assert info.value.status == LoginStatus.AUTHENTICATION_FAILURE


def test_keys_out_of_order_and_twice() -> None:
    auth = ChapAuthenticator(ONE_WAY)
    fails(auth, [("AuthMethod", "CHAP"), ("CHAP_N", USER)], "unexpected CHAP_N")
    auth = ChapAuthenticator(ONE_WAY)
    fails(auth, [("AuthMethod", "CHAP"), ("AuthMethod", "CHAP")], "offered twice")
    auth, answer = challenged()
    auth.step([("CHAP_N", USER), ("CHAP_R", respond(answer))])
    fails(auth, [("CHAP_A", "5")], "unexpected CHAP_A")


def test_algorithm_in_the_same_request_as_the_method() -> None:
    auth = ChapAuthenticator(ONE_WAY)
    answer = dict(auth.step([("AuthMethod", "CHAP"), ("CHAP_A", "5")]))
    assert answer["AuthMethod"] == "CHAP" and answer["CHAP_A"] == "5"


def test_secret_never_in_repr() -> None:
    assert SECRET.decode() not in repr(MUTUAL) and TSECRET.decode() not in repr(MUTUAL)


def test_binary_values() -> None:
    assert text.decode_binary("0xABC", 8) == b"\x0a\xbc"
    assert text.decode_binary("0X0a0b", 8) == b"\x0a\x0b"
    assert text.decode_binary("0b" + base64.b64encode(b"hello").decode(), 8) == b"hello"
    for bad in ("0x", "0b", "abc", "0x 12", "0x123456789", "0bé"):
        with pytest.raises(ValueError):
            text.decode_binary(bad, 4)
    assert parse_algorithms("7, 5,x,99999999") == [7, 5]


# ---------------------------------------------------------------------------------- on the wire
def chap_pair(creds: ChapCredentials | None, authenticator: InitiatorChap | None,
              **options: object) -> Pair:
    registry = make_registry()
    registry.target(TARGET).auth = creds
    return Pair(registry=registry, authenticator=authenticator, **options)


@pytest.mark.parametrize("algorithms", [(CHAP_SHA256, CHAP_MD5), (CHAP_MD5,)])
def test_initiator_mutual_login(algorithms: tuple[int, ...]) -> None:
    ini = InitiatorChap(USER, SECRET, target_user=TUSER, target_secret=TSECRET,
                        algorithms=algorithms)
    p = chap_pair(MUTUAL, ini)
    assert p.login().tsih
    assert ini.verified and ini.algorithm == algorithms[0]


def test_initiator_one_way_login() -> None:
    p = chap_pair(ONE_WAY, InitiatorChap(USER, SECRET))
    assert p.login().tsih


def test_wrong_secret_fails_with_0201_after_the_delay() -> None:
    p = chap_pair(ONE_WAY, InitiatorChap(USER, "some-other-secret"), auth_failure_delay=2.0)
    p.ini.start_login()
    p.pump()
    assert not p.take(LoginFailed) and not p.closed
    assert p.conn.next_deadline() == 2.0
    p.tick(1.9)
    assert not p.take(LoginFailed)
    p.tick(2.0)
    [failed] = p.take(LoginFailed)
    assert failed.status == LoginStatus.AUTHENTICATION_FAILURE and p.closed


def test_target_that_cannot_prove_itself_fails_the_login() -> None:
    ini = InitiatorChap(USER, SECRET, target_user=TUSER, target_secret=b"what-we-expect-9")
    p = chap_pair(MUTUAL, ini)
    ini_conn = p.ini
    ini_conn.start_login()
    with pytest.raises(AuthenticationFailed):
        p.pump()
    assert not [e for e in p.events if isinstance(e, LoginComplete)]


def test_skipping_the_security_stage_fails() -> None:
    p = chap_pair(ONE_WAY, None)
    p.ini.start_login()
    p.pump()
    [failed] = p.take(LoginFailed)
    assert failed.status == LoginStatus.AUTHENTICATION_FAILURE


def test_discovery_authentication() -> None:
    registry = make_registry()
    registry.discovery_auth = ONE_WAY
    p = Pair(registry=registry, target_name=None, authenticator=InitiatorChap(USER, SECRET))
    assert p.login().tsih
    p = Pair(registry=registry, target_name=None, security_stage=True)
    p.ini.start_login()
    p.pump()
    assert p.take(LoginFailed)[0].status == LoginStatus.AUTHENTICATION_FAILURE
