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
In the same run, the same for two minimal raw clients that send the sink's requests (same
bodies, headers and conditions, same concurrency) and do nothing else: the same requests
written by hand on sockets (`Http11Client`, `sink_to_http11`: sink objects/s over its PUT/s,
median of the rounds' ratios), the least any client can do, so the ratio says how much of the
limit is the sink's own work rather than SeaweedFS's; and an aiohttp client (`RawClient`,
`sink_to_raw`), the HTTP library the sink used before its own connection pool.
Each round runs the three one after another, so the machine's load drifts across all alike.
With `--baseline`, the same for the previous sink (a boto3 client's `put_object` in a
thread pool of `--concurrency` threads) on `--baseline-objects` users a round.
Prints one JSON line with per-round figures and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# SeaweedFS takes these as its one identity (so it checks our signatures); boto3 and the
# sink find them through the standard chain.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "residency-bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "residency-bench-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from residency.replicator.sinks.s3 import VERSION_HEADER, S3Sink, object_key, sigv4_headers  # noqa: E402
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
    """The sink before its own HTTP: boto3 `put_object` in a bounded thread pool, a batch's
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


def signed_put(
    c: replica_pb2.SealedCopy, host: str, credentials: Any, conditional: bool
) -> tuple[str, dict[str, str], bytes]:
    """The sink's PUT of a user's first copy: path, signed headers and body."""
    body = c.SerializeToString()
    path = f"/{BUCKET}/{object_key(PREFIX, c.user_id)}"
    headers = {"Content-Type": "application/x-protobuf", VERSION_HEADER: str(c.version)}
    if conditional:
        headers["If-None-Match"] = "*"
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    digest = hashlib.sha256(body).hexdigest()
    return path, sigv4_headers("PUT", host, path, headers, digest, credentials, "us-east-1", amz_date), body


class RawClient:
    """A library client to compare the sink with: aiohttp keep-alive PUTs signed with the sink's SigV4
    signer, the same bodies and headers the sink sends (`If-None-Match: *` for a first copy
    unless `--unconditional`), `concurrency` requests in flight on one connection pool, and
    nothing else: no fence, no entity tags kept, answers' headers not read. It takes a whole
    round's objects at once, so it has no batch boundaries to drain at either."""

    def __init__(self, endpoint: str, concurrency: int, conditional: bool):
        from botocore.session import get_session

        self._endpoint = endpoint
        self._host = endpoint.split("://", 1)[1]
        self._concurrency = concurrency
        self._conditional = conditional
        self._credentials = get_session().get_credentials().get_frozen_credentials()
        self._http: Any = None

    async def apply(self, source_region: str, batch: list[replica_pb2.SealedCopy]) -> None:
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._concurrency))
        todo = iter(batch)

        async def worker() -> None:
            for c in todo:
                path, headers, body = signed_put(c, self._host, self._credentials, self._conditional)
                async with self._http.put(self._endpoint + path, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"raw PUT answered {r.status}")

        await asyncio.gather(*(worker() for _ in range(self._concurrency)))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


class Http11Client(RawClient):
    """The floor to compare the sink with, below any HTTP library: the same signed PUTs
    written by hand as HTTP/1.1 on `concurrency` keep-alive asyncio streams, answers read by
    Content-Length. Plain http and a 200 with a Content-Length only: enough for SeaweedFS,
    not a client to ship (the sink's `sinks.http` is that client: TLS, proxies, every
    answer form, connections the endpoint closed)."""

    async def apply(self, source_region: str, batch: list[replica_pb2.SealedCopy]) -> None:
        todo = iter(batch)
        host, _, port = self._host.rpartition(":")

        async def worker() -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                for c in todo:
                    path, headers, body = signed_put(c, self._host, self._credentials, self._conditional)
                    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                    writer.write(
                        f"PUT {path} HTTP/1.1\r\n{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body
                    )
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"raw PUT answered {head[:12]!r}")
                    length = next(
                        (
                            int(v)
                            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                            if k.lower() == b"content-length"
                        ),
                        0,
                    )
                    await reader.readexactly(length)
            finally:
                writer.close()

        await asyncio.gather(*(worker() for _ in range(self._concurrency)))


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
    conditional = not args.unconditional

    def sink() -> S3Sink:
        return S3Sink(
            home_region="cn-north",
            recipient=RecipientKey("eu-west-1", b"\x01" * 32),
            home_key=b"\x02" * 32,
            bucket=BUCKET,
            prefix=PREFIX,
            endpoint_url=s3.endpoint,
            concurrency=args.concurrency,
            conditional=conditional,
        )

    new: list[dict] = []
    raw: list[dict] = []
    http11: list[dict] = []
    clients: list[tuple[str, list[dict], Callable[[], Any], int | None]] = [
        ("new", new, sink, args.batch),
        ("raw", raw, lambda: RawClient(s3.endpoint, args.concurrency, conditional), None),
        ("http11", http11, lambda: Http11Client(s3.endpoint, args.concurrency, conditional), None),
    ]
    for r in range(args.rounds):
        # Each first in turn: SeaweedFS slows a little as it fills, and the load drifts.
        for name, rounds, make, batch in clients[r % 3 :] + clients[: r % 3]:
            client = make()
            try:
                items = copies(f"{name}{r}", args.objects + 1)
                rounds.append(await one_round(client, pid, items, batch or len(items)))
            finally:
                await client.close()
    out = {"sink": summary(new), "raw": summary(raw), "http11": summary(http11)}
    for name, floor in (("raw", raw), ("http11", http11)):
        ratios = [n["objects_per_s"] / f["objects_per_s"] for n, f in zip(new, floor, strict=True)]
        out[f"sink_to_{name}"] = {
            "median": round(statistics.median(ratios), 2),
            "rounds": [round(x, 2) for x in ratios],
        }
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
            out["sink"]["median_objects_per_s"] / out["boto3"]["median_objects_per_s"], 1
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
