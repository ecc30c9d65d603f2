"""Prometheus metrics (`metrics: {listen: HOST:PORT}`): calls by service, method and code,
refusals by reason, replication per destination, the outbox, the transfer log and its
checkpoint, key-provider calls and group commits; never a user id or a value in a label; and
a real Prometheus server scraping a live deployment reads the lag per destination back."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from residency.cli.channel import Credentials
from residency.server.deployment import AFFILIATES, PRIMARY, free_ports
from residency.v1 import admin_pb2, admin_pb2_grpc, records_pb2
from tests.conftest import Cluster, Service, ctx

# Values that must never show in metrics: user ids, a field's value, a purpose's free text.
SENTINEL_USER = "u-sentinel-7f3a9c"
SENTINEL_VALUE = "sentinel-value-4b1e@example.com"


# How a TLS client sees a refusal: its handshake, or its first read, fails.
REFUSED = (httpx.HTTPError, ssl.SSLError)


def metrics_url(cluster: Cluster, region: str = PRIMARY) -> str:
    config = yaml.safe_load(cluster.dep.configs[region].read_text())
    return f"https://{config['metrics']['listen']}/metrics"


def scraper(creds: Credentials | None, ca: Path | None = None) -> httpx.AsyncClient:
    """An HTTPS client that trusts the deployment's CA (`ca`, or `creds`') and presents `creds`
    (Prometheus's: a certificate of the CA that holds no permission, a `recipient` without
    grants), or no certificate."""
    context = ssl.create_default_context(cafile=str(ca or (creds.ca if creds else None)))
    if creds is not None:
        context.load_cert_chain(str(creds.cert), str(creds.key))
    return httpx.AsyncClient(verify=context)


def prometheus_creds(cluster: Cluster) -> Credentials:
    return cluster.dep.credentials("recipient", PRIMARY, "prometheus")


async def scrape(cluster: Cluster, region: str = PRIMARY) -> dict[str, list]:
    async with scraper(prometheus_creds(cluster)) as client:
        text = (await client.get(metrics_url(cluster, region), timeout=10)).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    """The sample `name` with these labels (0 when there is none)."""
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


async def test_calls_refusals_replication_and_the_store_are_measured(cluster: Cluster):
    for i in range(20):
        await cluster.put(f"u-m{i}", {"email": f"m{i}@example.com"})
    await cluster.replicated()
    # A service that may not call AdminService is refused: a PERMISSION_DENIED, counted.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        service = admin_pb2_grpc.AdminServiceStub(cluster.channel(PRIMARY, "service"))
        await service.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # An invalid record: INVALID_ARGUMENT, counted by its reason.
    with pytest.raises(grpc.aio.AioRpcError):
        await cluster.records().PutRecord(
            records_pb2.PutRecordRequest(
                context=ctx(PRIMARY, "essential.service"), record=records_pb2.Record()
            ),
            timeout=10,
        )
    m = await scrape(cluster)
    # Every metric the docs list is served (the alerts and dashboard are held to that list).
    from tests.test_alerts import documented_metrics

    # (families: a counter's is named without _total; a labelled one may have no sample yet)
    missing = sorted(d for d in documented_metrics() if d not in m and d.removesuffix("_total") not in m)
    assert not missing
    rpc = m["residency_rpc_requests"]
    assert value(rpc, "residency_rpc_requests_total", method="PutRecord", code="OK") >= 20
    assert value(rpc, "residency_rpc_requests_total", method="PutRecord", code="INVALID_ARGUMENT") == 1
    assert (
        value(rpc, "residency_rpc_requests_total", method="ReplicationStatus", code="PERMISSION_DENIED") == 1
    )
    latency = m["residency_rpc_duration_seconds"]
    assert (
        value(
            latency,
            "residency_rpc_duration_seconds_count",
            service="residency.v1.RecordService",
            method="PutRecord",
        )
        >= 21
    )
    refusals = m["residency_refusals"]
    assert value(refusals, "residency_refusals_total", reason="caller_denied") >= 1
    assert value(refusals, "residency_refusals_total", reason="invalid_record") == 1
    for region in AFFILIATES:
        assert (
            value(m["residency_replication_pending"], "residency_replication_pending", destination=region)
            == 0
        )
        assert (
            value(
                m["residency_replication_lag_seconds"],
                "residency_replication_lag_seconds",
                destination=region,
            )
            == 0
        )
        assert (
            value(
                m["residency_replication_dead_letters"],
                "residency_replication_dead_letters",
                destination=region,
            )
            == 0
        )
        assert (
            value(m["residency_replication_paused"], "residency_replication_paused", destination=region) == 0
        )
    assert value(m["residency_transfer_log_entries"], "residency_transfer_log_entries") >= 20
    assert value(m["residency_group_commit_writes"], "residency_group_commit_writes_count") >= 1
    assert (
        value(m["residency_key_provider_seconds"], "residency_key_provider_seconds_count", provider="local")
        >= 1
    )

    # Paused: the gauge says so, and the lag grows while writes wait.
    await cluster.admin().PauseReplication(
        admin_pb2.PauseReplicationRequest(region=AFFILIATES[0]), timeout=10
    )
    await cluster.put("u-m-late", {"email": "late@example.com"})
    deadline = time.monotonic() + 30
    while True:
        m = await scrape(cluster)
        paused = value(
            m["residency_replication_paused"], "residency_replication_paused", destination=AFFILIATES[0]
        )
        pending = value(
            m["residency_replication_pending"], "residency_replication_pending", destination=AFFILIATES[0]
        )
        if paused == 1 and pending >= 1:
            break
        assert time.monotonic() < deadline, (paused, pending)
        await asyncio.sleep(0.2)


async def test_no_user_id_or_value_in_any_metric(cluster: Cluster):
    await cluster.put(SENTINEL_USER, {"email": SENTINEL_VALUE})
    with pytest.raises(grpc.aio.AioRpcError):  # refused, naming the user in the log, not here
        await cluster.get(SENTINEL_USER, region=AFFILIATES[0], purpose="marketing.advertising")
    await cluster.replicated()
    for region in (PRIMARY, *AFFILIATES):
        async with scraper(prometheus_creds(cluster)) as client:
            text = (await client.get(metrics_url(cluster, region), timeout=10)).text
        assert "residency_rpc_requests_total" in text
        assert SENTINEL_USER not in text and SENTINEL_VALUE not in text and "example.com" not in text


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (.ci/run installs it)"
)
async def test_a_real_prometheus_reads_the_lag_per_destination(cluster: Cluster, tmp_path: Path):
    for i in range(5):
        await cluster.put(f"u-p{i}", {"email": f"p{i}@example.com"})
    await cluster.replicated()
    (port,) = free_ports(1)
    target = metrics_url(cluster).removeprefix("https://").removesuffix("/metrics")
    creds = prometheus_creds(cluster)
    config = tmp_path / "prometheus.yml"
    scrape_config = {
        "job_name": "residency",
        "scheme": "https",
        "tls_config": {"ca_file": str(creds.ca), "cert_file": str(creds.cert), "key_file": str(creds.key)},
        "static_configs": [{"targets": [target]}],
    }
    config.write_text(
        yaml.safe_dump(
            {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [scrape_config]}
        )
    )
    prometheus = Service(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        f"http://127.0.0.1:{port}",
        "/-/ready",
        tmp_path / "prometheus.log",
    )
    prometheus.start(deadline=60)
    try:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient() as client:
            while True:
                r = await client.get(
                    f"http://127.0.0.1:{port}/api/v1/query",
                    params={"query": "residency_replication_lag_seconds"},
                    timeout=5,
                )
                result = r.json()["data"]["result"]
                lags = {s["metric"]["destination"]: float(s["value"][1]) for s in result}
                if set(lags) == set(AFFILIATES):
                    break
                assert time.monotonic() < deadline, (
                    r.text,
                    (tmp_path / "prometheus.log").read_text()[-2000:],
                )
                await asyncio.sleep(0.5)
        assert all(lag == 0.0 for lag in lags.values()), lags
        assert all(s["metric"]["job"] == "residency" for s in result)
    finally:
        prometheus.stop()


async def test_the_metrics_port_takes_only_mutual_tls_13_from_the_deployments_ca(
    module_cluster: Cluster, tmp_path: Path
):
    """Like the gRPC port: no plaintext, no anonymous TLS, no TLS 1.2, no certificate of
    another CA; a certificate of the CA (any role: the text names no user) reads it."""
    from residency.server.keys import pki

    c = module_cluster
    url = metrics_url(c)
    async with httpx.AsyncClient() as plain:  # plain HTTP to the TLS port
        with pytest.raises(REFUSED):
            await plain.get(url.replace("https://", "http://"), timeout=5)
    async with scraper(None, c.dir / "pki" / "ca.crt") as anonymous:  # TLS, no client certificate
        with pytest.raises(REFUSED):
            await anonymous.get(url, timeout=5)
    pki.create_ca(tmp_path / "foreign")  # the same trust domain, another CA
    pki.issue(tmp_path / "foreign", "recipient", PRIMARY, "prometheus", tmp_path / "foreign-prom")
    foreign = Credentials.files(tmp_path / "foreign-prom", c.dir / "pki" / "ca.crt")
    async with scraper(foreign) as client:
        with pytest.raises(REFUSED):
            await client.get(url, timeout=5)
    # TLS 1.2 with a good certificate: refused at the handshake (openssl's client says so).
    creds = prometheus_creds(c)
    host, _, port = url.removeprefix("https://").removesuffix("/metrics").rpartition(":")
    tls12 = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_2", "-cert", str(creds.cert)]
        + ["-key", str(creds.key), "-CAfile", str(creds.ca)],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert b"Cipher is (NONE)" in tls12.stdout or tls12.returncode != 0, tls12.stdout[-500:]
    async with scraper(creds) as client:
        reply = await client.get(url, timeout=10)
    assert reply.status_code == 200 and "residency_rpc_requests_total" in reply.text


async def test_idle_connections_are_cut_and_cannot_hold_more_than_a_few_threads(module_cluster: Cluster):
    """Someone who can reach the metrics port but never shakes hands holds at most
    `https.CONNECTIONS` of its threads, each for at most `https.TIMEOUT` seconds."""
    import socket

    from residency.server.api import https

    host, _, port = (
        metrics_url(module_cluster).removeprefix("https://").removesuffix("/metrics").rpartition(":")
    )
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(https.CONNECTIONS)]
    try:
        extra = socket.create_connection((host, int(port)), timeout=30)
        with extra:  # every turn taken: closed at once, not queued
            assert await asyncio.to_thread(extra.recv, 1) == b""
        started = time.monotonic()
        for s in idle:  # each cut by the server within its deadline, though it sent nothing
            assert await asyncio.to_thread(s.recv, 1) == b""
        assert time.monotonic() - started < https.TIMEOUT + 5
    finally:
        for s in idle:
            s.close()
    async with scraper(prometheus_creds(module_cluster)) as client:
        assert (await client.get(metrics_url(module_cluster), timeout=10)).status_code == 200
