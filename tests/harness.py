"""The test harness: a deployment folder's node processes (`residency serve`), started and
stopped, the client certificates tests call them with, and the waits for them to serve and to
finish replicating (over mutual TLS, as every caller)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.cli.channel import Credentials
from residency.server.config.node import load_config
from residency.server.deployment import AFFILIATES, PRIMARY, check_running, free_ports, issue_once, start_node
from residency.v1 import admin_pb2, admin_pb2_grpc


class Deployment:
    """The three node processes of a deployment folder."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.configs = {r: directory / f"{r}.yaml" for r in (PRIMARY, *AFFILIATES)}
        self.addresses = {r: load_config(p).listen for r, p in self.configs.items()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.pki = directory / "pki"

    def credentials(self, role: str, region: str = PRIMARY, name: str | None = None) -> Credentials:
        """A client certificate of this deployment's CA for spiffe://residency/ROLE/REGION/NAME.
        Without a name: `residency init`'s (the operator's, the reviewer's, a node's own), or
        NAME `test-suite`; others are issued on first use."""
        if role in ("operator", "reviewer") and region == PRIMARY and name is None:
            prefix = role
        elif role == "node" and name is None:
            prefix = region
        else:
            name = name or "test-suite"
            prefix = f"{role}-{region}-{name}"
            issue_once(self.pki, role, region, name, prefix)
        return Credentials.files(self.pki / prefix, self.pki / "ca.crt")

    @property
    def operator(self) -> Credentials:
        return self.credentials("operator")

    def use_store(self, store: dict[str, Any]) -> None:
        """The primary's `store:` (e.g. `{kind: postgres, dsn: ...}`)."""
        path = self.configs[PRIMARY]
        config = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**config, "store": store}, sort_keys=False))

    def add_front_end(self, name: str, region: str = PRIMARY) -> str:
        """Another `residency serve` of `region` on the same store (PostgreSQL): its own listen
        address, metrics port and data folder (logs, its running lock), the region's keys and
        certificate. Returns the name to start it and open channels by."""
        config = yaml.safe_load(self.configs[region].read_text())
        assert config.get("store", {}).get("kind") == "postgres", "front ends share a PostgreSQL store"
        listen, metrics = free_ports(2)
        config["listen"] = f"127.0.0.1:{listen}"
        config["data_dir"] = f"data/{region}-{name}"
        if "metrics" in config:
            config["metrics"] = {"listen": f"127.0.0.1:{metrics}"}
        key = f"{region}-{name}"
        self.configs[key] = self.directory / f"{key}.yaml"
        self.configs[key].write_text(yaml.safe_dump(config, sort_keys=False))
        self.addresses[key] = config["listen"]
        return key

    def start(self, region: str) -> None:
        self.procs[region] = start_node(self.configs[region])

    def node_log(self, region: str) -> Path:
        """What the node printed (`start_node`'s `node.log`)."""
        return load_config(self.configs[region]).data_dir / "node.log"

    def check_running(self) -> None:
        """Raises with the tail of its log if a node process has exited."""
        check_running(self.procs, self.configs)

    async def wait_serving(self, deadline: float = 30.0) -> None:
        """Waits until every started node reports SERVING; a node that died is reported."""
        waits = [
            asyncio.create_task(wait_serving(self.addresses[r], self.operator, deadline)) for r in self.procs
        ]
        try:
            while not all(w.done() for w in waits):
                self.check_running()
                await asyncio.wait(waits, timeout=0.1)
            for w in waits:
                w.result()
        finally:
            for w in waits:
                w.cancel()

    def stop(self, region: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        proc = self.procs.pop(region)
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> dict[str, int]:
        return {r: self.stop(r) for r in list(self.procs)}


async def wait_serving(address: str, creds: Credentials | None, deadline: float = 30.0) -> None:
    """Waits until the node at `address` reports SERVING, or raises TimeoutError. `creds`:
    the caller's certificate (None only for a checkout from before mutual TLS, in bench_ab)."""
    end = time.monotonic() + deadline
    async with creds.channel(address) if creds else grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"node at {address} did not start within {deadline:.0f} s")
            await asyncio.sleep(0.05)


async def wait_replicated(primary: str, creds: Credentials, timeout: float = 600.0) -> dict:
    """Waits until every destination has applied the whole outbox; returns the last status."""
    end = time.monotonic() + timeout
    async with creds.channel(primary) as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        while True:
            s = await stub.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
            if all(d.pending == 0 and d.applied_sequence >= s.head_sequence for d in s.destinations):
                return {d.region: d for d in s.destinations}
            if time.monotonic() > end:
                raise TimeoutError(f"replication did not catch up within {timeout:.0f} s")
            await asyncio.sleep(0.1)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, deadline: float = 30.0) -> None:
    """Waits until `check()` holds, or fails naming `what` (a condition with a deadline, never a
    bare sleep)."""
    end = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)
