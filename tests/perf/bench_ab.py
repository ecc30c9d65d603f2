"""A/B benchmark: two checkouts' primaries side by side, measured in alternating rounds.

On a shared machine a neighbour's load moves rates by 20 % within seconds, more than most
changes are worth; two benchmark runs minutes apart cannot tell them apart. This starts one
primary from each checkout (`git worktree add /tmp/base main`, say), then measures each
phase on A and on B back to back, in turn first, for `--rounds` rounds, and prints one JSON
line: per phase the median rate of each, B/A, and the rounds in which B was faster.

    python tests/perf/bench_ab.py /tmp/base . --phases bulk,put,noop

`--python-a`/`--python-b` run the same way one checkout under two interpreters (each
interpreter's environment needs the node's dependencies: `pip install -e .` there).

A checkout with mutual TLS (`server/api/tls.py`) is called over it, with a service
certificate of its deployment; an older one in plaintext, naming the caller in metadata.
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
from pathlib import Path

import grpc
import yaml
from bench_put import CTX, closed_loop, ten_fields  # this folder is on sys.path when run as a script
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.cli.channel import Credentials
from residency.server.config.node import load_config
from residency.server.deployment import PRIMARY, init_deployment
from residency.v1 import records_pb2, records_pb2_grpc

# Run as a script, this folder is on sys.path and the checkout is not: tests.harness needs it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.harness import Deployment, wait_serving

# What a checkout from before mutual TLS needs to name its caller; one with it ignores this.
META = (("x-residency-identity", "bench:ab"),)

PHASES = {"put": 64, "noop": 64, "bulk": 2}  # calls in flight, as bench_put


def start(root: Path, directory: Path, python: str) -> tuple[subprocess.Popen, str, Credentials | None]:
    """A primary without a replicator, running the code under `root` with `python`, and the
    credentials to call it with (None: it serves plaintext)."""
    init_deployment(directory)
    cfg = directory / f"{PRIMARY}.yaml"
    doc = yaml.safe_load(cfg.read_text())
    doc["replicator"]["enabled"] = False
    creds = Deployment(directory).credentials("service", PRIMARY, "bench")
    if not (root / "server" / "api" / "tls.py").exists():
        del doc["tls"]
        creds = None
    cfg.write_text(yaml.safe_dump(doc))
    log = open(directory / "node.log", "wb")  # noqa: SIM115 - handed to the child process
    # A checkout from before the one-package layout runs as `server.cli` from its own folder
    # (PYTHONPATH); a later one runs as the `residency` package that `python`'s environment
    # installed (`pip install -e CHECKOUT` there, then `--python-a`/`--python-b`).
    module = "server.cli" if (root / "server" / "cli.py").exists() else "residency.cli"
    proc = subprocess.Popen(
        [python, "-m", module, "serve", "--config", str(cfg)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, load_config(cfg).listen, creds


def calls(channel: grpc.aio.Channel) -> dict:
    records, health = records_pb2_grpc.RecordServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    record = records_pb2.Record
    pool = [
        records_pb2.PutRecordRequest(context=CTX, record=record(user_id=f"u{i}", fields=ten_fields(i)))
        for i in range(20000)
    ]
    batches = []
    for b in range(20):
        req = records_pb2.PutRecordsRequest(context=CTX)
        for j in range(1000):
            req.records.add(user_id=f"b{b * 1000 + j}", fields=ten_fields(b * 1000 + j))
        batches.append(req)
    ping, turn = health_pb2.HealthCheckRequest(), [0]

    async def put(w: int, n: int) -> None:
        turn[0] += 1
        await records.PutRecord(pool[turn[0] % len(pool)], metadata=META, timeout=30)

    async def noop(w: int, n: int) -> None:
        await health.Check(ping, timeout=30)

    async def bulk(w: int, n: int) -> None:
        await records.PutRecords(batches[(w * 7919 + n) % len(batches)], metadata=META, timeout=60)

    return {"put": put, "noop": noop, "bulk": bulk}


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    phases = args.phases.split(",")
    started = [
        start(Path(root).resolve(), tmp / name, python)
        for name, root, python in (("a", args.a, args.python_a), ("b", args.b, args.python_b))
    ]
    try:
        for _, address, creds in started:
            await wait_serving(address, creds)
        channels = [
            creds.channel(address) if creds else grpc.aio.insecure_channel(address)
            for _, address, creds in started
        ]
        fns = [calls(ch) for ch in channels]
        for f in fns:  # warm up (the first large PutRecords starts the node's helper)
            for p in phases:
                await closed_loop(f[p], PHASES[p], 1.0)
        rates: dict[tuple[int, str], list[float]] = {(k, p): [] for k in (0, 1) for p in phases}
        for r in range(args.rounds):
            for k in (0, 1) if r % 2 == 0 else (1, 0):
                for p in phases:
                    scale = 1000 if p == "bulk" else 1
                    rates[(k, p)].append(scale * await closed_loop(fns[k][p], PHASES[p], args.seconds))
        for ch in channels:
            await ch.close()
    finally:
        for proc, _, _ in started:
            proc.terminate()
            proc.wait()
    out: dict = {"benchmark": "ab", "a": args.a, "b": args.b, "rounds": args.rounds, "cpus": os.cpu_count()}
    if args.python_a != args.python_b:
        out["python_a"], out["python_b"] = args.python_a, args.python_b
    for p in phases:
        a, b = rates[(0, p)], rates[(1, p)]
        out[p] = {
            "unit": "records/s" if p == "bulk" else "calls/s",
            "a_median": round(statistics.median(a)),
            "b_median": round(statistics.median(b)),
            "b_over_a": round(statistics.median(b) / statistics.median(a), 3),
            "b_faster_rounds": sum(y > x for x, y in zip(a, b, strict=True)),
        }
    if "put" in phases and "noop" in phases:
        for k, name in ((0, "a"), (1, "b")):
            ratios = [p / q for p, q in zip(rates[(k, "put")], rates[(k, "noop")], strict=True)]
            out[f"unary_ratio_{name}"] = round(statistics.median(ratios), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="checkout A (the baseline)")
    p.add_argument("b", help="checkout B (the change)")
    p.add_argument("--python-a", default=sys.executable, help="interpreter for A (default: this one)")
    p.add_argument("--python-b", default=sys.executable, help="interpreter for B")
    p.add_argument("--phases", default="bulk,put,noop", help=f"comma-separated, from {sorted(PHASES)}")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seconds", type=float, default=1.5, help="measuring time per phase, checkout and round")
    args = p.parse_args()
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        print(json.dumps(asyncio.run(run(args, Path(tmp)))))


if __name__ == "__main__":
    main()
