"""The replicator's delivery guarantees over real processes: the S3 sink and its manifest,
dead letters, pause and resume, outages, crashes, and workers sharing one outbox by leases."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from residency.server.deployment import PRIMARY, free_ports
from residency.server.keys.region import RegionKey
from residency.v1 import admin_pb2, records_pb2, replica_pb2
from tests.conftest import BACKENDS, S3_BUCKET, S3_PREFIX, S3_REGION, Cluster, ctx, values
from tests.harness import eventually
from tests.test_erasure_on_disk import held_row, put_back_and_refused
from tests.test_metrics import prometheus_creds, scraper
from tests.test_replication import FULL, allowed_fields
from tests.test_s3_manifest import open_by_manifest

# How long a destination stays down under load in the outage test. The scenario is
# 30 s: RESIDENCY_OUTAGE_SECONDS=30 pytest tests/test_replicator.py -k outage
OUTAGE_SECONDS = float(os.environ.get("RESIDENCY_OUTAGE_SECONDS", "8"))


def region_key(c: Cluster, region: str) -> RegionKey:
    """The region's own key, unwrapped by the region's own key provider."""
    from residency.server.config.node import load_config
    from residency.server.keys.providers import open_provider

    config = load_config(c.dep.configs[region])
    return RegionKey.load(region, config.keys_dir, open_provider(config.keys))


def open_with_region_key_alone(body: bytes, manifest: dict, key: RegionKey) -> tuple[int, dict]:
    """Opens a bucket object as an affiliate would, from the manifest's recipe, with the
    region's key: `tests/test_s3_manifest.py` follows it with the `cryptography` package alone,
    the home's signature checked first."""
    copy = replica_pb2.SealedCopy.FromString(body)
    assert copy.key_id == manifest["key_id"] == key.key_id
    assert copy.transit_key_id and copy.wrapped_transit_key  # every copy sent now has one
    return open_by_manifest(body, manifest, key._raw)


def bucket_object(cluster: Cluster, user_id: str) -> bytes | None:
    client = cluster.s3.client()
    try:
        return client.get_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}copies/{user_id}.sealedcopy")[
            "Body"
        ].read()
    except client.exceptions.NoSuchKey:
        return None


def manifest(cluster: Cluster) -> dict:
    body = cluster.s3.client().get_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}manifest.json")["Body"].read()
    return json.loads(body)


async def test_s3_bucket_holds_sealed_copies_that_the_region_key_alone_opens(s3_cluster: Cluster):
    c = s3_cluster
    await c.accept_cookies("s3-1")
    await c.put("s3-1", FULL)
    await c.put("s3-2", {"name": "Only A Name"})  # nothing of it may go to eu-west-1
    await c.replicated()
    m = manifest(c)
    assert m["region"] == S3_REGION and m["home_region"] == PRIMARY
    assert m["objects"] == f"{S3_PREFIX}copies/{{user_id}}.sealedcopy"
    assert "message SealedCopy" in m["protos"]["replica.proto"]
    body = await asyncio.to_thread(bucket_object, c, "s3-1")
    assert body is not None
    for value in FULL.values():  # sealed: no value in clear in the object
        assert str(value).encode() not in body
    version, fields = open_with_region_key_alone(body, m, region_key(c, S3_REGION))
    assert version == 1
    assert fields == {n: FULL[n] for n in allowed_fields(c, S3_REGION)}
    assert await asyncio.to_thread(bucket_object, c, "s3-2") is None
    # The region node destination is served as before.
    assert set(values(await c.get("s3-1", region="ap-southeast-1"))) == allowed_fields(c, "ap-southeast-1")
    # Erasure deletes the object, and is logged for the bucket's region.
    await c.delete("s3-1")
    await c.replicated()
    assert await asyncio.to_thread(bucket_object, c, "s3-1") is None
    entries = [json.loads(e) for _, e, _ in await c.log()]
    erased = {
        e["destination_region"]
        for e in entries
        if e["kind"] == "erasure" and e["subject"] == "s3-1" and e["actor"] == "replicator"
    }
    assert erased == {"ap-southeast-1", S3_REGION}
    status = await c.replication()
    assert status[S3_REGION].sink == "s3" and status[S3_REGION].address.startswith(f"s3://{S3_BUCKET}/")


