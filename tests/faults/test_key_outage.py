"""A primary's key service down for 20 s while writes go on (issue 15, point 8): a write that
needs the service (a new user's data key, or a key no longer cached) fails closed, UNAVAILABLE
naming the service, and writes nothing; a write whose keys are cached may succeed; once the
service is back on its port, writes and replication recover and no acknowledged write is lost.

OpenBao runs as in production, its storage on disk and sealed at each start (unsealed here
with the one key share its init gave), and is stopped and started again on the same port.
moto's KMS keeps its keys in memory only, so a restart would lose them: the node reaches it
through a proxy (`tools.TcpProxy`) that goes down instead (its port refuses connections) and
comes back on the same port."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from residency.server.deployment import AFFILIATES, PRIMARY, free_ports, local_keys
from residency.server.keys.providers.kms import AwsKmsProvider
from tests.conftest import Cluster, Service, moto_kms
from tests.faults.tools import TcpProxy, Writers, applied_twice, log_entries, only_destination, report, until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

SG = AFFILIATES[0]
OUTAGE_SECONDS = float(os.environ.get("RESIDENCY_KEY_OUTAGE_SECONDS", "20"))
# Opened keys (data keys, the wrapping key of new data keys) are kept this long: the first
# seconds of the outage, writes whose keys are cached succeed; after that every write that
# needs a key from the service fails closed.
CACHE_SECONDS = 4.0
SAID = {"openbao": "OpenBao", "aws-kms": "AWS KMS"}


class OpenBao:
    """An OpenBao server with its storage on disk (raft) on a fixed loopback port: what it holds survives a
    restart, and it starts sealed, as a production server does."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        port, cluster_port = free_ports(2)
        self.url = f"http://127.0.0.1:{port}"
        (directory / "data").mkdir(exist_ok=True)
        config = directory / "bao.hcl"
        config.write_text(
            f'storage "raft" {{\n path = "{directory / "data"}"\n node_id = "bao-1"\n}}\n'
            f'listener "tcp" {{\n address = "127.0.0.1:{port}"\n tls_disable = true\n}}\n'
            f'api_addr = "{self.url}"\ncluster_addr = "http://127.0.0.1:{cluster_port}"\n'
        )
        bao = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
        argv = [bao, "server", f"-config={config}"]
        self.service = Service(argv, self.url, "/v1/sys/init", directory / "bao.log")
        self.unseal_key = self.token = ""

    def start(self) -> None:
        self.service.start()
        first = not self.token
        if first:  # one key share, kept here to unseal every later start
            shares = {"secret_shares": 1, "secret_threshold": 1}
            r = httpx.put(f"{self.url}/v1/sys/init", json=shares, timeout=60)
            r.raise_for_status()
            self.unseal_key, self.token = r.json()["keys"][0], r.json()["root_token"]
        httpx.put(f"{self.url}/v1/sys/unseal", json={"key": self.unseal_key}, timeout=60).raise_for_status()
        end = time.monotonic() + 60
        while httpx.get(f"{self.url}/v1/sys/health", timeout=5).status_code != 200:  # unsealed and active
            assert time.monotonic() < end, f"OpenBao did not become active; see {self.service.log}"
            time.sleep(0.1)
        if first:
            r = httpx.post(
                f"{self.url}/v1/sys/mounts/transit",
                json={"type": "transit"},
                headers={"X-Vault-Token": self.token},
                timeout=30,
            )
            r.raise_for_status()

    def stop(self) -> None:
        self.service.stop()


@dataclass
class KeyService:
    """The primary's key service in a test: its `keys:` config, and how to take it down and
    bring it back on the same address."""

    name: str
    config: dict[str, Any]
    down: Callable[[], None]
    back: Callable[[], None]


@pytest.fixture(params=["openbao", "aws-kms"])
def key_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyService]:
    if request.param == "openbao":
        bao = OpenBao(tmp_path / "bao")
        try:
            bao.start()
            (tmp_path / "token").write_text(bao.token)
            config = {
                "provider": "openbao",
                "address": bao.url,
                "token_file": str(tmp_path / "token"),
                "transit_key": "residency-cn-north",
            }
            yield KeyService("openbao", config, bao.stop, bao.start)
        finally:
            bao.stop()
        return
    moto = moto_kms(tmp_path / "moto")
    proxy: TcpProxy | None = None
    try:
        moto.start()
        host, port = moto.url.removeprefix("http://").split(":")
        proxy = TcpProxy((host, int(port)))
        endpoint = f"http://{proxy.address}"
        alias = AwsKmsProvider.create_key("alias/residency-cn-north", endpoint_url=endpoint)
        config = {"provider": "aws-kms", "kms_key_id": alias, "endpoint_url": endpoint}
        yield KeyService("aws-kms", config, proxy.down, proxy.up)
    finally:
        if proxy is not None:
            proxy.close()
        moto.stop()


