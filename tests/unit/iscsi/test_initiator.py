"""The sans-I/O initiator against hand-made target PDUs: it answers what the target offers and
refuses what breaks RFC 7143, so the tests built on it notice a misbehaving target."""

from __future__ import annotations

import pytest

from pytarget.initiator.protocol import (
    AsyncMessage,
    InitiatorConnection,
    LoginComplete,
    LoginFailed,
    ProtocolError,
    State,
)
from pytarget.iscsi import pdu, text
from pytarget.iscsi.pdu import Bhs, Op

from .harness import TUR, frame, split_pdus

TARGET = "iqn.2026-11.io.pytarget:initiator-test"


def login_response(ini: InitiatorConnection, pairs: list[tuple[str, str]], *,
                   transit: bool = True, cont: bool = False, csg: int = 1, nsg: int = 3,
                   stat_sn: int = 7, cmd_sn: int = 1, window: int = 8, status: int = 0,
                   tsih: int = 9) -> bytes:
    data = text.encode(pairs)
    flags = (pdu.F_TRANSIT if transit else 0) | (pdu.F_CONTINUE if cont else 0) | csg << 2 \
        | (nsg if transit else 0)
    hdr = pdu.login_response(flags, 0, 0, len(data), ini.isid, tsih if transit else 0, 1,
                             stat_sn, cmd_sn, cmd_sn + window - 1, status >> 8, status & 0xFF)
    return frame(hdr, data)


def sent(ini: InitiatorConnection) -> list[tuple[Bhs, bytes]]:
    return split_pdus(ini.data_to_send())