class Load:
    """Writes to a pool of users at about `rate` writes/s until stopped; remembers the
    last acknowledged version and fields of each user."""

    def __init__(self, cluster: Cluster, users: int = 100, rate: float = 100.0, prefix: str = "load"):
        self.cluster, self.users, self.rate, self.prefix = cluster, users, rate, prefix
        self.acked: dict[str, tuple[int, dict]] = {}
        self.errors = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._n = 0

    def start(self, workers: int = 4) -> None:
        self._tasks = [asyncio.create_task(self._run(w, workers)) for w in range(workers)]

    async def _run(self, w: int, workers: int) -> None:
        while not self._stop.is_set():
            self._n += 1
            i = self._n
            user = f"{self.prefix}-{i % self.users}"
            fields = {
                "email": f"{user}.{i}@example.cn",
                "name": f"N {i}",
                "language": "zh-CN",
                "national_id": f"{i:018d}",
            }
            try:
                version = await self.cluster.put(user, fields)
            except Exception:  # the primary was killed under us: not acknowledged
                self.errors += 1
                await asyncio.sleep(0.05)
                continue
            if version > self.acked.get(user, (0, {}))[0]:
                self.acked[user] = (version, fields)
            await asyncio.sleep(workers / self.rate)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def assert_everything_arrived(c: Cluster, acked: dict[str, tuple[int, dict]]) -> None:
    """Every acknowledged write is at every destination at its newest version, and no
    destination holds a field the rules do not allow."""
    allowed = {r: allowed_fields(c, r) for r in ("ap-southeast-1", S3_REGION)}
    m = manifest(c) if c.s3 else None
    key = region_key(c, S3_REGION) if c.s3 else None
    nodes = ["ap-southeast-1"] if c.s3 else ["ap-southeast-1", "eu-west-1"]
    for user, (version, fields) in acked.items():
        for region in nodes:
            copy = await c.held(user, region)
            assert copy.record.version == version, (user, region)
            assert values(copy) == {n: v for n, v in fields.items() if n in allowed[region]}
        if m is not None:
            body = await asyncio.to_thread(bucket_object, c, user)
            got_version, got = open_with_region_key_alone(body, m, key)
            assert got_version == version, user
            assert got == {n: v for n, v in fields.items() if n in allowed[S3_REGION]}


