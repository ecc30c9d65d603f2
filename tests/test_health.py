"""Health that means something: `liveness` apart from `readiness`; not ready while starting,
draining, or while the store or the key service cannot be used, with the reasons in `residency
status`. Asked over mutual TLS only: there is no plaintext port (a config that still names one
is refused), and probes run `residency health --config NODE.yaml`, which asks the node on its
own host with the node's own certificate."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.cli.channel import Credentials
from residency.server.api.access import Gate
from residency.server.api.health import LIVENESS, READINESS, Health, check
from residency.server.api.tls import ServerTls
from residency.server.config.node import load_config
from residency.server.deployment import PRIMARY, free_ports, init_deployment, node_name
from residency.server.keys import pki
from residency.server.keys.providers.openbao import OpenBaoProvider
from residency.v1 import records_pb2, translog_pb2
from tests.conftest import Cluster, ctx
from tests.harness import Deployment, eventually

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
Status = health_pb2.HealthCheckResponse.ServingStatus


async def probe(creds: Credentials, address: str, service: str) -> int:
    """One Check over mutual TLS, as `residency health` asks it."""
    async with creds.channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return reply.status


async def wait_for(
    creds: Credentials, address: str, service: str, status: int, deadline: float = 30.0
) -> None:
    async def seen() -> bool:
        return await probe(creds, address, service) == status

    await eventually(seen, f"{service or '(overall)'} is {Status.Name(status)}", deadline)


def residency_health(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`residency health --config CONFIG ARGS`, as a probe runs it."""
    return subprocess.run(
        [sys.executable, "-m", "residency.cli", "health", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_starting_node_is_alive_and_not_ready(tmp_path: Path):
    """What the health service says from the first moment (before the store, keys and the API
    services), over mutual TLS to the node's certificate, asked as the node itself."""
    init_deployment(tmp_path)
    config = load_config(tmp_path / f"{PRIMARY}.yaml")
    health = Health(["residency.v1.RecordService"])
    server = grpc.aio.server(interceptors=[Gate(tls := ServerTls(config.tls))])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    assert server.add_secure_port(address, tls.credentials()) == port
    await server.start()
    await health.begin()
    node = Deployment(tmp_path).credentials("node")
    try:
        assert await probe(node, address, LIVENESS) == SERVING
        for service in ("", READINESS, "residency.v1.RecordService"):
            assert await probe(node, address, service) == NOT_SERVING
        assert health.problems == ["starting"]
        await health.ready([])
        assert await probe(node, address, READINESS) == SERVING
        await health.draining()
        assert await probe(node, address, READINESS) == NOT_SERVING and health.problems == ["draining"]
        assert await probe(node, address, LIVENESS) == SERVING
        # No plaintext caller is answered, health or not.
        async with grpc.aio.insecure_channel(address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await health.close()
        await server.stop(None)


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


def hide_keys(key_dir: Path, hidden: Path) -> None:
    """The local provider's key files gone (a volume unmounted)."""
    hidden.mkdir(exist_ok=True)
    for f in key_dir.glob("kek-v*.key"):
        f.rename(hidden / f.name)


def restore_keys(key_dir: Path, hidden: Path) -> None:
    for f in hidden.iterdir():
        f.rename(key_dir / f.name)


async def test_readiness_follows_the_key_service_and_status_says_why(tmp_path: Path):
    c = Cluster(tmp_path / "deployment")
    try:
        await c.start()
        node, address = c.dep.credentials("node"), c.dep.addresses[PRIMARY]
        await wait_for(node, address, READINESS, SERVING)
        assert await probe(node, address, "") == SERVING
        # The local provider's key files gone (a volume unmounted): not ready, still alive.
        key_dir, hidden = tmp_path / "deployment" / "keys" / PRIMARY, tmp_path / "hidden"
        hide_keys(key_dir, hidden)
        await wait_for(node, address, READINESS, NOT_SERVING)
        assert await probe(node, address, LIVENESS) == SERVING
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
        reply = json.loads(out.stdout)["node"]
        assert reply["ready"] is False and any("key service (local)" in w for w in reply["notReadyBecause"])
        restore_keys(key_dir, hidden)
        await wait_for(node, address, READINESS, SERVING)
        assert (await c.status(PRIMARY)).ready
    finally:
        await c.close()


async def test_residency_health_probes_the_node_of_its_config_over_mutual_tls(tmp_path: Path):
    """As a Kubernetes exec probe runs it: the node listens on every address and its
    certificate names neither loopback nor localhost, only the DNS name it is reached by."""
    directory = tmp_path / "deployment"
    init_deployment(directory)
    dep = Deployment(directory)
    config_path = dep.configs[PRIMARY]
    config = yaml.safe_load(config_path.read_text())
    port = int(config["listen"].rpartition(":")[2])
    config["listen"] = f"0.0.0.0:{port}"
    pki.issue(
        directory / "pki",
        "node",
        PRIMARY,
        node_name(PRIMARY),
        directory / "pki" / "dns-only",
        hosts=["cn-north.residency.example"],
    )
    config["tls"].update(cert="pki/dns-only.crt", key="pki/dns-only.key")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    async def answers(service: str = "readiness", code: int = 0) -> bool:
        r = await asyncio.to_thread(residency_health, config_path, "--service", service)
        return r.returncode == code

    # Never started on this host: its serving lock names no process to ask for.
    never = residency_health(config_path)
    assert never.returncode == 1 and "no `residency serve` of this config started" in never.stderr, never
    dep.start(PRIMARY)
    try:
        await eventually(answers, "`residency health` says the node is ready")
        ready = residency_health(config_path)
        assert (ready.returncode, ready.stdout, ready.stderr) == (0, "SERVING\n", "")
        assert (
            await asyncio.to_thread(residency_health, config_path, "--service", "liveness")
        ).returncode == 0
        assert (await asyncio.to_thread(residency_health, config_path, "--service", "")).returncode == 0
        # Not ready (its key files gone): exit status 1, and which service is not serving.
        key_dir, hidden = directory / "keys" / PRIMARY, tmp_path / "hidden"
        hide_keys(key_dir, hidden)
        await eventually(lambda: answers(code=1), "`residency health` says the node is not ready")
        not_ready = residency_health(config_path)
        assert not_ready.returncode == 1 and not_ready.stdout.startswith(
            "NOT_SERVING 'readiness' at 127.0.0.1:"
        )
        assert (
            await asyncio.to_thread(residency_health, config_path, "--service", "liveness")
        ).returncode == 0
        restore_keys(key_dir, hidden)
        await eventually(answers, "`residency health` says the node is ready again")
    finally:
        assert dep.stop(PRIMARY) == 0, dep.node_log(PRIMARY).read_text()[-3000:]
    # The node stopped: no answer, exit status 1, why in one line, no traceback.
    gone = residency_health(config_path, "--timeout", "1")
    assert gone.returncode == 1 and gone.stdout == "", gone
    assert gone.stderr.count("\n") == 1 and "UNAVAILABLE" in gone.stderr and "Traceback" not in gone.stderr
    # A config it cannot read: exit status 2.
    missing = residency_health(tmp_path / "nowhere.yaml")
    assert missing.returncode == 2 and "cannot read config" in missing.stderr, missing
    for timeout in ("0", "-1", "nan"):
        bad = residency_health(config_path, "--timeout", timeout)
        assert bad.returncode == 2 and "not a number of seconds above 0" in bad.stderr, bad


def test_a_config_with_the_plaintext_health_port_is_refused_naming_it(tmp_path: Path):
    init_deployment(tmp_path)
    config_path = tmp_path / f"{PRIMARY}.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["health"] = {"listen": "0.0.0.0:8081"}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    for argv in (["serve", "--config", str(config_path)], ["health", "--config", str(config_path)]):
        out = subprocess.run(
            [sys.executable, "-m", "residency.cli", *argv], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2, (argv, out.stderr)
        assert f"{config_path}: 'health.listen' was a plaintext port and is gone" in out.stderr, out.stderr
        assert "residency health --config" in out.stderr and "Traceback" not in out.stderr


async def test_a_draining_node_fails_the_probe_and_ends_cleanly(tmp_path: Path):
    """On SIGTERM with a call held open (a log tail the client stops reading) the node turns
    not ready and takes no new call, health included: `residency health` fails from then on,
    and the node still ends with status 0."""
    c = Cluster(tmp_path)
    try:
        await c.start()
        for i in range(0, 600, 200):
            req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
            for j in range(i, i + 200):
                rec = req.records.add(user_id=f"u-d{j}", source="registration")
                rec.fields["email"].string_value = f"d{j}@example.com"
            await c.records().PutRecords(req, timeout=30)
        await c.replicated()
        config_path = c.dep.configs[PRIMARY]
        assert residency_health(config_path).returncode == 0
        # More entries than one flow-control window: the server's stream blocks, unread.
        tail = c.transfer_log().TailEntries(translog_pb2.TailEntriesRequest())
        await tail.read()
        proc = c.dep.procs[PRIMARY]
        proc.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            r = await asyncio.to_thread(residency_health, config_path, "--timeout", "1")
            return r.returncode == 1

        await eventually(refused, "the draining node fails the probe", deadline=8.0)
        tail.cancel()
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        await c.close()
