"""Health that means something: `liveness` apart from `readiness`; not ready while starting,
draining, or while the store or the key service cannot be used, with the reasons in `residency
status`; the same answers on the plaintext probe port (`health: {listen}`), which serves
nothing else."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.server.api.health import LIVENESS, READINESS, Health, check
from residency.server.deployment import PRIMARY, free_ports
from residency.server.keys.providers.openbao import OpenBaoProvider
from residency.v1 import records_pb2, records_pb2_grpc, translog_pb2
from tests.conftest import Cluster, ctx

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def probe(address: str, service: str) -> int:
    """What a Kubernetes gRPC probe sees: plaintext, one Check."""
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return reply.status


async def wait_for(address: str, service: str, status: int, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while (seen := await probe(address, service)) != status:
        assert time.monotonic() < end, f"{service} stayed {seen}"
        await asyncio.sleep(0.1)


async def test_a_starting_node_is_alive_and_not_ready():
    """What the probe port says from the first moment: before the store, keys and listener."""
    (port,) = free_ports(1)
    health = Health(["residency.v1.RecordService"])
    await health.begin(f"127.0.0.1:{port}")
    try:
        address = f"127.0.0.1:{port}"
        assert await probe(address, LIVENESS) == SERVING
        for service in ("", READINESS, "residency.v1.RecordService"):
            assert await probe(address, service) == NOT_SERVING
        assert health.problems == ["starting"]
        await health.ready([])
        assert await probe(address, READINESS) == SERVING
        await health.draining()
        assert await probe(address, READINESS) == NOT_SERVING and health.problems == ["draining"]
        assert await probe(address, LIVENESS) == SERVING
    finally:
        await health.close()


async def test_a_key_service_or_store_that_cannot_be_used_is_named():
    """The checks against a real provider with nothing listening and a store that fails."""
    (port,) = free_ports(1)
    bao = OpenBaoProvider(f"http://127.0.0.1:{port}", "token", "t", timeout=1.0)

    class Keys:
        provider, shredded = bao, ""

    async def store_fails() -> None:
        import sqlite3

        db = sqlite3.connect(":memory:")
        db.close()
        db.execute("SELECT 1")  # sqlite3.ProgrammingError: a closed database

    problems = await check(store_fails, Keys(), timeout=3.0)
    assert problems[0] == "store: ProgrammingError"
    assert problems[1].startswith("key service (openbao): "), problems
    Keys.shredded = "shredded at ..."  # a shredded region serves, to say why nothing opens
    assert await check(store_fails, Keys(), timeout=3.0) == ["store: ProgrammingError"]
    bao.close()


def with_probe_port(tmp_path: Path) -> tuple[Cluster, str]:
    """A deployment whose primary also serves health on a plaintext probe port; its address."""
    c = Cluster(tmp_path / "deployment")
    (port,) = free_ports(1)
    config_path = c.dep.configs[PRIMARY]
    config = yaml.safe_load(config_path.read_text())
    config["health"] = {"listen": f"127.0.0.1:{port}"}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return c, f"127.0.0.1:{port}"


async def test_readiness_follows_the_key_service_and_status_says_why(tmp_path: Path):
    c, probe_address = with_probe_port(tmp_path)
    try:
        await c.start()
        await wait_for(probe_address, READINESS, SERVING)
        assert await probe(probe_address, "") == SERVING
        # The probe port serves the health service and nothing else.
        async with grpc.aio.insecure_channel(probe_address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await records_pb2_grpc.RecordServiceStub(ch).GetRecord(
                    records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="u-1"),
                    timeout=5,
                )
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The local provider's key files gone (a volume unmounted): not ready, still alive.
        key_dir = tmp_path / "deployment" / "keys" / PRIMARY
        hidden = tmp_path / "hidden"
        hidden.mkdir()
        for f in key_dir.glob("kek-v*.key"):
            f.rename(hidden / f.name)
        await wait_for(probe_address, READINESS, NOT_SERVING)
        assert await probe(probe_address, LIVENESS) == SERVING
        status = await c.status(PRIMARY)
        assert not status.ready
        assert [w for w in status.not_ready_because if w.startswith("key service (local): ")], status
        out = subprocess.run(
            [sys.executable, "-m", "residency.cli", "status", *c.target("operator")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        node = json.loads(out.stdout)["node"]
        assert node["ready"] is False and any("key service (local)" in w for w in node["notReadyBecause"])
        for f in hidden.iterdir():
            f.rename(key_dir / f.name)
        await wait_for(probe_address, READINESS, SERVING)
        assert (await c.status(PRIMARY)).ready
    finally:
        await c.close()


async def test_draining_is_not_ready_until_the_process_ends(tmp_path: Path):
    """A call held open (a log tail the client stops reading) keeps the drain going for its
    grace period: meanwhile the node is alive and not ready."""
    c, address = with_probe_port(tmp_path)
    try:
        await c.start()
        for i in range(0, 600, 200):
            req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
            for j in range(i, i + 200):
                rec = req.records.add(user_id=f"u-d{j}", source="registration")
                rec.fields["email"].string_value = f"d{j}@example.com"
            await c.records().PutRecords(req, timeout=30)
        await c.replicated()
        await wait_for(address, READINESS, SERVING)
        # More entries than one flow-control window: the server's stream blocks, unread.
        tail = c.transfer_log().TailEntries(translog_pb2.TailEntriesRequest())
        await tail.read()
        proc = c.dep.procs[PRIMARY]
        proc.send_signal(signal.SIGTERM)
        await wait_for(address, READINESS, NOT_SERVING, deadline=8.0)
        assert await probe(address, LIVENESS) == SERVING
        assert (await probe(address, "")) == NOT_SERVING
        tail.cancel()
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        await c.close()
