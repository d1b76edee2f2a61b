"""The metrics endpoint of a live target, read by a strict parser of the Prometheus text
exposition format (0.0.4), against traffic whose every command the test knows."""

from __future__ import annotations

import asyncio
import math
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytarget.initiator.client import Initiator

from ..conftest import INITIATOR1, TARGET_IQN, LiveTarget, start_target, write_config
from ..unit.copy.helpers import b2b, lid1, xcopy_cdb

BS = 512
MiB = 1 << 20
COPY_BLOCKS = 16384  # 8 MiB

# ------------------------------------------------------------------------------ parser
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "\\":
            nxt = value[i + 1]
            if nxt not in "\\\"n":
                raise ValueError(f"bad escape \\{nxt}")
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad labels {text!r}")
        if m.group(1) in labels:
            raise ValueError(f"label {m.group(1)} twice")
        labels[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return labels


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise ValueError(f"bad value {text!r}")
    return float(text)


def parse_exposition(text: str) -> dict[str, Family]:
    """Families by name; raises ValueError on anything the format does not allow."""
    if not text.endswith("\n"):
        raise ValueError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    seen_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    current: Family | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            raise ValueError(f"line {n}: empty line")
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not re.fullmatch(_NAME, name):
                    raise ValueError(f"line {n}: bad metric name")
                fam = families.get(name)
                if fam is None:
                    if name in {f for f in families}:
                        raise ValueError(f"line {n}: {name} declared twice")
                    fam = families[name] = Family(name)
                elif fam.samples:
                    raise ValueError(f"line {n}: {parts[1]} after samples of {name}")
                if parts[1] == "TYPE":
                    if len(parts) != 4 or parts[3] not in _TYPES:
                        raise ValueError(f"line {n}: bad TYPE")
                    fam.type = parts[3]
                else:
                    fam.help = parts[3] if len(parts) == 4 else ""
                current = fam
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"line {n}: not a sample: {line!r}")
        name, labels = m.group(1), _labels(m.group(2) or "")
        if current is None:
            raise ValueError(f"line {n}: sample before any TYPE")
        allowed = {current.name}
        if current.type == "histogram":
            allowed = {current.name + s for s in ("_bucket", "_sum", "_count")}
        if name not in allowed:
            raise ValueError(f"line {n}: {name} outside its family {current.name}")
        series = (name, tuple(sorted(labels.items())))
        if series in seen_series:
            raise ValueError(f"line {n}: duplicate series {series}")
        seen_series.add(series)
        value = _value(m.group(3))
        if current.type == "counter" and (value < 0 or math.isnan(value)):
            raise ValueError(f"line {n}: negative counter")
        current.samples.append((name, labels, value))
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
    return families


def _check_histogram(fam: Family) -> None:
    groups: dict[tuple[tuple[str, str], ...], dict[str, list[tuple[float, float]]]] = {}
    for name, sample_labels, value in fam.samples:
        labels = dict(sample_labels)
        le = labels.pop("le", None) if name.endswith("_bucket") else None
        key = tuple(sorted(labels.items()))
        g = groups.setdefault(key, {"buckets": [], "sum": [], "count": []})
        if le is not None:
            g["buckets"].append((_value(le), value))
        else:
            g["sum" if name.endswith("_sum") else "count"].append((0.0, value))
    for key, g in groups.items():
        bounds = [b for b, _ in g["buckets"]]
        counts = [c for _, c in g["buckets"]]
        if bounds != sorted(bounds) or not bounds or bounds[-1] != math.inf:
            raise ValueError(f"{fam.name}{key}: buckets not ascending to +Inf")
        if counts != sorted(counts):
            raise ValueError(f"{fam.name}{key}: buckets not cumulative")
        if len(g["count"]) != 1 or len(g["sum"]) != 1 or g["count"][0][1] != counts[-1]:
            raise ValueError(f"{fam.name}{key}: _count differs from the +Inf bucket")


def sample(families: dict[str, Family], name: str, **labels: object) -> float:
    """The value of the one series of `name` whose labels include `labels`."""
    fam = families.get(name) or families[name.rsplit("_", 1)[0]]
    want = {k: str(v) for k, v in labels.items()}
    found = [v for n, lab, v in fam.samples if n == name and want.items() <= lab.items()]
    if len(found) != 1:
        raise KeyError(f"{name}{want}: {len(found)} series")
    return found[0]


# ------------------------------------------------------------------------------ tests
def test_parser_rejects_what_the_format_forbids() -> None:
    good = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 3\n'
    assert sample(parse_exposition(good), "a_total", x=1) == 3
    for bad in (good[:-1], good + "a_total{x=\"1\"} 4\n", good.replace("3", "-3"),
                good.replace("3", "three"), good.replace('x="1"', "x=1"),
                good + "b 1\n", good.replace("counter", "countr"),
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                "h_sum 0\nh_count 1\n"):
        with pytest.raises(ValueError):
            parse_exposition(bad)


@pytest.fixture
def metrics_target(tmp_path: Path) -> Iterator[LiveTarget]:
    target = start_target(write_config(tmp_path, luns=[
        {"id": 0, "path": "lun0.img", "size": "64MiB"},
        {"id": 1, "path": "lun1.img", "size": "64MiB"}], metrics="127.0.0.1:0"))
    yield target
    target.stop()