async def test_a_refused_copy_is_dead_lettered_without_blocking_others_and_retry_redrives_it(
    s3_cluster: Cluster,
):
    c = s3_cluster
    await asyncio.to_thread(c.s3.client().delete_bucket, Bucket=S3_BUCKET)  # NoSuchBucket: permanent
    for i in range(5):
        await c.put(f"dl-{i}", {"email": f"dl{i}@example.cn", "language": "zh-CN"})
    deadline = time.monotonic() + 30
    # Wait on both lanes: the region node's copies (each now also an entry in its own log) may
    # land a moment after the bucket's refusals; what matters is that they land meanwhile.
    while (
        (s := await c.replication())[S3_REGION].dead_lettered < 5
        or s[S3_REGION].pending
        or s["ap-southeast-1"].pending
    ):
        assert time.monotonic() < deadline, s
        await asyncio.sleep(0.1)
    assert "NoSuchBucket" in s[S3_REGION].last_error or s[S3_REGION].last_error == ""
    assert s["ap-southeast-1"].pending == 0  # the other destination went on
    assert s["ap-southeast-1"].dead_lettered == 0 and s[S3_REGION].pending == 0
    entries = [json.loads(e) for _, e, _ in await c.log()]
    failed = [e for e in entries if e["destination_region"] == S3_REGION and e["outcome"] == "failed"]
    assert {e["subject"] for e in failed} == {f"dl-{i}" for i in range(5)}
    assert all("NoSuchBucket" in e["reason"] for e in failed)
    # The bucket is back. A later version of dl-0 lands and supersedes its dead letter ...
    await asyncio.to_thread(c.s3.make_bucket, S3_BUCKET)
    await c.put("dl-0", {"language": "en-SG"})
    await c.replicated()
    assert (await c.replication())[S3_REGION].dead_lettered == 4
    # ... and `residency replication retry` re-drives the rest, at their current versions.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "residency.cli.main",
            "replication",
            "retry",
            *c.target(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["marked"] == "4"
    # The act is in the log, per destination, under the operator's certificate (issue 13.5).
    logged = [json.loads(e) for _, e, _ in await c.log()]
    acts = {e["destination_region"]: e for e in logged if e["kind"] == "admin"}
    assert acts[S3_REGION]["reason"] == "retried: 4 dead letters marked to be sent again"
    assert acts["ap-southeast-1"]["reason"] == "retried: 0 dead letters marked to be sent again"
    assert {e["actor"] for e in acts.values()} == {c.dep.operator.identity().uri}
    deadline = time.monotonic() + 30
    while (await c.replication())[S3_REGION].dead_lettered:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await assert_everything_arrived(
        c,
        {f"dl-{i}": (1, {"email": f"dl{i}@example.cn", "language": "zh-CN"}) for i in range(1, 5)}
        | {"dl-0": (2, {"email": "dl0@example.cn", "language": "en-SG"})},
    )


def cli(c: Cluster, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "residency.cli.main", *args, *c.target()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cpu_seconds(pid: int, over: float) -> float:
    """CPU time (user + system) process `pid` uses in the next `over` seconds (Linux /proc)."""

    def used() -> float:
        stat = Path(f"/proc/{pid}/stat").read_text()
        utime, stime = stat.rpartition(")")[2].split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    before = used()
    time.sleep(over)
    return used() - before


async def test_pause_holds_a_destination_and_resume_catches_up(cluster: Cluster):
    cli(cluster, "replication", "pause", "--region", "eu-west-1")
    for i in range(10):
        await cluster.put(f"p-{i}", {"email": f"p{i}@example.cn", "language": "zh-CN"})
    # A paused destination waits for news; it does not spin on the writes' wake-ups.
    busy = cpu_seconds(cluster.dep.procs[PRIMARY].pid, over=1.5)
    assert busy < 0.5, f"the primary used {busy:.2f} s of CPU in 1.5 s with nothing to do"
    status = {d["region"]: d for d in cli(cluster, "replication", "status")["destinations"]}
    assert status["eu-west-1"]["paused"] is True and int(status["eu-west-1"]["pending"]) >= 10
    assert status["ap-southeast-1"]["paused"] is False and int(status["ap-southeast-1"]["pending"]) == 0
    cli(cluster, "replication", "resume", "--region", "eu-west-1")
    await cluster.replicated()
    got = await cluster.held("p-9", "eu-west-1")
    assert values(got) == {"email": "p9@example.cn", "language": "zh-CN"}


async def test_outage_of_a_region_node_then_of_the_s3_server_under_load_loses_nothing(s3_cluster: Cluster):
    """Each destination down for OUTAGE_SECONDS under steady writes: the other one keeps
    its lag low meanwhile, and the one that was down catches up with nothing lost."""
    c = s3_cluster
    load = Load(c, users=200, rate=100)
    load.start()
    # Warm up under load first: SeaweedFS grows a bucket's volumes during its first seconds
    # of writes, a stall of its own that is not what this test measures.
    await asyncio.sleep(4.0)
    try:
        for down, up in (("ap-southeast-1", S3_REGION), (S3_REGION, "ap-southeast-1")):
            await caught_up(c)
            if down == S3_REGION:
                c.s3.stop()
            else:
                c.stop(down)
            worst = 0.0
            end = time.monotonic() + OUTAGE_SECONDS
            while time.monotonic() < end:
                s = await c.replication()
                worst = max(worst, s[up].lag_seconds)
                await asyncio.sleep(0.2)
            assert s[down].pending > 0 and s[down].last_error
            assert worst < 2.0, f"{up} lagged {worst:.1f} s while {down} was down"
            t = time.monotonic()
            if down == S3_REGION:
                await asyncio.to_thread(c.s3.start)
            else:
                await c.start(down)
            print(f"{down} back in {time.monotonic() - t:.1f} s")
            await caught_up(c)
            print(f"{down} caught up in {time.monotonic() - t:.1f} s")
    finally:
        await load.stop()
    await c.replicated(timeout=120)
    assert len(load.acked) == 200
    await assert_everything_arrived(c, load.acked)


async def test_sigkill_of_the_primary_under_load_loses_no_acknowledged_write(s3_cluster: Cluster):
    c = s3_cluster
    load = Load(c, users=100, rate=200, prefix="kill")
    load.start()
    await asyncio.sleep(2.0)
    assert c.stop(PRIMARY, signal.SIGKILL) == -signal.SIGKILL
    await load.stop()
    await c.start(PRIMARY)
    await c.replicated(timeout=120)
    assert load.acked
    for user, (version, _) in load.acked.items():
        assert (await c.get(user)).record.version >= version
    # What the primary holds now is what must be everywhere (a write in flight at the kill
    # may have committed without its acknowledgement).
    current = {u: (((r := await c.get(u)).record.version), values(r)) for u in load.acked}
    await assert_everything_arrived(c, current)
    assert_versions_only_increase([json.loads(e) for _, e, _ in await c.log()])


async def caught_up(c: Cluster, within: float = 60.0) -> None:
    """Waits (under load) until every destination's lag is below half a second."""
    end = time.monotonic() + within
    while any(d.lag_seconds > 0.5 for d in (await c.replication()).values()):
        assert time.monotonic() < end, "replication did not catch up"
        await asyncio.sleep(0.1)


def assert_versions_only_increase(entries: list[dict]) -> None:
    """Per destination and user, each version is shipped (logged) once, in increasing order."""
    last: dict[tuple[str, str], int] = {}
    for e in entries:
        if e["kind"] in ("replication", "erasure") and e["outcome"] != "failed":
            k = (e["destination_region"], e["subject"])
            assert e["record_version"] > last.get(k, 0), (k, e["record_version"], last.get(k))
            last[k] = e["record_version"]


def start_worker(c: Cluster, n: int) -> subprocess.Popen:
    out = open(c.dir / f"worker-{n}.log", "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(
        [sys.executable, "-m", "residency.cli.main", "replicate", "--config", str(c.dep.configs[PRIMARY])],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("store_backend", BACKENDS)
async def test_workers_share_one_outbox_by_leases_and_a_killed_holder_is_replaced(
    tmp_path: Path, primary_store: dict | None
):
    """Standalone workers (on PostgreSQL they could be on several hosts) take the destinations'
    leases in the store, one each; one killed while it holds its lease is replaced once its
    lease and its presence expire."""
    c = Cluster(
        tmp_path / "deployment",
        replicator={"enabled": False, "lease_seconds": 3.0, "ship_timeout": 1.0},
        store=primary_store,
    )
    workers: dict[int, subprocess.Popen] = {}
    try:
        await c.start()
        for n in range(2):
            w = start_worker(c, n)
            workers[w.pid] = w
        load = Load(c, users=50, rate=100, prefix="lease")
        load.start()

        async def owners() -> list[int]:
            return [
                int(d.lease_owner.split(":")[1]) if d.lease_owner else 0
                for d in (await c.replication()).values()
            ]

        async def one_each() -> bool:
            return sorted(await owners()) == sorted(workers)

        await eventually(one_each, "each worker holds one of the two leases")
        holder = (await owners())[0]
        await asyncio.sleep(1.0)
        workers[holder].send_signal(signal.SIGKILL)  # mid-load, holding a lease
        workers[holder].wait()
        (survivor,) = set(workers) - {holder}

        async def survivor_holds_both() -> bool:
            return await owners() == [survivor, survivor]

        await eventually(survivor_holds_both, "the survivor takes the killed worker's lease")
        await load.stop()
        await c.replicated(timeout=60)
        assert await survivor_holds_both()
        await assert_everything_arrived(c, load.acked)
        assert_versions_only_increase([json.loads(e) for _, e, _ in await c.log()])
        assert workers[survivor].poll() is None
        workers[survivor].terminate()  # hands its leases over and exits 0
        assert workers[survivor].wait(30) == 0
    finally:
        for w in workers.values():
            if w.poll() is None:
                w.kill()
                w.wait()
        await c.close()


def test_an_s3_destination_config_is_checked_naming_the_key(tmp_path: Path):
    import pytest
    import yaml

    from residency.server.config.node import load_config
    from residency.server.core.errors import ConfigError
    from residency.server.deployment import init_deployment

    path = init_deployment(tmp_path)[PRIMARY]
    doc = yaml.safe_load(path.read_text())
    good = {
        "region": S3_REGION,
        "sink": "s3",
        "bucket": "b-1",
        "prefix": "r",
        "public_key": "keys/eu-west-1/region.pub",
    }
    doc["affiliates"][1] = good
    path.write_text(yaml.safe_dump(doc))
    a = load_config(path).affiliates[1]
    assert (a.sink, a.bucket, a.prefix, a.address) == ("s3", "b-1", "r/", "")
    for broken, message in (
        ({**good, "bucket": ""}, "'affiliates[1].bucket' is required for sink s3"),
        ({**good, "sink": "ftp"}, "'affiliates[1].sink' must be one of"),
        ({**good, "address": "127.0.0.1:1"}, "unknown key(s) ['address'] for sink s3"),
        ({**good, "max_rate": -5}, "'affiliates[1].max_rate' must be a number of records per second"),
        ({**good, "max_rate": "fast"}, "'affiliates[1].max_rate' must be a number of records per second"),
    ):
        doc["affiliates"][1] = broken
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path)
    doc["affiliates"][1] = good
    doc["replicator"] = {"lease_seconds": 4, "ship_timeout": 3}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="'replicator.ship_timeout' must be above 0 and at most half"):
        load_config(path)


async def test_a_copy_the_rules_no_longer_allow_is_withdrawn_from_bucket_and_logged(s3_cluster: Cluster):
    """Withdrawal is the general tombstone path: here the rules stop sending anything to
    eu-west-1 while the primary is stopped; its start re-projects every record under them and
    withdraws the bucket's object, no write needed (rule changes, consent withdrawal, grant end
    and retention expiry all come down to this)."""
    import yaml

    c = s3_cluster
    await c.put("w-1", {"email": "w@example.cn", "language": "zh-CN"})
    await c.replicated()
    assert await asyncio.to_thread(bucket_object, c, "w-1") is not None
    c.stop(PRIMARY)
    rules = yaml.safe_load((c.dir / "rules.yaml").read_text())
    rules["rules"] = [r for r in rules["rules"] if r["recipient"] != "ie-affiliate"]
    (c.dir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    await c.start(PRIMARY)

    async def withdrawn() -> bool:
        await c.replicated()
        return await asyncio.to_thread(bucket_object, c, "w-1") is None

    await eventually(withdrawn, "the start's re-projection withdraws the bucket's object")
    entries = [json.loads(e) for _, e, _ in await c.log()]
    last = [e for e in entries if e["subject"] == "w-1" and e["destination_region"] == S3_REGION][-1]
    assert (last["kind"], last["outcome"], last["record_version"]) == ("erasure", "allowed", 2)
    assert last["reason"].startswith("withdrawn")
    await c.put("w-1", {"name": "W"})
    await c.replicated()
    assert await asyncio.to_thread(bucket_object, c, "w-1") is None
    assert values(await c.get("w-1", region="ap-southeast-1"))["name"] == "W"


async def test_workers_limited_to_a_region_each_share_the_outbox_without_losing_entries(tmp_path: Path):
    """...and each serves its metrics (`--metrics-listen`): its lease and its batches."""
    c = Cluster(tmp_path / "deployment", replicator={"enabled": False})
    workers: list[subprocess.Popen] = []
    try:
        await c.start()
        ports = free_ports(2)
        for region, port in zip(("ap-southeast-1", "eu-west-1"), ports, strict=True):
            out = open(c.dir / f"worker-{region}.log", "ab")  # noqa: SIM115 - handed to the child
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "residency.cli.main",
                        "replicate",
                        "--config",
                        str(c.dep.configs[PRIMARY]),
                    ]
                    + ["--region", region, "--metrics-listen", f"127.0.0.1:{port}"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        for i in range(30):
            await c.put(f"r-{i}", {"email": f"r{i}@example.cn", "language": "zh-CN"})
        await c.replicated()
        owners = {r: int(d.lease_owner.split(":")[1]) for r, d in (await c.replication()).items()}
        assert owners == {"ap-southeast-1": workers[0].pid, "eu-west-1": workers[1].pid}
        for region in ("ap-southeast-1", "eu-west-1"):
            got = await c.held("r-29", region)
            assert values(got) == {"email": "r29@example.cn", "language": "zh-CN"}

        async def serves_its_lease_and_batches(region: str, port: int) -> bool:
            async with scraper(prometheus_creds(c)) as client:  # over mutual TLS, as the node's
                text = (await client.get(f"https://127.0.0.1:{port}/metrics", timeout=10)).text
            m = {f.name: f.samples for f in text_string_to_metric_families(text)}
            held = {s.labels["destination"]: s.value for s in m["residency_replication_lease_held"]}
            shipped = [
                s.value
                for s in m["residency_replication_batch_seconds"]
                if s.name.endswith("_count") and s.labels == {"destination": region, "step": "ship"}
            ]
            # Its own destination only, its lease held, its batches counted.
            return held == {region: 1.0} and shipped[:1] >= [1.0]

        for region, port in zip(("ap-southeast-1", "eu-west-1"), ports, strict=True):
            check = functools.partial(serves_its_lease_and_batches, region, port)
            await eventually(check, f"the {region} worker's metrics")
        # SIGHUP rereads its metrics port's certificate, and does not end it.
        workers[0].send_signal(signal.SIGHUP)

        async def reread() -> bool:
            return "TLS reloaded" in (c.dir / "worker-ap-southeast-1.log").read_text(errors="replace")

        await eventually(reread, "the worker rereads its certificate on SIGHUP")
        assert workers[0].poll() is None
        await eventually(
            functools.partial(serves_its_lease_and_batches, "ap-southeast-1", ports[0]), "metrics"
        )
        # A worker that cannot serve its metrics says so and stops before taking any lease.
        busy = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "residency.cli.main", "replicate", "--config", str(c.dep.configs[PRIMARY])]
            + ["--metrics-listen", f"127.0.0.1:{ports[0]}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 2, busy.stderr
        assert f"--metrics-listen 127.0.0.1:{ports[0]}: cannot listen there" in busy.stderr
        assert "started for" not in busy.stderr  # it never ran: no lease taken, no presence
        owners = {r: int(d.lease_owner.split(":")[1]) for r, d in (await c.replication()).items()}
        assert owners == {"ap-southeast-1": workers[0].pid, "eu-west-1": workers[1].pid}
        for w in workers:
            w.terminate()
            assert w.wait(30) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        await c.close()


@contextlib.contextmanager
def standalone_worker(c: Cluster, log: Path) -> Iterator[None]:
    """A `residency replicate` worker for the primary in its own process, printing to `log`."""
    with open(log, "ab") as out:
        command = ["replicate", "--config", str(c.dep.configs[PRIMARY])]
        worker = subprocess.Popen(
            [sys.executable, "-m", "residency.cli.main", *command], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


async def test_a_standalone_worker_stops_opening_records_once_the_home_key_is_shredded(tmp_path: Path):
    """A shred made through the node reaches a worker in its own process (which holds keys
    of its own in memory): what it has not shipped yet stays home."""
    sg = "ap-southeast-1"
    c = Cluster(tmp_path / "deployment", replicator={"enabled": False})
    log = c.dir / "worker.log"
    try:
        await c.start()
        with standalone_worker(c, log):
            await c.put("k-1", {"email": "k1@example.cn", "language": "zh-CN"})
            await c.replicated()
            assert values(await c.held("k-1", sg))["language"] == "zh-CN"
            cli(c, "replication", "pause", "--region", sg)
            await c.put("k-2", {"email": "k2@example.cn", "language": "zh-CN"})
            op = c.dep.operator
            flags = ["--cert", str(op.cert), "--key", str(op.key), "--ca", str(op.ca)]
            target = ["--target", c.dep.addresses[PRIMARY], "--region", PRIMARY, "--yes"]
            shred = subprocess.run(
                [sys.executable, "-m", "residency.cli.main", "keys", "shred", *target, *flags],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert shred.returncode == 0, shred.stderr

            async def worker_knows() -> bool:
                return "shredded" in log.read_text(errors="replace")

            await eventually(worker_knows, "the worker acts on the shred")
            cli(c, "replication", "resume", "--region", sg)

            async def refused_to_open() -> bool:
                return "shredded" in (await c.replication())[sg].last_error

            await eventually(refused_to_open, "the worker's batch for ap-southeast-1 fails: key shredded")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.held("k-2", sg)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await c.close()


async def test_a_standalone_worker_ships_a_user_erased_and_written_again_under_a_new_key(tmp_path: Path):
    """A worker in its own process on the node's SQLite store hears of no erasure: it held
    the user's old key when the node erased the user and wrote them again (replication
    paused, so no tombstone reached it). It opens the new record under the keyring's key, not
    the old one it cached, and seals its copy under a new copy key."""
    sg = "ap-southeast-1"
    c = Cluster(tmp_path / "deployment", replicator={"enabled": False})
    try:
        await c.start()
        with standalone_worker(c, c.dir / "worker.log"):
            await c.put("w-1", {"name": "Old Name"})
            await c.replicated()
            assert values(await c.held("w-1", sg))["name"] == "Old Name"
            old = held_row(c, sg, "w-1")
            cli(c, "replication", "pause", "--region", sg)
            await c.delete("w-1")
            await c.put("w-1", {"name": "New Name"})
            cli(c, "replication", "resume", "--region", sg)

            async def shipped() -> bool:
                try:
                    return values(await c.held("w-1", sg))["name"] == "New Name"
                except grpc.aio.AioRpcError:
                    return False

            await eventually(shipped, "the worker ships the user written again")
            status = (await c.replication())[sg]
            assert status.dead_lettered == 0 and status.last_error == ""
            await put_back_and_refused(c, sg, "w-1", old)  # the copy came under a new copy key
    finally:
        await c.close()


def _open_store(path: str, start: float) -> int:
    from residency.server.storage.postgres import PostgresStore
    from residency.server.storage.sqlite import SqliteStore

    time.sleep(max(0.0, start - time.time()))  # every process opens at the same moment
    if path.startswith("host="):
        pg = PostgresStore(path)
        version = pg._schema_version()
        pg.close()
        return version
    store = SqliteStore(path)
    version = store._db.execute("PRAGMA user_version").fetchone()[0]
    store.close()
    return version


@pytest.mark.parametrize("store_backend", BACKENDS)
def test_workers_opening_a_new_store_at_once_each_find_it_migrated(
    tmp_path: Path, store_backend: str, request: pytest.FixtureRequest
):
    """The primary and its standalone workers may start together on a fresh data_dir: each
    migration (and the switch to WAL) runs once, under the write lock, instead of failing
    with 'table exists' or 'database is locked'."""
    import multiprocessing

    from residency.server.storage.database import MIGRATIONS

    with multiprocessing.get_context("spawn").Pool(6) as pool:
        pool.starmap(time.sleep, [(0,)] * 6)  # every process up before the first race
        for attempt in range(10):
            path = str(tmp_path / f"node-{attempt}.db")
            if store_backend == "postgres":
                pg = request.getfixturevalue("postgres_server")
                path = pg.dsn(pg.database())
            versions = pool.starmap(_open_store, [(path, time.time() + 0.3)] * 6)
            assert versions == [len(MIGRATIONS)] * 6, attempt


async def test_a_destination_with_max_rate_is_paced_and_the_others_are_not(tmp_path: Path):
    c = Cluster(
        tmp_path / "deployment", affiliates={"eu-west-1": {"max_rate": 40}}, replicator={"batch_size": 10}
    )
    try:
        await c.start()
        req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
        for i in range(120):
            req.records.add(user_id=f"m-{i}").fields["email"].string_value = f"m{i}@example.cn"
        status = await c.replication()
        assert (status["eu-west-1"].max_rate, status["ap-southeast-1"].max_rate) == (40, 0)
        began = time.monotonic()
        await c.records().PutRecords(req, timeout=30)
        done: dict[str, float] = {}
        while len(done) < 2:
            assert time.monotonic() - began < 60, f"not caught up: {done}"
            for region, d in (await c.replication()).items():
                if region not in done and d.pending == 0:
                    done[region] = time.monotonic() - began
            await asyncio.sleep(0.05)
        # 120 copies at 40/s in batches of 10: the last batch may not leave before 2.75 s.
        assert done["eu-west-1"] >= 2.7, done
        assert done["ap-southeast-1"] < done["eu-west-1"] - 1.0, done
        got = await c.held("m-119", "eu-west-1")
        assert values(got) == {"email": "m119@example.cn"}
    finally:
        await c.close()


async def test_the_next_batch_is_prepared_while_one_ships_and_never_ships_stale(tmp_path: Path):
    """While a batch ships, the store thread prepares the next one (the worker's sealing and the
    destination's applying overlap), one batch ahead at most: with ap-southeast-1's node
    stopped (SIGSTOP) mid-drain, the second batch is prepared and none has shipped, and the
    first batch's retries prepare nothing more. A batch prepared ahead ships only while it is
    fresh: here the first batch needed retries, so the second is prepared again, and a user
    of it erased meanwhile never has a live copy applied in the region."""
    from tests.faults.tools import gone, log_entries
    from tests.test_metrics import scrape, value

    sg = "ap-southeast-1"
    c = Cluster(tmp_path / "deployment", replicator={"batch_size": 10, "ship_timeout": 1.0})

    async def steps() -> tuple[float, float]:
        m = (await scrape(c))["residency_replication_batch_seconds"]
        name = "residency_replication_batch_seconds_count"
        return value(m, name, destination=sg, step="prepare"), value(m, name, destination=sg, step="ship")

    stopped = False
    try:
        await c.start()
        await c.admin().PauseReplication(admin_pb2.PauseReplicationRequest(region=sg), timeout=10)
        req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
        for i in range(30):
            req.records.add(user_id=f"b-{i}").fields["email"].string_value = f"b{i}@example.cn"
        await c.records().PutRecords(req, timeout=30)
        assert await steps() == (0, 0)
        c.dep.procs[sg].send_signal(signal.SIGSTOP)
        stopped = True
        await c.admin().ResumeReplication(admin_pb2.ResumeReplicationRequest(region=sg), timeout=10)

        async def second_prepared() -> bool:
            return (await steps())[0] >= 2

        await eventually(second_prepared, "the second batch prepared while the first ships", 30)
        await c.delete("b-15")  # in the second batch, prepared before this erasure
        log = c.data_dir(PRIMARY) / "node.log"

        async def retried() -> bool:
            return f"replication to {sg} failed" in log.read_text(errors="replace")

        await eventually(retried, "the first batch's shipping timed out and is retried", 30)
        assert await steps() == (2, 0)  # one batch ahead, not more, and nothing shipped
        c.dep.procs[sg].send_signal(signal.SIGCONT)
        stopped = False
        await c.replicated()
        # Four batches shipped (the erasure's tombstone the fourth); the second was prepared
        # again, stale after the first's retries.
        prepared, shipped = await steps()
        assert shipped == 4 and prepared >= 5, (prepared, shipped)
        assert values(await c.held("b-0", sg)) == {"email": "b0@example.cn"}
        assert values(await c.held("b-29", sg)) == {"email": "b29@example.cn"}
        assert await gone(c, "b-15", sg)
        applied = [
            e
            for e in await log_entries(c, sg)
            if e["subject"] == "b-15" and e["kind"] == "replication" and e["outcome"] == "allowed"
        ]
        assert applied == [], applied
    finally:
        if stopped:
            c.dep.procs[sg].send_signal(signal.SIGCONT)
        await c.close()


@pytest.mark.parametrize("listen", ["9464", "nonsense", "127.0.0.1:0", "127.0.0.1:65536", ":9464", "h:9²"])
def test_replicate_refuses_a_metrics_listen_that_is_not_host_port(listen: str, capsys):
    from residency.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["replicate", "--config", "cn-north.yaml", "--metrics-listen", listen])
    assert e.value.code == 2
    assert f"--metrics-listen: {listen!r} is not HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::1]:9464", "localhost:9464", "127.0.0.1:1"])
def test_replicate_takes_a_metrics_listen_of_host_and_port(listen: str):
    from residency.cli.main import build_parser

    args = build_parser().parse_args(["replicate", "--config", "cn-north.yaml", "--metrics-listen", listen])
    assert args.metrics_listen == listen
