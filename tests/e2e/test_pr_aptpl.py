"""APTPL across a crash: two initiators register with APTPL=1, one reserves, the target is
killed with SIGKILL and restarted, and READ FULL STATUS shows the same registrations and
reservation (and the reservation is enforced again). APTPL=0 then lets a restart forget them.

The test speaks iSCSI itself through `MiniInitiator`, a deliberately small client (login without
authentication, one command at a time), so it depends on nothing but the target.
"""

from __future__ import annotations

import signal
import socket
import struct
from pathlib import Path

from ..conftest import INITIATOR1, INITIATOR2, LiveTarget, start_target, write_config

INITIATOR3 = "iqn.2026-11.io.pytarget.test:initiator3"
ISID_A = bytes.fromhex("400001370001")  # fixed ISIDs: the same I_T nexuses after the restart
ISID_B = bytes.fromhex("400001370002")
ISID_C = bytes.fromhex("400001370003")
KEY_A = 0x1111_2222_3333_4444
KEY_B = 0xBBBB_0000_0000_000B
WE_RO = 5
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
REGISTER, RESERVE = 0x00, 0x01
READ_KEYS, READ_RESERVATION, READ_FULL_STATUS = 0x00, 0x01, 0x03


class MiniInitiator:
    """One iSCSI connection (RFC 7143): login, then SCSI commands one at a time."""

    def __init__(self, target: LiveTarget, name: str, isid: bytes) -> None:
        self.name = name
        self.isid = isid
        self.sock = socket.create_connection((target.host, target.port), timeout=20)
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        self.itt = 0
        self._login(target.iqn)

    def close(self) -> None:
        self.sock.close()

    # ---------------------------------------------------------------- PDUs
    def _send(self, bhs: bytearray, data: bytes = b"") -> None:
        bhs[5:8] = len(data).to_bytes(3, "big")
        self.sock.sendall(bytes(bhs) + data + bytes(-len(data) % 4))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("target closed the connection")
            buf += chunk
        return bytes(buf)

    def _recv(self) -> tuple[bytes, bytes]:
        bhs = self._recv_exact(48)
        ahs = bhs[4] * 4
        dsl = int.from_bytes(bhs[5:8], "big")
        rest = self._recv_exact(ahs + dsl + (-dsl % 4))
        return bhs, rest[ahs:ahs + dsl]

    def _next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def _login(self, target_iqn: str) -> None:
        keys = {"InitiatorName": self.name, "TargetName": target_iqn, "SessionType": "Normal",
                "HeaderDigest": "None", "DataDigest": "None", "ImmediateData": "Yes",
                "InitialR2T": "No", "MaxRecvDataSegmentLength": "262144",
                "ErrorRecoveryLevel": "0"}
        data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        itt = self._next_itt()
        for _ in range(4):
            bhs = bytearray(48)
            bhs[0] = 0x43  # Login Request, immediate
            bhs[1] = 0x80 | (1 << 2) | 3  # T, CSG operational, NSG full feature
            bhs[8:14] = self.isid
            struct.pack_into(">IHxxII", bhs, 16, itt, 0, self.cmd_sn, self.exp_stat_sn)
            self._send(bhs, data)
            rsp, _ = self._recv()
            assert rsp[0] & 0x3F == 0x23, rsp[0]
            assert rsp[36] == 0, f"login failed: status {rsp[36]:02x}{rsp[37]:02x}"
            self.exp_stat_sn = struct.unpack_from(">I", rsp, 24)[0] + 1
            if rsp[1] & 0x80 and rsp[1] & 0x03 == 3:
                return
            data = b""
        raise AssertionError("login did not reach full feature phase")

    def command(self, cdb: bytes, data_out: bytes = b"", read_length: int = 0
                ) -> tuple[int, bytes, bytes]:
        """Run one command: (status, sense, Data-In)."""
        itt = self._next_itt()
        bhs = bytearray(48)
        bhs[0] = 0x01
        bhs[1] = 0x80 | (0x40 if read_length else 0) | (0x20 if data_out else 0) | 0x01
        edtl = len(data_out) or read_length
        struct.pack_into(">IIII", bhs, 16, itt, edtl, self.cmd_sn, self.exp_stat_sn)
        bhs[32:32 + len(cdb)] = cdb
        self.cmd_sn += 1
        self._send(bhs, data_out)
        data_in = bytearray()
        while True:
            rsp, data = self._recv()
            opcode = rsp[0] & 0x3F
            if opcode == 0x20:  # NOP-In: answer a ping
                ttt = rsp[20:24]
                if ttt != b"\xff\xff\xff\xff":
                    nop = bytearray(48)
                    nop[0], nop[1] = 0x40, 0x80
                    nop[16:20] = b"\xff\xff\xff\xff"
                    nop[20:24] = ttt
                    struct.pack_into(">II", nop, 24, self.cmd_sn, self.exp_stat_sn)
                    self._send(nop)
                continue
            if opcode == 0x31:  # R2T: send what it asks for
                offset, length = struct.unpack_from(">II", rsp, 40)
                out = bytearray(48)
                out[0], out[1] = 0x05, 0x80
                out[16:24] = rsp[16:24]
                struct.pack_into(">I", out, 28, self.exp_stat_sn)
                struct.pack_into(">II", out, 36, 0, offset)
                self._send(out, data_out[offset:offset + length])
                continue
            if opcode == 0x25:  # Data-In
                data_in += data
                if rsp[1] & 0x01:
                    self.exp_stat_sn = struct.unpack_from(">I", rsp, 24)[0] + 1
                    return rsp[3], b"", bytes(data_in)
                continue
            assert opcode == 0x21, f"unexpected PDU opcode 0x{opcode:02x}"
            self.exp_stat_sn = struct.unpack_from(">I", rsp, 24)[0] + 1
            sense = data[2:2 + int.from_bytes(data[:2], "big")] if len(data) >= 2 else b""
            return rsp[3], sense, bytes(data_in)

    # ---------------------------------------------------------------- SCSI
    def clear_unit_attentions(self) -> None:
        for _ in range(10):
            status, sense, _ = self.command(bytes(6))
            if status != CHECK_CONDITION or sense[2] & 0x0F != 0x6:
                return
        raise AssertionError("unit attentions never end")

    def prout(self, sa: int, key: int, sa_key: int = 0, rtype: int = 0, aptpl: bool = False,
              all_tg_pt: bool = False) -> int:
        flags = (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
        data = struct.pack(">QQ4xB3x", key, sa_key, flags)
        cdb = bytes((0x5F, sa, rtype, 0, 0)) + len(data).to_bytes(4, "big") + b"\0"
        status, sense, _ = self.command(cdb, data)
        assert status != CHECK_CONDITION, sense.hex()
        return status

    def prin(self, sa: int) -> bytes:
        cdb = bytes((0x5E, sa, 0, 0, 0, 0, 0)) + (8192).to_bytes(2, "big") + b"\0"
        status, sense, data = self.command(cdb, read_length=8192)
        assert status == GOOD, sense.hex()
        return data

    def write(self, lba: int = 8) -> int:
        cdb = bytes((0x2A, 0)) + lba.to_bytes(4, "big") + bytes((0, 0, 1, 0))
        return self.command(cdb, b"\xA5" * 512)[0]


def full_status(data: bytes) -> tuple[int, list[tuple[int, int, int, int, str]]]:
    """(generation, [(key, flags, scope/type, rtpi, TransportID text)])."""
    generation, length = struct.unpack_from(">II", data)
    assert length == len(data) - 8
    out, at = [], 8
    while at < len(data):
        tid_len = struct.unpack_from(">I", data, at + 20)[0]
        tid = data[at + 24:at + 24 + tid_len]
        assert tid[0] in (0x05, 0x45)
        out.append((int.from_bytes(data[at:at + 8], "big"), data[at + 12], data[at + 13],
                    struct.unpack_from(">H", data, at + 18)[0],
                    tid[4:].split(b"\0")[0].decode()))
        at += 24 + tid_len
    return generation, out


def connect(target: LiveTarget, name: str, isid: bytes) -> MiniInitiator:
    ini = MiniInitiator(target, name, isid)
    ini.clear_unit_attentions()
    return ini


def test_aptpl_survives_sigkill(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    state = tmp_path / "lun0.img.pr.json"
    target = start_target(config, log_name="pytarget-1.log")
    try:
        a = connect(target, INITIATOR1, ISID_A)
        b = connect(target, INITIATOR2, ISID_B)
        assert a.prout(REGISTER, 0, KEY_A, aptpl=True) == GOOD
        assert b.prout(REGISTER, 0, KEY_B, aptpl=True, all_tg_pt=True) == GOOD
        assert a.prout(RESERVE, KEY_A, rtype=WE_RO) == GOOD
        generation, before = full_status(a.prin(READ_FULL_STATUS))
        assert generation == 2
        assert before == [
            (KEY_A, 0x01, WE_RO, 1, f"{INITIATOR1},i,0x{ISID_A.hex()}"),
            (KEY_B, 0x02, 0x00, 1, f"{INITIATOR2},i,0x{ISID_B.hex()}"),
        ]
        assert state.exists()
        a.close()
        b.close()
    finally:
        assert target.stop(signal.SIGKILL) == -signal.SIGKILL

    target = start_target(config, log_name="pytarget-2.log")
    try:
        a = connect(target, INITIATOR1, ISID_A)
        b = connect(target, INITIATOR2, ISID_B)
        c = connect(target, INITIATOR3, ISID_C)
        generation, after = full_status(c.prin(READ_FULL_STATUS))
        assert generation == 0  # PRGENERATION restarts at power on (SPC-4 6.15.2)
        assert after == before
        reservation = c.prin(READ_RESERVATION)
        assert int.from_bytes(reservation[8:16], "big") == KEY_A and reservation[21] == WE_RO
        assert a.write() == GOOD  # the holder
        assert b.write() == GOOD  # a registrant, Write Exclusive - Registrants Only
        assert c.write() == RESERVATION_CONFLICT
        a_new_isid = connect(target, INITIATOR1, ISID_C)  # a new I_T nexus: not registered
        assert a_new_isid.write() == RESERVATION_CONFLICT
        a_new_isid.close()
        # APTPL=0 in a later REGISTER: a restart forgets everything
        assert b.prout(REGISTER, KEY_B, KEY_B) == GOOD
        assert not state.exists()
        for ini in (a, b, c):
            ini.close()
    finally:
        assert target.stop(signal.SIGKILL) == -signal.SIGKILL

    target = start_target(config, log_name="pytarget-3.log")
    try:
        c = connect(target, INITIATOR3, ISID_C)
        assert c.prin(READ_KEYS) == bytes(8)
        assert c.prin(READ_RESERVATION) == bytes(8)
        assert c.write() == GOOD
        c.close()
    finally:
        target.stop()
