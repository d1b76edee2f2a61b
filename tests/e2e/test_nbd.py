"""The NBD front end against QEMU's NBD client (qemu-img, qemu-io), with qemu-nbd serving a copy
of the same image as the reference for what the answers should be."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TARGET_IQN, LiveTarget, start_target, write_config

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None
                                or shutil.which("qemu-io") is None
                                or shutil.which("qemu-nbd") is None,
                                reason="qemu-utils (qemu-img, qemu-io, qemu-nbd) not installed")

EXPORT = f"{TARGET_IQN}/0"
SIZE = 64 << 20


@pytest.fixture
def nbd_target(tmp_path: Path) -> Iterator[tuple[LiveTarget, int]]:
    target = start_target(write_config(tmp_path, nbd="127.0.0.1:0"))
    try:
        port = 0
        for _ in range(200):
            m = re.search(r"NBD exports served on 127\.0\.0\.1:(\d+)", target.log_text())
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.05)
        assert port, target.log_text()
        yield target, port
    finally:
        target.stop()


def qemu(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def io(url: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return qemu(*args, url)


def mapping(url: str) -> list[dict[str, object]]:
    extents = json.loads(qemu("qemu-img", "map", "--output=json", "-f", "raw", url))
    return [{k: e[k] for k in ("start", "length", "zero", "data")} for e in extents]


WORKLOAD = ("write -P 0xab 0 64k", "write -P 0xcd 1M 2M", "discard 1536k 512k",
            "write -P 0x22 4M 2M", "write -z -u 4M 1M", "write -P 0x11 8M 64k")


def test_qemu_io_and_map_match_qemu_nbd(nbd_target: tuple[LiveTarget, int],
                                        tmp_path: Path) -> None:
    target, port = nbd_target
    url = f"nbd://127.0.0.1:{port}/{EXPORT}"
    info = json.loads(qemu("qemu-img", "info", "--output=json", url))
    assert info["virtual-size"] == SIZE
    out = io(url, *WORKLOAD, "read -P 0xab 0 64k", "read -P 0xcd 1M 512k",
             "read -P 0 1536k 512k", "read -P 0 4M 1M", "read -P 0x22 5M 1M",
             "read -P 0x11 8M 64k")
    assert "Pattern verification failed" not in out, out
    ours = mapping(url)
    # holes where UNMAP (discard) and WRITE SAME with UNMAP (write -z -u) deallocated
    assert {"start": 1536 << 10, "length": 512 << 10, "zero": True, "data": False} in ours
    assert {"start": 3 << 20, "length": 2 << 20, "zero": True, "data": False} in ours

    reference = tmp_path / "reference.img"
    fresh = tmp_path / "fresh.img"
    subprocess.run(["truncate", "-s", str(SIZE), str(fresh)], check=True)
    with _qemu_nbd(fresh) as ref_port:
        io(f"nbd://127.0.0.1:{ref_port}/ref", *WORKLOAD)
        theirs = mapping(f"nbd://127.0.0.1:{ref_port}/ref")
    shutil.copy(fresh, reference)
    assert ours == theirs
    converted = tmp_path / "converted.raw"
    qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(converted))
    assert converted.read_bytes() == reference.read_bytes()
    allocated = converted.stat().st_blocks * 512
    assert allocated < 8 << 20, f"holes were not kept: {allocated} bytes allocated"

    # write -z without -u (NBD_CMD_FLAG_NO_HOLE) leaves the blocks allocated: real zeroes on
    # a thin LUN (qemu-nbd uses FALLOC_FL_ZERO_RANGE, which this filesystem reports as a hole)
    out = io(url, "write -z 8M 32k", "read -P 0 8M 32k", "read -P 0x11 8224k 32k")
    assert "Pattern verification failed" not in out, out
    assert {"start": 8 << 20, "length": 64 << 10, "zero": False, "data": True} in mapping(url)


class _qemu_nbd:  # noqa: N801 (a context manager used like a function)
    """qemu-nbd serving `image` as export "ref" on an ephemeral loopback port."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "ref",
             "--persistent", "--shared=4", "--discard=unmap", str(self.image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("qemu-nbd did not start") from None
                time.sleep(0.05)
        raise RuntimeError("qemu-nbd never listened")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(30)


def test_list_and_unknown_export(nbd_target: tuple[LiveTarget, int]) -> None:
    target, port = nbd_target
    done = subprocess.run(["qemu-img", "info", f"nbd://127.0.0.1:{port}/{TARGET_IQN}/9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    # the empty name is the default export when a client sees exactly one
    info = json.loads(qemu("qemu-img", "info", "--output=json", f"nbd://127.0.0.1:{port}"))
    assert info["virtual-size"] == SIZE
    if shutil.which("nbdinfo"):
        listing = qemu("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}")
        assert [e["export-name"] for e in json.loads(listing)["exports"]] == [EXPORT]


def test_reload_removes_and_adds_the_listener(nbd_target: tuple[LiveTarget, int],
                                              tmp_path: Path) -> None:
    target, port = nbd_target
    write_config(tmp_path)  # the same target, without `nbd`
    target.process.send_signal(signal.SIGHUP)
    _wait_for(target, "NBD listener closed")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    write_config(tmp_path, nbd=f"127.0.0.1:{port}")
    target.process.send_signal(signal.SIGHUP)
    _wait_for(target, f"NBD exports served on 127.0.0.1:{port}", after="NBD listener closed")
    info = json.loads(qemu("qemu-img", "info", "--output=json",
                           f"nbd://127.0.0.1:{port}/{EXPORT}"))
    assert info["virtual-size"] == SIZE


def _wait_for(target: LiveTarget, text: str, after: str = "") -> None:
    for _ in range(400):
        log = target.log_text()
        if text in (log.split(after, 1)[-1] if after else log):
            return
        time.sleep(0.05)
    raise AssertionError(f"never logged {text!r}:\n{target.log_text()}")


def _pki(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in the layout QEMU's
    tls-creds-x509 reads (ca-cert.pem, client-cert.pem, client-key.pem)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out",
        "ca-cert.pem", "-days", "2", "-subj", "/CN=pytarget test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{name}.ext").write_text(ext)
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile",
            f"{name}.ext")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_starttls_with_x509_certificates(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _pki(pki)
    anonymous = tmp_path / "anonymous"  # trusts the CA, has no client certificate
    anonymous.mkdir()
    shutil.copy(pki / "ca-cert.pem", anonymous)
    config = write_config(tmp_path, nbd="127.0.0.1:0", nbd_tls={
        "cert": "pki/server-cert.pem", "key": "pki/server-key.pem", "ca": "pki/ca-cert.pem"})
    target = start_target(config)
    try:
        _wait_for(target, "NBD exports served on")
        m = re.search(r"NBD exports served on 127\.0\.0\.1:(\d+)", target.log_text())
        assert m
        port = m.group(1)
        plain = subprocess.run(["qemu-img", "info", f"nbd://127.0.0.1:{port}/{EXPORT}"],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0 and "TLS is required" in plain.stderr

        def opts(creds: Path) -> list[str]:
            return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
                    "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},"
                    f"export={EXPORT},tls-creds=tls0"]

        out = qemu("qemu-io", *opts(pki), "-c", "write -P 0x5a 0 1M", "-c",
                   "read -P 0x5a 0 1M", "-c", "discard 512k 512k")
        assert "Pattern verification failed" not in out
        extents = json.loads(qemu("qemu-img", "map", "--output=json", *opts(pki)))
        assert [(e["start"], e["length"], e["data"]) for e in extents[:2]] == [
            (0, 512 << 10, True), (512 << 10, (64 << 20) - (512 << 10), False)]
        refused = subprocess.run(["qemu-img", "info", *opts(anonymous)], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode != 0
        _wait_for(target, "TLS failed")
    finally:
        target.stop()
