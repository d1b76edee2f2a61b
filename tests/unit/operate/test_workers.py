"""The parent's side of `workers: N` without processes: a connection's socket handed over a
channel arrives as the same connection, messages keep their boundaries, logins are routed by
session name, each worker allocates its own TSIHs, and the relay acknowledges a change to its
author only once every other worker has."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from pytarget.config import parse
from pytarget.iscsi.target import TargetRegistry
from pytarget.workers import (
    Router,
    Supervisor,
    _Worker,
    channel_pair,
    first_pdu_length,
    receive_message,
    send_message,
    session_name,
)


def login_pdu(initiator: str, isid: bytes) -> bytes:
    """A first Login Request: BHS, then its text keys padded to four bytes."""
    data = f"InitiatorName={initiator}\0SessionType=Normal\0".encode()
    bhs = struct.pack(">BBBBB3s6sH", 0x43, 0x87, 0, 0, 0, len(data).to_bytes(3, "big"),
                      isid, 0) + bytes(32)
    return bhs + data + bytes(-len(data) % 4)


def test_a_handed_over_socket_is_the_same_connection() -> None:
    parent, worker = channel_pair()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        send_message(parent, {"op": "connection"}, accepted.fileno())
        send_message(parent, {"op": "portals", "portals": [["127.0.0.1", 3260]]})
        accepted.close()
        message, fd = receive_message(worker)
        assert message == {"op": "connection"} and fd is not None
        handed = socket.socket(fileno=fd)
        client.sendall(b"login")
        assert handed.recv(16) == b"login"
        handed.sendall(b"response")
        assert client.recv(16) == b"response"
        handed.close()
        assert receive_message(worker) == ({"op": "portals",
                                            "portals": [["127.0.0.1", 3260]]}, None)
        parent.close()
        assert receive_message(worker) == (None, None)
    finally:
        for sock in (client, server, worker):
            sock.close()


def test_sessions_are_spread_and_stay_with_their_worker() -> None:
    router = Router(2)
    first = login_pdu("iqn.1993-08.org.debian:01:host-a", b"\x00\x02\x3d\0\0\x01")
    other_host = login_pdu("iqn.1993-08.org.debian:01:host-b", b"\x00\x02\x3d\0\0\x01")
    second = login_pdu("iqn.1993-08.org.debian:01:host-a", b"\x00\x02\x3d\0\0\x02")
    assert [router.route(first), router.route(other_host), router.route(second)] == [0, 1, 0]
    # a session's next connection and its reinstatement: the same worker
    assert [router.route(other_host), router.route(first), router.route(second)] == [1, 0, 0]
    assert router.route(bytes(48)) == 0  # not a login: worker 0 answers it
    assert session_name(login_pdu("IQN.X", b"\x80\0\0\0\0\x01")) == ("iqn.x", b"\x80\0\0\0\0\x01")


def test_the_router_forgets_the_oldest_session() -> None:
    router = Router(2, memory=2)
    pdus = [login_pdu(f"iqn.2026-01.x:{n}", b"\x80\0\0\0\0\x01") for n in range(3)]
    assert [router.route(p) for p in pdus] == [0, 1, 0]
    assert router.route(pdus[2]) == 0 and router.route(pdus[1]) == 1
    assert router.route(pdus[0]) == 1  # forgotten: a new session, the next worker in turn


def test_the_first_pdu_is_read_whole() -> None:
    pdu = login_pdu("iqn.2026-01.x:host", b"\x80\0\0\0\0\x01")
    data = len(b"InitiatorName=iqn.2026-01.x:host\0SessionType=Normal\0")
    assert first_pdu_length(pdu) == 48 + data  # the padding need not have arrived
    assert first_pdu_length(pdu[:20]) == 48  # not yet a whole header
    assert first_pdu_length(bytes(48)) == 48  # not a login: its header is enough
    huge = pdu[:5] + (1 << 20).to_bytes(3, "big") + pdu[8:]
    assert first_pdu_length(huge) == 48 + 8192  # the router reads no more than this


def test_each_worker_allocates_its_own_tsihs() -> None:
    registries = [TargetRegistry(), TargetRegistry()]
    for index, registry in enumerate(registries):
        registry.share_tsihs(index, 2)
    first = [registries[0]._allocate_tsih() for _ in range(3)]
    second = [registries[1]._allocate_tsih() for _ in range(3)]
    assert first == [1, 3, 5] and second == [2, 4, 6]
    registries[1]._next_tsih = 0xFFFE
    assert [registries[1]._allocate_tsih() for _ in range(2)] == [0xFFFE, 2]


def test_a_change_is_acknowledged_once_every_other_worker_handled_it(tmp_path: Path) -> None:
    """The parent's relay: an announce reaches every other worker as a notice; the author
    hears `acked` only after the last acknowledgement, or once a silent worker is gone."""
    config = parse("targets: [{name: 'iqn.2026-11.io.pytarget:t', luns: []}]\nworkers: 3\n",
                   str(tmp_path / "pytarget.yaml"), tmp_path)
    supervisor = Supervisor(config, None, None)
    pairs = [channel_pair() for _ in range(3)]
    ends = [worker_end for _, worker_end in pairs]

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for index, (parent_end, _) in enumerate(pairs):
            worker = _Worker(index, 0, parent_end)
            supervisor.workers.append(worker)
            loop.add_reader(parent_end.fileno(), supervisor._readable, worker)

        async def receive(end: socket.socket) -> dict[str, Any]:
            ready = loop.create_future()
            loop.add_reader(end.fileno(), ready.set_result, None)
            await ready
            loop.remove_reader(end.fileno())
            message, _ = receive_message(end)
            assert message is not None
            return message

        send_message(ends[0], {"op": "announce", "key": "/lun0.workers.pr", "version": 7,
                               "id": 41})
        notices = [await receive(ends[1]), await receive(ends[2])]
        assert [n["key"] for n in notices] == ["/lun0.workers.pr"] * 2
        send_message(ends[1], {"op": "ack", "id": notices[0]["id"]})
        while [r.waiting for r in supervisor._rounds.values()] != [{2}]:
            await asyncio.sleep(0)  # until the parent has taken worker 1's acknowledgement
        ends[0].setblocking(False)
        with pytest.raises(BlockingIOError):
            ends[0].recv(1)  # nothing for the author yet: worker 2 has not acknowledged
        ends[0].setblocking(True)
        supervisor.stopping = True  # worker 2 goes away as at shutdown
        ends[2].close()
        assert await receive(ends[0]) == {"op": "acked", "id": 41}

    try:
        asyncio.run(go())
    finally:
        for parent_end, worker_end in pairs:
            parent_end.close()
            worker_end.close()
