"""Benchmark: the S3 sink's throughput and client CPU per object, against a local SeaweedFS.

Starts SeaweedFS (the tests' `SeaweedFS`, checking SigV4 signatures against the credentials
in the environment) and drives `S3Sink.apply` with batches of `--batch` copies, as the
worker does, for `--objects` new users per round. Each copy is a realistic SealedCopy of
about 400 bytes: two sealed fields (nonce || ciphertext || tag), an HPKE-wrapped data key,
categories, timestamps. Per round it measures:
- objects/s (wall clock);
- client CPU per object (`time.process_time`: every thread of this process);
- SeaweedFS's CPU per PUT (utime + stime of the `weed` process, from /proc): on a small
  machine that is the ceiling, since client and server share its cores.
With `--baseline`, the same for the previous sink (a boto3 client's `put_object` in a
thread pool of `--concurrency` threads) on `--baseline-objects` users a round.
Prints one JSON line with per-round figures and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# SeaweedFS takes these as its one identity (so it checks our signatures); boto3 and the
# sink find them through the standard chain.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "residency-bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "residency-bench-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from residency.replicator.sinks.s3 import S3Sink, object_key  # noqa: E402
from residency.server.keys.region import RecipientKey  # noqa: E402
from residency.v1 import replica_pb2  # noqa: E402
from tests.conftest import SeaweedFS  # noqa: E402

BUCKET, PREFIX = "bench-copies", "residency/"


def copies(round_name: str, n: int) -> list[replica_pb2.SealedCopy]:
    out = []
    for i in range(n):
        c = replica_pb2.SealedCopy(
            user_id=f"{round_name}-user-{i:08d}",
            version=1,
            key_id="3f9a0c1b2d4e5f60",
            wrapped_data_key=os.urandom(32 + 32 + 16),  # HPKE enc || AES-256-GCM(data key)
            sealed_fields={
                "name": os.urandom(12 + 24 + 16),
                "email": os.urandom(12 + 32 + 16),
            },
            source="registration",
            home_region="cn-north",
            categories={"name": "user.name", "email": "user.contact.email"},
            rules_version="rules-2026-11-27T10:00:00Z-7d3e",
        )
        c.created_at.GetCurrentTime()
        c.updated_at.GetCurrentTime()
        out.append(c)
    return out


def weed_cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the command's ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Boto3Sink:
    """The sink before aiohttp: boto3 `put_object` in a bounded thread pool, a batch's
    objects in parallel (the removed code's hot path, for comparison)."""

    def __init__(self, endpoint: str, concurrency: int, timeout: float = 5.0):
        import boto3
        from botocore.config import Config

        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                max_pool_connections=concurrency,
            ),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency)

    def _put(self, c: replica_pb2.SealedCopy) -> None:
        self._client.put_object(
            Bucket=BUCKET,
            Key=object_key(PREFIX, c.user_id),
            Body=c.SerializeToString(),
            ContentType="application/x-protobuf",
            Metadata={"residency-version": str(c.version)},
        )

    async def apply(self, source_region: str, batch: list[replica_pb2.SealedCopy]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, self._put, c) for c in batch))

    async def close(self) -> None:
        self._pool.shutdown()
        self._client.close()


async def one_round(sink, weed_pid: int, items: list[replica_pb2.SealedCopy], batch: int) -> dict:
    await sink.apply("cn-north", items[:1])  # connections, credentials, the manifest: not timed
    items = items[1:]
    load = os.getloadavg()[0]
    cpu, weed, t = time.process_time(), weed_cpu_seconds(weed_pid), time.perf_counter()
    for i in range(0, len(items), batch):
        await sink.apply("cn-north", items[i : i + batch])
    wall = time.perf_counter() - t
    cpu, weed = time.process_time() - cpu, weed_cpu_seconds(weed_pid) - weed
    return {
        "objects_per_s": round(len(items) / wall),
        "client_cpu_us_per_object": round(cpu / len(items) * 1e6),
        "weed_cpu_us_per_put": round(weed / len(items) * 1e6),
        "load_average": round(load, 1),
    }


def summary(rounds: list[dict]) -> dict:
    keys = ("objects_per_s", "client_cpu_us_per_object", "weed_cpu_us_per_put")
    return {**{f"median_{k}": round(statistics.median(r[k] for r in rounds)) for k in keys}, "rounds": rounds}


async def bench(s3: SeaweedFS, args: argparse.Namespace) -> dict:
    pid = s3.proc.pid
    new = []
    for r in range(args.rounds):
        sink = S3Sink(
            home_region="cn-north",
            recipient=RecipientKey("eu-west-1", b"\x01" * 32),
            home_key=b"\x02" * 32,
            bucket=BUCKET,
            prefix=PREFIX,
            endpoint_url=s3.endpoint,
            concurrency=args.concurrency,
            conditional=not args.unconditional,
        )
        try:
            new.append(await one_round(sink, pid, copies(f"new{r}", args.objects + 1), args.batch))
        finally:
            await sink.close()
    out = {"aiohttp": summary(new)}
    if args.baseline:
        old = []
        for r in range(args.rounds):
            sink = Boto3Sink(s3.endpoint, args.concurrency)
            try:
                items = copies(f"old{r}", args.baseline_objects + 1)
                old.append(await one_round(sink, pid, items, args.batch))
            finally:
                await sink.close()
        out["boto3"] = summary(old)
        out["speedup_objects_per_s"] = round(
            out["aiohttp"]["median_objects_per_s"] / out["boto3"]["median_objects_per_s"], 1
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--unconditional", action="store_true", help="PUTs without If-Match / If-None-Match (and no HEAD)"
    )
    ap.add_argument("--baseline", action="store_true", help="also measure the boto3 thread-pool sink")
    ap.add_argument("--baseline-objects", type=int, default=5_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as d:
        s3 = SeaweedFS(Path(d))
        s3.start()
        try:
            s3.make_bucket(BUCKET)
            size = len(copies("size", 1)[0].SerializeToString())
            result = asyncio.run(bench(s3, args))
        finally:
            s3.stop()
    print(
        json.dumps(
            {
                "objects": args.objects,
                "batch": args.batch,
                "concurrency": args.concurrency,
                "object_bytes": size,
                "cpus": os.cpu_count(),
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