def scrape(target: LiveTarget) -> tuple[str, str]:
    m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", target.log_text())
    assert m, target.log_text()
    with urllib.request.urlopen(m.group(1), timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def caw_cdb(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0, lba, blocks, 0, 0)


def test_metrics_count_the_traffic_sent(metrics_target: LiveTarget) -> None:
    target = metrics_target
    writes, reads = 10, 7

    async def go() -> None:
        ini = await Initiator.connect(target.host, target.port)
        await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
        assert (await ini.test_unit_ready(0)).sense_key == 0x6  # power on: failed TUR
        (await ini.test_unit_ready(0)).check()
        for i in range(writes):
            (await ini.write(0, i * 8, bytes([i + 1]) * (8 * BS))).check()
        for i in range(reads):
            (await ini.read(0, i * 8, 4)).check()
        miscompare = await ini.command(0, caw_cdb(0), bytes(BS) + bytes(BS))
        assert miscompare.sense_key == 0xE
        from pytarget.assembly import lu_identity

        def by_naa(lun: int) -> bytes:
            naa = lu_identity(TARGET_IQN, lun, None)[1]
            desc = bytearray(32)
            desc[0], desc[4], desc[5], desc[7] = 0xE4, 0x01, 0x03, 8
            desc[8:16] = naa
            desc[29:32] = BS.to_bytes(3, "big")
            return bytes(desc)

        params = lid1([by_naa(0), by_naa(1)], [b2b(0, 1, COPY_BLOCKS, 0, 0)])
        (await ini.command(0, xcopy_cdb(len(params)), params)).check()
        content_type, text = scrape(target)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        fams = parse_exposition(text)
        lun0 = {"target": TARGET_IQN, "lun": 0}

        def ops(name: str, opcode: str) -> float:
            return sample(fams, name, opcode=opcode, **lun0)

        assert ops("pytarget_scsi_commands_total", "TEST_UNIT_READY") == 2
        assert ops("pytarget_scsi_commands_failed_total", "TEST_UNIT_READY") == 1
        assert ops("pytarget_scsi_commands_total", "WRITE_10") == writes
        assert ops("pytarget_scsi_commands_failed_total", "WRITE_10") == 0
        assert sample(fams, "pytarget_scsi_data_bytes_total", opcode="WRITE_10",
                      direction="out", **lun0) == writes * 8 * BS
        assert sample(fams, "pytarget_scsi_data_bytes_total", opcode="WRITE_10",
                      direction="in", **lun0) == 0
        assert ops("pytarget_scsi_commands_total", "READ_10") == reads
        assert sample(fams, "pytarget_scsi_data_bytes_total", opcode="READ_10",
                      direction="in", **lun0) == reads * 4 * BS
        assert ops("pytarget_scsi_commands_total", "COMPARE_AND_WRITE") == 1
        assert ops("pytarget_scsi_commands_failed_total", "COMPARE_AND_WRITE") == 1
        assert sample(fams, "pytarget_caw_miscompares_total", **lun0) == 1
        assert sample(fams, "pytarget_caw_miscompares_total", target=TARGET_IQN, lun=1) == 0
        assert ops("pytarget_scsi_command_duration_seconds_count", "WRITE_10") == writes
        assert sample(fams, "pytarget_scsi_command_duration_seconds_bucket",
                      opcode="WRITE_10", le="+Inf", **lun0) == writes
        assert ops("pytarget_scsi_command_duration_seconds_sum", "WRITE_10") > 0
        # nothing was sent to LUN 1 (the copy's writes are the copy manager's, not commands)
        assert not [s for s in fams["pytarget_scsi_commands_total"].samples
                    if s[1]["lun"] == "1"]
        copied = sum(v for _, lab, v in fams["pytarget_copy_bytes_total"].samples
                     if lab["lun"] == "1")
        assert copied == COPY_BLOCKS * BS
        paths = {lab["path"] for _, lab, _ in fams["pytarget_copy_bytes_total"].samples}
        assert "hole" in paths and paths <= {"hole", "reflink", "copy_range", "buffered"}
        assert sample(fams, "pytarget_copy_operations_total", operation="EXTENDED COPY(LID1)",
                      outcome="completed") == 1
        assert sample(fams, "pytarget_copy_operation_bytes_total",
                      operation="EXTENDED COPY(LID1)") == COPY_BLOCKS * BS
        assert sample(fams, "pytarget_copy_operations_active") == 0
        assert sample(fams, "pytarget_sessions", target=TARGET_IQN, type="Normal") == 1
        assert sample(fams, "pytarget_lun_size_bytes", **lun0) == 64 * MiB
        assert sample(fams, "pytarget_lun_allocated_bytes", **lun0) >= writes * 8 * BS
        await ini.logout()
        await ini.close()

    asyncio.run(go())
    _, text = scrape(target)
    assert sample(parse_exposition(text), "pytarget_sessions", target=TARGET_IQN,
                  type="Normal") == 0


def test_metrics_endpoint_is_the_vpd_85h_status_service(metrics_target: LiveTarget) -> None:
    target = metrics_target
    url = re.search(r"metrics on (\S+)", target.log_text()).group(1)  # type: ignore[union-attr]

    async def go() -> bytes:
        ini = await Initiator.connect(target.host, target.port)
        await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
        await ini.clear_unit_attentions(0)
        cdb = bytes((0x12, 0x01, 0x85, 0x04, 0x00, 0x00))
        data = (await ini.command(0, cdb, read_length=1024)).check().data
        await ini.logout()
        await ini.close()
        return data

    page = asyncio.run(go())
    entries = []
    at = 4
    while at < 4 + struct.unpack_from(">H", page, 2)[0]:
        kind, length = page[at] & 0x1F, struct.unpack_from(">H", page, at + 2)[0]
        entries.append((kind, page[at + 4:at + 4 + length].rstrip(b"\0").decode()))
        at += 4 + length
    assert (0x03, url) in entries, entries
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
    assert err.value.code == 404
