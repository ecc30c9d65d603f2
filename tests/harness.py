"""The test harness: a deployment folder's node processes (`residency serve`), started and
stopped, and the waits for them to serve and to finish replicating."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.server.config.node import load_config
from residency.server.deployment import AFFILIATES, PRIMARY, check_running, start_node
from residency.v1 import admin_pb2, admin_pb2_grpc


class Deployment:
    """The three node processes of a deployment folder."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.configs = {r: directory / f"{r}.yaml" for r in (PRIMARY, *AFFILIATES)}
        self.addresses = {r: load_config(p).listen for r, p in self.configs.items()}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, region: str) -> None:
        self.procs[region] = start_node(self.configs[region])

    def check_running(self) -> None:
        """Raises with the tail of its log if a node process has exited."""
        check_running(self.procs, self.configs)

    async def wait_serving(self, deadline: float = 30.0) -> None:
        """Waits until every started node reports SERVING; a node that died is reported."""
        waits = [asyncio.create_task(wait_serving(self.addresses[r], deadline)) for r in self.procs]
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


async def wait_serving(address: str, deadline: float = 30.0) -> None:
    """Waits until the node at `address` reports SERVING, or raises TimeoutError."""
    end = time.monotonic() + deadline
    async with grpc.aio.insecure_channel(address) as ch:
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


async def wait_replicated(primary: str, timeout: float = 600.0) -> dict:
    """Waits until every destination has applied the whole outbox; returns the last status."""
    end = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(primary) as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        while True:
            s = await stub.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
            if all(d.pending == 0 and d.applied_sequence >= s.head_sequence for d in s.destinations):
                return {d.region: d for d in s.destinations}
            if time.monotonic() > end:
                raise TimeoutError(f"replication did not catch up within {timeout:.0f} s")
            await asyncio.sleep(0.1)
