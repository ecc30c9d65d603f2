"""Checking PutRecords requests in a helper process gives exactly what checking them in the
node's process gives, for good records, bad ones, credentials and bytes that are no request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

from residency.server.api.intake import MIN_OFFLOAD_BYTES, Checked, Intake, check_request
from residency.server.config.node import load_config
from residency.server.config.schema import load_schema
from residency.server.core import codec
from residency.server.core.schema import Schema
from residency.server.deployment import PRIMARY, init_deployment
from residency.v1 import records_pb2
from tests.conftest import ctx


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    d = tmp_path_factory.mktemp("intake")
    init_deployment(d)
    return load_schema(load_config(d / f"{PRIMARY}.yaml").schema)


def large_request(bad: dict[int, dict] | None = None) -> bytes:
    """600 records of 10 fields, every 50th with a password, every 100th a cookie id; `bad`
    replaces some records' fields."""
    req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    for i in range(600):
        fields = {
            "name": f"Li Wei {i}",
            "phone": f"+86 138{i:08d}",
            "email": f"user{i}@example.cn",
            "address": f"{i} Changan Avenue, Beijing",
            "ip_address": f"10.0.{i % 256}.1",
            "browser_type": "Firefox 145",
            "language": "zh-CN",
            "hardware_software": "Android 16",
            "published_content": f"Review {i}",
            "partner_profile": "frequent traveller",
        }
        if i % 50 == 0:
            fields["password"] = f"secret-{i}-secret"
        if i % 100 == 5:
            fields["cookie_id"] = f"ck-{i}"
        fields |= (bad or {}).get(i, {})
        r = req.records.add(user_id=f"i-{i}", source="registration" if i % 2 else "")
        for name, value in fields.items():
            r.fields[name].CopyFrom(codec.to_value(value))
    raw = req.SerializeToString()
    assert len(raw) >= MIN_OFFLOAD_BYTES
    return raw


def same(checked: Checked) -> tuple:
    """What a check came to, up to the order of map entries (a map's order is per process)."""
    writes = [(u, src, records_pb2.Record.FromString(b), set(c), f) for u, src, b, c, f in checked.writes]
    return writes, sorted(checked.bad), checked.secrets


async def test_a_helper_checks_a_large_request_exactly_as_the_node_does(schema: Schema):
    intake = Intake(schema, PRIMARY, workers=1)
    try:
        assert len(intake.wait_ready()) == 1
        for raw in (large_request(), large_request({3: {"email": 7}, 450: {"shoe_size": 42}})):
            offloaded = intake.offloaded
            got = await intake.check(raw)
            assert intake.offloaded == offloaded + 1
            want = check_request(schema, PRIMARY, raw)
            assert (got.context, got.count) == (want.context, want.count)
            assert same(got.checked) == same(want.checked)
        bad = {"records[3].fields[email]", "records[450].fields[shoe_size]"}
        assert {f for f, _ in got.checked.bad} == bad
        good = (await intake.check(large_request())).checked
        assert len(good.writes) == 600 and not good.bad
        assert [good.writes[i][0] for i in good.secrets] == [f"i-{i}" for i in range(0, 600, 50)]
        cookies = [(u, c) for u, _, _, c, _ in good.writes if c]
        assert cookies == [(f"i-{i}", ("cookie_id",)) for i in range(5, 600, 100)]
        body = records_pb2.Record.FromString(good.writes[7][2])
        assert not body.user_id and not body.source  # what is sealed is the fields alone
        assert codec.from_value(body.fields["email"]) == "user7@example.cn"
        assert good.writes[7][1] == "registration"
        # The lookup fields' normalised forms, found by the helper: the store thread need
        # not read the body again to keep the blind index.
        assert dict(good.writes[7][4]) == {"email": "user7@example.cn", "phone": "+8613800000007"}
    finally:
        intake.close()


async def test_bytes_that_are_no_request_fail_alike_in_a_helper_and_in_process(schema: Schema):
    raw = b"\xff" * MIN_OFFLOAD_BYTES
    for workers in (1, 0):
        intake = Intake(schema, PRIMARY, workers=workers)
        try:
            intake.wait_ready()
            with pytest.raises(DecodeError):
                await intake.check(raw)
        finally:
            intake.close()


async def test_a_dead_helper_is_replaced_and_no_request_fails_meanwhile(schema: Schema):
    intake = Intake(schema, PRIMARY, workers=1)
    raw = large_request()
    want = check_request(schema, PRIMARY, raw).checked
    try:
        (pid,) = intake.wait_ready()
        os.kill(pid, signal.SIGKILL)
        assert same((await intake.check(raw)).checked) == same(want)  # checked in-process
        (new,) = intake.wait_ready()
        assert new != pid
        offloaded = intake.offloaded
        assert same((await intake.check(raw)).checked) == same(want)
        assert intake.offloaded == offloaded + 1
    finally:
        intake.close()


def test_one_core_gets_no_helper(schema: Schema, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert Intake(schema, PRIMARY).workers == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert Intake(schema, PRIMARY).workers == 1


def test_check_workers_must_be_a_small_whole_number(tmp_path: Path):
    from residency.server.core.errors import ConfigError

    init_deployment(tmp_path)
    cfg = tmp_path / f"{PRIMARY}.yaml"
    text = cfg.read_text()
    for bad in ("-1", "true", "2.5", "100"):
        cfg.write_text(text + f"check_workers: {bad}\n")
        with pytest.raises(ConfigError, match="check_workers"):
            load_config(cfg)
    cfg.write_text(text + "check_workers: 0\n")
    assert load_config(cfg).check_workers == 0


def test_helpers_end_when_the_node_is_killed(tmp_path: Path):
    """A helper blocks on a pipe the node also holds; killed, the node cannot close it."""
    script = tmp_path / "node.py"
    script.write_text(
        "import sys\n"
        "from residency.server.config.node import load_config\n"
        "from residency.server.api.intake import Intake\n"
        "from residency.server.config.schema import load_schema\n"
        "if __name__ == '__main__':\n"
        "    schema = load_schema(load_config(sys.argv[1]).schema)\n"
        "    intake = Intake(schema, 'cn-north', workers=2)\n"
        "    print(*intake.wait_ready(), flush=True)\n"
        "    sys.stdin.read()\n"
        "    intake.close()\n"
    )
    init_deployment(tmp_path / "d")
    node = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "d" / f"{PRIMARY}.yaml")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert node.stdout is not None
    node.stdout.readline()  # the helpers have answered
    helpers = children(node.pid)  # the helpers, and multiprocessing's resource tracker
    assert len(helpers) >= 2 and all(alive(p) for p in helpers)
    node.kill()
    node.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in helpers):
        assert time.monotonic() < deadline, "a helper outlived the node"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
