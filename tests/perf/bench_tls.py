"""Benchmark: what mutual TLS costs against plaintext, in the same run on the same server.

A child process serves grpc.health.v1 twice: on a plaintext port, and on a port with a node's
TLS credentials and its `Gate` interceptor (what `residency serve` uses, without a node),
certificates from a fresh `residency init`. Measured from this process, alternating the two:
the handshake cost (time to a first call on a new channel, median of `--handshakes`), one
caller's call latency on an open channel, and calls/s at `--concurrency` callers. Prints one
JSON line. (A node itself has no plaintext port; this server exists only for the comparison.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from bench_put import closed_loop  # this folder is on sys.path when run as a script
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from residency.server.api.access import Gate
from residency.server.api.tls import ServerTls
from residency.server.config.node import load_config
from residency.server.deployment import PRIMARY, free_ports, init_deployment

# Run as a script, this folder is on sys.path and the checkout is not: tests.harness needs it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.harness import Deployment

PING = health_pb2.HealthCheckRequest()


async def serve(config: Path, plain: int, secure: int) -> None:
    tls = ServerTls(load_config(config).tls)
    # Two servers in one process, one event loop: the mTLS one checks every call's certificate
    # as a node does; the plaintext one has nothing to check.
    servers = [grpc.aio.server(interceptors=[Gate(tls)]), grpc.aio.server()]
    servers[0].add_secure_port(f"127.0.0.1:{secure}", tls.credentials())
    servers[1].add_insecure_port(f"127.0.0.1:{plain}")
    for server in servers:
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        await server.start()
    print("ready", flush=True)
    await servers[0].wait_for_termination()


async def first_call(open_channel) -> float:
    """Seconds from a new channel to the answer of its first call (connect + handshake + call)."""
    t0 = time.perf_counter()
    async with open_channel() as ch:
        await health_pb2_grpc.HealthStub(ch).Check(PING, timeout=10, wait_for_ready=True)
    return time.perf_counter() - t0


async def run(args: argparse.Namespace, directory: Path) -> dict:
    init_deployment(directory)
    dep = Deployment(directory)
    creds = dep.credentials("service", PRIMARY, "bench")
    plain, secure = free_ports(2)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(dep.configs[PRIMARY]), str(plain), str(secure)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        opens = {
            "plaintext": lambda: grpc.aio.insecure_channel(f"127.0.0.1:{plain}"),
            "mtls": lambda: creds.channel(f"127.0.0.1:{secure}"),
        }
        first: dict[str, list[float]] = {k: [] for k in opens}
        for _ in range(3):  # warm up both paths
            for o in opens.values():
                await first_call(o)
        for i in range(args.handshakes):
            for k in list(opens) if i % 2 == 0 else list(opens)[::-1]:
                first[k].append(await first_call(opens[k]))
        latency: dict[str, list[float]] = {k: [] for k in opens}
        rate: dict[str, list[float]] = {k: [] for k in opens}
        channels = {k: o() for k, o in opens.items()}
        stubs = {k: health_pb2_grpc.HealthStub(ch) for k, ch in channels.items()}
        for s in stubs.values():
            await s.Check(PING, timeout=10, wait_for_ready=True)
        for r in range(args.rounds):
            for k in list(opens) if r % 2 == 0 else list(opens)[::-1]:

                async def call(w: int, n: int, stub=stubs[k]) -> None:
                    await stub.Check(PING, timeout=10)

                latency[k].append(1 / await closed_loop(call, 1, args.seconds))
                rate[k].append(await closed_loop(call, args.concurrency, args.seconds))
        for ch in channels.values():
            await ch.close()
    finally:
        child.terminate()
        child.wait()
    ms = lambda x: round(statistics.median(x) * 1000, 3)  # noqa: E731
    out = {"benchmark": "tls", "cpus": os.cpu_count(), "handshakes": args.handshakes}
    for k in opens:
        out[k] = {
            "first_call_ms_median": ms(first[k]),
            "call_latency_ms_median": ms(latency[k]),
            f"calls_per_s_at_{args.concurrency}": round(statistics.median(rate[k])),
        }
    out["handshake_cost_ms"] = round(
        out["mtls"]["first_call_ms_median"] - out["plaintext"]["first_call_ms_median"], 3
    )
    out["per_call_cost_us"] = round(
        (statistics.median(latency["mtls"]) - statistics.median(latency["plaintext"])) * 1e6, 1
    )
    out["throughput_ratio_mtls_over_plaintext"] = round(
        statistics.median(rate["mtls"]) / statistics.median(rate["plaintext"]), 3
    )
    return out


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        asyncio.run(serve(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--handshakes", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="residency-bench-tls-") as tmp:
        print(json.dumps(asyncio.run(run(args, Path(tmp)))))


if __name__ == "__main__":
    main()