def echo(offer: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A target that accepts every offered value (the first of a list)."""
    return [(k, v.split(",")[0]) for k, v in offer
            if k not in ("InitiatorName", "SessionType", "TargetName", "InitiatorAlias")]


def logged_in(**options: object) -> InitiatorConnection:
    ini = InitiatorConnection("iqn.2026-11.io.pytarget:ini", target_name=TARGET,
                              **options)  # type: ignore[arg-type]
    ini.start_login()
    ((_, data),) = sent(ini)
    ini.receive_data(login_response(ini, echo(text.parse(data))))
    assert isinstance(ini.next_event(), LoginComplete)
    return ini


def test_answers_what_the_target_offers() -> None:
    ini = InitiatorConnection("iqn.x:ini", target_name=TARGET,
                              keys={"MaxOutstandingR2T": None, "DataDigest": None})
    ini.start_login()
    ((_, data),) = sent(ini)
    offer = echo(text.parse(data))
    ini.receive_data(login_response(ini, offer + [
        ("MaxOutstandingR2T", "4"), ("DataDigest", "CRC32C,None"), ("X-com.example", "1"),
        ("MaxRecvDataSegmentLength", "4096"), ("TargetPortalGroupTag", "3")], transit=False))
    ((bhs, data),) = sent(ini)
    assert bhs.flags & pdu.F_TRANSIT and (bhs.flags >> 2) & 3 == 1
    assert text.parse(data) == [("MaxOutstandingR2T", "1"), ("DataDigest", "None"),
                                ("X-com.example", "NotUnderstood")]
    ini.receive_data(login_response(ini, [], stat_sn=8))
    done = ini.next_event()
    assert isinstance(done, LoginComplete) and done.unanswered == ()
    assert done.params.target_max_recv_data_segment_length == 4096
    assert done.params.target_portal_group_tag == 3 and done.tsih == 9


@pytest.mark.parametrize("key,value", [("HeaderDigest", "CRC32C"), ("MaxBurstLength", "99999999"),
                                       ("ImmediateData", "Maybe"), ("InitialR2T", "Yes"),
                                       ("FirstBurstLength", "1048576")])
def test_refuses_an_answer_outside_the_offer(key: str, value: str) -> None:
    ini = InitiatorConnection("iqn.x:ini", target_name=TARGET,
                              keys={"InitialR2T": "Yes", "FirstBurstLength": 65536})
    ini.start_login()
    ((_, data),) = sent(ini)
    answers = [(k, value if k == key else v) for k, v in echo(text.parse(data))]
    if key == "InitialR2T":
        answers = [(k, "No" if k == key else v) for k, v in answers]  # OR: Yes stays Yes
    with pytest.raises(ProtocolError):
        ini.receive_data(login_response(ini, answers))
    assert ini.state is State.FAILED


def test_reserved_answers_keep_the_defaults() -> None:
    ini = InitiatorConnection("iqn.x:ini", target_name=TARGET)
    ini.start_login()
    ((_, data),) = sent(ini)
    answers = [(k, "Reject" if k == "MaxBurstLength" else
                "NotUnderstood" if k == "ImmediateData" else v)
               for k, v in echo(text.parse(data))]
    ini.receive_data(login_response(ini, answers))
    done = ini.next_event()
    assert isinstance(done, LoginComplete)
    assert done.params.max_burst_length == 262144 and done.params.immediate_data


def _continued(ini: InitiatorConnection, cut: int) -> bytes:
    """Send the first `cut` bytes of the target's answers with the C bit; return the rest."""
    ini.start_login()
    ((_, data),) = sent(ini)
    whole = text.encode(echo(text.parse(data)))
    hdr = pdu.login_response(pdu.F_CONTINUE | 1 << 2, 0, 0, cut, ini.isid, 0, 1, 7, 1, 1, 0, 0)
    ini.receive_data(frame(hdr, whole[:cut]))
    ((bhs, data),) = sent(ini)  # an empty request asks for the rest
    assert data == b"" and not bhs.flags & (pdu.F_TRANSIT | pdu.F_CONTINUE)
    return whole[cut:]


def test_continued_login_response() -> None:
    ini = InitiatorConnection("iqn.x:ini", target_name=TARGET)
    rest = _continued(ini, 30)
    hdr = pdu.login_response(1 << 2, 0, 0, len(rest), ini.isid, 0, 1, 8, 1, 1, 0, 0)
    ini.receive_data(frame(hdr, rest))
    ((bhs, data),) = sent(ini)  # now the initiator asks to move on
    assert data == b"" and bhs.flags & pdu.F_TRANSIT
    ini.receive_data(login_response(ini, [], stat_sn=9))
    assert isinstance(ini.next_event(), LoginComplete)


def test_transit_without_being_asked() -> None:
    ini = InitiatorConnection("iqn.x:ini", target_name=TARGET)
    rest = _continued(ini, 30)
    with pytest.raises(ProtocolError):  # T=1 answering a request with T=0
        ini.receive_data(frame(pdu.login_response(pdu.F_TRANSIT | 1 << 2 | 3, 0, 0, len(rest),
                                                  ini.isid, 9, 1, 8, 1, 8, 0, 0), rest))


def test_login_failure_is_an_event() -> None:
    ini = InitiatorConnection("iqn.x:ini", target_name=TARGET)
    ini.start_login()
    ini.data_to_send()
    ini.receive_data(login_response(ini, [], transit=False, status=0x0203))
    event = ini.next_event()
    assert isinstance(event, LoginFailed) and event.status == 0x0203
    assert ini.state is State.FAILED


def test_window_holds_commands_until_max_cmd_sn_allows() -> None:
    ini = logged_in()  # MaxCmdSN = CmdSN + 7
    for _ in range(10):
        ini.send_command(0, TUR)
    assert [b.cmd_sn for b, _ in sent(ini)] == list(range(1, 9)) and ini.queued == 2
    ini.receive_data(frame(pdu.nop_in(pdu.RESERVED_TAG, pdu.RESERVED_TAG, 0, 8, 3, 5)))
    assert sent(ini) == [] and ini.queued == 2  # MaxCmdSN never moves backwards
    ini.receive_data(frame(pdu.nop_in(pdu.RESERVED_TAG, pdu.RESERVED_TAG, 0, 8, 100, 3)))
    assert sent(ini) == []  # MaxCmdSN < ExpCmdSN - 1: both ignored (RFC 7143 4.2.2.1)
    ini.receive_data(frame(pdu.nop_in(pdu.RESERVED_TAG, pdu.RESERVED_TAG, 0, 8, 3, 10)))
    assert [b.cmd_sn for b, _ in sent(ini)] == [9, 10] and ini.queued == 0


def test_immediate_requests_pass_a_closed_window() -> None:
    ini = logged_in()
    for _ in range(9):
        ini.send_command(0, TUR)
    sent(ini)
    ini.send_nop(b"x")
    ini.send_tmf(pdu.TmfFunction.ABORT_TASK_SET, 0)
    out = sent(ini)
    assert [b.opcode for b, _ in out] == [Op.NOP_OUT, Op.TASK_MGMT_REQ]
    assert all(b.immediate and b.cmd_sn == 9 for b, _ in out)


@pytest.mark.parametrize("make", [
    lambda itt: pdu.scsi_response(itt, 0, 9, 1, 8, 0, 0, 0, 0),  # StatSN skips 8
    lambda itt: pdu.data_in(itt, 0x80, 0, 4, 0, 8, 1, 8, 1, 0, 0),  # DataSN starts at 1
    lambda itt: pdu.data_in(itt, 0x80, 0, 4, 0, 8, 1, 8, 0, 510, 0),  # beyond the buffer
    lambda itt: pdu.data_in(itt + 1, 0x80, 0, 4, 0, 8, 1, 8, 0, 0, 0),  # unknown ITT
    lambda itt: pdu.r2t(itt, 5, 0, 8, 1, 8, 0, 0, 512),  # R2T for a read
    lambda itt: pdu.login_response(0, 0, 0, 0, bytes(6), 0, itt, 8, 1, 8, 0, 0),
    lambda itt: bytes([0x3C]) + bytes(47),  # no such target opcode
])
def test_protocol_errors(make) -> None:  # type: ignore[no-untyped-def]
    ini = logged_in()
    itt = ini.send_command(0, bytes(10), read_length=512)
    ini.data_to_send()
    hdr = bytearray(make(itt))
    body = bytes(hdr[7]) if hdr[0] == Op.DATA_IN else b""
    with pytest.raises(ProtocolError):
        ini.receive_data(frame(hdr, body))
    assert ini.state is State.FAILED


def test_header_digest_mismatch() -> None:
    ini = logged_in(header_digest=True)
    assert ini.params.header_digest
    wire = bytearray(frame(pdu.nop_in(pdu.RESERVED_TAG, pdu.RESERVED_TAG, 0, 8, 1, 8),
                           header_digest=True))
    wire[-1] ^= 1
    with pytest.raises(ProtocolError):
        ini.receive_data(bytes(wire))


def test_target_ping_is_answered() -> None:
    ini = logged_in()
    ini.receive_data(frame(pdu.nop_in(pdu.RESERVED_TAG, 0x55, pdu.encode_lun(3), 8, 1, 8)))
    ((bhs, _),) = sent(ini)
    assert (bhs.opcode, bhs.itt, bhs.ttt, bhs.immediate) == (Op.NOP_OUT, pdu.RESERVED_TAG,
                                                             0x55, True)
    assert pdu.decode_lun(bhs.lun) == 3 and bhs.exp_stat_sn == 8


def test_async_message() -> None:
    ini = logged_in()
    ini.receive_data(frame(pdu.async_message(pdu.AsyncEvent.REQUEST_LOGOUT, 8, 1, 8,
                                             parameter3=5)))
    event = ini.next_event()
    assert isinstance(event, AsyncMessage)
    assert (event.event, event.parameter3) == (pdu.AsyncEvent.REQUEST_LOGOUT, 5)
    assert ini.exp_stat_sn == 9


def test_unsolicited_data_is_limited_by_first_burst() -> None:
    ini = InitiatorConnection("iqn.x:ini", target_name=TARGET,
                              keys={"InitialR2T": False, "ImmediateData": True,
                                    "FirstBurstLength": 8192})
    ini.start_login()
    ((_, data),) = sent(ini)
    ini.receive_data(login_response(ini, echo(text.parse(data)) + [
        ("MaxRecvDataSegmentLength", "2048")]))
    ini.next_event()
    ini.send_command(0, bytes(10), bytes(32768))
    out = sent(ini)
    assert out[0][0].data_segment_length == 2048 and not out[0][0].final
    outs = [b for b, _ in out[1:]]
    assert [(b.buffer_offset, b.data_sn, b.final) for b in outs] == [
        (2048, 0, False), (4096, 1, False), (6144, 2, True)]
    assert all(b.ttt == pdu.RESERVED_TAG for b in outs)