async def test_a_key_service_down_for_20_s_fails_new_keys_closed_then_recovers_losing_nothing(
    key_service: KeyService, tmp_path: Path
):
    name, down, back = key_service.name, key_service.down, key_service.back

    def keys(d: Path, region: str) -> dict:
        if region != PRIMARY:
            return local_keys(d, region)
        return {**key_service.config, "dir": f"keys/{region}", "cache_seconds": CACHE_SECONDS}

    cluster = Cluster(tmp_path / "deployment", keys=keys)
    only_destination(cluster, SG)
    writers = Writers(cluster, "k", n=4, new_users=0.3, pause=0.05)
    try:
        await cluster.start(PRIMARY, SG)
        writers.start()
        await until(lambda: len(writers.acked) >= 20, 60, "20 users written before the outage")
        assert not writers.refused, writers.refused[:3]

        await asyncio.to_thread(down)
        acked_before = writers.writes
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself: writes go on meanwhile
        acked_during = writers.writes - acked_before
        refused_during = list(writers.refused)
        t_restart = time.monotonic()
        await asyncio.to_thread(back)  # OpenBao: started, unsealed and active; writes go on meanwhile
        t_back = time.monotonic()

        # Recovered: a new user (a new data key, under a new wrapping key) is written again.
        probe = Writers(cluster, "probe", new_users=1.0)
        await until(lambda: _ok(probe), 60, f"a new user written once {SAID[name]} is back")
        recovery = time.monotonic() - t_back
        await asyncio.sleep(2.0)  # writes go on a little after the recovery, too
        await writers.stop()
        await cluster.replicated(timeout=120)
        catch_up = time.monotonic() - t_back

        # Failed closed: every refusal is UNAVAILABLE and names the key service, and wrote nothing.
        other = {(code.name, details) for *_, code, details in writers.refused}
        other -= {("UNAVAILABLE", d) for _, d in other}
        assert not other, sorted(other)[:5]
        assert all(SAID[name] in details for *_, details in writers.refused), writers.refused[:3]
        new_refused = [u for u, new, _, _, _ in refused_during if new]
        assert new_refused, "no write of a new user was refused while the key service was down"
        for user in {u for u, new, *_ in writers.refused if new}:
            with pytest.raises(grpc.aio.AioRpcError) as nf:
                await cluster.get(user)
            assert nf.value.code() == grpc.StatusCode.NOT_FOUND, user
        # Nothing acknowledged is lost: at the primary and at the region, each user's newest
        # acknowledged version, and no refused write's version above it.
        acked = {**writers.acked, **probe.acked}
        lost = []
        for user, (version, fields) in acked.items():
            got = await cluster.get(user)
            held = await cluster.held(user, SG)
            if got.record.version != version or held.record.version != version:
                lost.append(user)
            assert got.record.fields["email"].string_value == fields["email"], user
        duplicates, backwards = applied_twice(await log_entries(cluster, SG), SG)
        figures = {
            "service": name,
            "outage_seconds": OUTAGE_SECONDS,
            "writes_acknowledged": writers.writes + probe.writes,
            "users": len(acked),
            "acknowledged_during_outage": acked_during,
            "refused_during_outage": len(refused_during),
            "refused_new_users": len(new_refused),
            "refused_status": "UNAVAILABLE",
            "lost": len(lost),
            "duplicate_applications": duplicates,
            "service_back_seconds": round(t_back - t_restart, 1),
            "recovery_seconds": round(recovery, 1),
            "catch_up_seconds": round(catch_up, 1),
        }
        report(tmp_path, f"key_outage[{name}]", figures)
        assert not lost and not duplicates and not backwards, (lost[:5], backwards[:5])
    finally:
        await writers.close()
        await cluster.close()


async def _ok(writers: Writers) -> bool:
    return await writers.write_once() == grpc.StatusCode.OK
