"""The scapy layers of tools/iscsi_scapy.py against the project's own PDU codec, and
tools/dissect on a capture made from an in-memory session (digests, retransmissions)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from pytarget.iscsi import pdu as P
from pytarget.iscsi.pdu import Bhs

from ...conftest import REPO
from .harness import Pair, read10, write10

sys.path.insert(0, str(REPO / "tools"))
scapy_layers = pytest.importorskip("iscsi_scapy")
from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw, fuzz  # noqa: E402
from scapy.utils import wrpcap  # noqa: E402

L = scapy_layers


def test_every_pdu_type_is_48_bytes_and_dissects_to_its_class() -> None:
    assert len(L.PDU_CLASSES) == 18
    for opcode, cls in L.PDU_CLASSES.items():
        raw = bytes(cls())
        assert len(raw) == 48 and raw[0] & 0x3F == opcode
        assert type(L.ISCSI(raw)) is cls
    assert type(L.ISCSI(bytes([0x1C]) + bytes(47))) is L.ISCSIUnknown


def test_fields_match_the_projects_codec() -> None:
    cmd = L.ISCSICommand(I=1, R=1, ATTR=2, LUN=1 << 48, ITT=0x1234,
                         ExpectedDataTransferLength=4096, CmdSN=77, ExpStatSN=5,
                         CDB=read10(9, 8).ljust(16, b"\0"), data=b"abcde")
    raw = bytes(cmd)
    bhs = Bhs(raw)
    assert (bhs.opcode, bhs.immediate, bhs.itt, bhs.cmd_sn, bhs.exp_stat_sn) == \
        (P.Op.SCSI_CMD, True, 0x1234, 77, 5)
    assert bhs.expected_data_transfer_length == 4096 and bhs.flags == 0x80 | 0x40 | 2
    assert P.decode_lun(bhs.lun) == 1 and bhs.data_segment_length == 5
    assert len(raw) == 48 + 8  # five bytes of data, three of padding
    r2t = L.ISCSI(bytes(P.r2t(7, 9, 0, 10, 11, 12, 3, 4096, 8192)))
    assert (r2t.ITT, r2t.TTT, r2t.StatSN, r2t.ExpCmdSN, r2t.MaxCmdSN, r2t.R2TSN,
            r2t.BufferOffset, r2t.DesiredDataTransferLength) == (7, 9, 10, 11, 12, 3, 4096, 8192)


def test_fuzzed_pdus_always_build_and_dissect() -> None:
    random.seed(3)
    for _ in range(100):
        for cls in L.REQUEST_CLASSES:
            L.ISCSI(bytes(fuzz(cls())))


def _session_streams() -> list[tuple[str, bytes]]:
    """Initiator and target bytes of a login (with digests), a write and a read, in order."""
    p = Pair(header_digest=True, data_digest=True)
    chunks: list[tuple[str, bytes]] = []
    original = p.conn.data_to_send

    def recording() -> list:  # type: ignore[type-arg]
        out = original()
        if out:
            chunks.append(("T", b"".join(bytes(b) for b in out)))
        return out

    p.conn.data_to_send = recording  # type: ignore[method-assign]
    original_to_target = p.to_target

    def to_target(data: bytes) -> None:
        chunks.append(("I", data))
        original_to_target(data)

    p.to_target = to_target  # type: ignore[method-assign]
    p.login()
    p.command(0, write10(0, 8), b"\x11" * 4096)
    p.command(0, read10(0, 8), read_length=4096)
    return chunks


def test_dissect_reads_a_capture(tmp_path: Path) -> None:
    packets = []
    seq = {"I": 1000, "T": 5000}
    ini, tgt = ("10.9.9.1", 40000), ("10.9.9.2", 3260)
    syn = Ether() / IP(src=ini[0], dst=tgt[0]) / TCP(sport=ini[1], dport=tgt[1], flags="S",
                                                      seq=seq["I"] - 1)
    packets.append(syn)
    for direction, data in _session_streams():
        src, dst = (ini, tgt) if direction == "I" else (tgt, ini)
        for i in range(0, len(data), 1000):
            segment = data[i:i + 1000]
            pkt = Ether() / IP(src=src[0], dst=dst[0]) / TCP(
                sport=src[1], dport=dst[1], flags="PA", seq=seq[direction]) / Raw(segment)
            packets.append(pkt)
            if i == 0 and direction == "T":
                packets.append(pkt.copy())  # a retransmission
            seq[direction] += len(segment)
    path = tmp_path / "session.pcap"
    wrpcap(str(path), packets)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "dissect"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ops = [line.split(" I>T ")[-1] if " I>T " in line else line.split(" T>I ")[-1]
           for line in lines]
    names = [" ".join(o.split()[1:3]) for o in ops]
    assert names[0].startswith("Login Request") and names[1].startswith("Login Response")
    assert "DIGEST ERROR" not in proc.stdout
    assert any("SCSI Command" in line and "CDB=2a" in line for line in lines)
    assert any("SCSI Data-In" in line for line in lines)
    assert any("SCSI Response" in line for line in lines)
    assert "HeaderDigest=CRC32C" in proc.stdout


def test_split_stream_checks_digests() -> None:
    raw = L.build(L.ISCSINopOut(data=b"ping"), header_digest=True, data_digest=True,
                  corrupt_data_digest=True)
    [frame], rest = L.split_stream(raw + b"\x00" * 10, True, True)
    assert frame.header_digest_ok and frame.data_digest_ok is False and rest == bytes(10)
