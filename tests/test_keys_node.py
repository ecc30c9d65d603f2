"""Keys on real nodes: who can open what, crypto-shredding, rotation, shredding a region's
key, credentials, and a key service that goes down."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from residency.cli.channel import ENVIRONMENT, Credentials
from residency.server.config.node import load_config
from residency.server.config.rules import load_rules
from residency.server.config.schema import load_schema
from residency.server.core.checkpoint import open_note
from residency.server.core.sealing import SealError
from residency.server.deployment import AFFILIATES, PRIMARY, local_keys
from residency.server.keys import pki
from residency.server.keys.keyring import Keyring
from residency.server.keys.providers import open_provider
from residency.server.keys.providers.kms import AwsKmsProvider
from residency.server.keys.region import RegionKey
from residency.server.storage.sqlite import SqliteStore
from residency.server.vault.records import Records
from residency.v1 import records_pb2, replica_pb2, translog_pb2
from tests.conftest import BAO_TOKEN, Cluster, ctx, enable_transit, moto_kms, openbao, values

SG = "ap-southeast-1"


def backup(db: Path, to: Path) -> Path:
    """An online copy of a node's database, as a backup job would take it."""
    src, dst = sqlite3.connect(db), sqlite3.connect(to)
    src.backup(dst)
    src.close()
    dst.close()
    return to


def open_offline(cluster: Cluster, region: str, db: Path, user_id: str) -> dict:
    """Opens `user_id` from a database file with the region's own keys and live keyring."""
    c = load_config(cluster.dep.configs[region])
    schema = load_schema(c.schema)
    keyring = Keyring(c.region, open_provider(c.keys), c.keys_dir)
    store = SqliteStore(db, keyring=c.data_dir / "keys.db")
    try:
        records = Records(c.region, c.is_primary, schema, load_rules(c.rules, schema), keyring, store, False)
        return records.open_row(store.rows([user_id])[user_id]).fields
    finally:
        store.close()


async def until(check, deadline: float = 20.0):
    """Polls `check()` until it returns a truthy value or the deadline passes."""
    end = time.monotonic() + deadline
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError("condition not met before the deadline")
        await asyncio.sleep(0.1)


def keys_run(
    cluster: Cluster, action: str, region: str, *extra: str, creds: Credentials | None, offline: bool = False
) -> subprocess.CompletedProcess:
    """`residency keys ACTION` for `region`'s node, sent to it (`--target`), or with `offline`
    done on the stopped node's files (`--config`), with the certificate files of `creds` (None:
    none, neither flags nor RESIDENCY_* variables)."""
    flags = ["--cert", str(creds.cert), "--key", str(creds.key), "--ca", str(creds.ca)] if creds else []
    node = (
        ["--config", str(cluster.dep.configs[region])]
        if offline
        else ["--target", cluster.dep.addresses[region]]
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "residency.cli.main",
            "keys",
            action,
            *node,
            "--region",
            region,
            *flags,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ENVIRONMENT.values()},
    )


def keys_cli(cluster: Cluster, action: str, region: str, *extra: str, offline: bool = False) -> dict:
    """`residency keys ACTION` by an operator of `region`; its JSON output."""
    creds = cluster.dep.credentials("operator", region)
    r = keys_run(cluster, action, region, *extra, creds=creds, offline=offline)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


async def key_events(cluster: Cluster, region: str) -> list[dict]:
    return [e for e in (json.loads(j) for _, j, _ in await cluster.log(region)) if e["kind"] == "key_event"]


@pytest.fixture
async def hybrid_cluster(tmp_path: Path):
    """A running deployment whose ap-southeast-1 key is hybrid ML-KEM-768 + X25519."""

    def keys(d: Path, region: str) -> dict:
        return {**local_keys(d, region), **({"kem": "mlkem768-x25519"} if region == SG else {})}

    c = Cluster(tmp_path / "deployment", keys=keys)
    try:
        await c.start()
        yield c
    finally:
        await c.close()


async def test_the_primary_cannot_open_a_regions_copy_and_erasure_shreds_every_backup(
    hybrid_cluster: Cluster, tmp_path: Path
):
    cluster = hybrid_cluster
    sg_pub = load_config(cluster.dep.configs[SG]).keys_dir / "region.pub"
    assert len(sg_pub.read_bytes()) == 1184 + 32  # ML-KEM-768 + X25519
    await cluster.put("u-1", {"name": "Li Wei", "email": "li@example.cn"})
    await cluster.replicated()
    sg_db = cluster.data_dir(SG) / "node.db"
    # The region's stored copy, read straight from its node.db and keys.db.
    with sqlite3.connect(sg_db) as db:
        copy = replica_pb2.SealedCopy.FromString(
            db.execute("SELECT blob FROM records WHERE user_id='u-1'").fetchone()[0]
        )
    assert copy.sealed_fields and not copy.wrapped_data_key  # the key lives in the keyring
    with sqlite3.connect(cluster.data_dir(SG) / "keys.db") as kdb:
        wk_id, wrapped, transit = kdb.execute(
            "SELECT d.wrapping_key, d.wrapped, k.wrapped FROM data_keys d "
            "JOIN wrapping_keys k ON k.id = d.wrapping_key WHERE d.user_id='u-1'"
        ).fetchone()
    kind, key_id, transit_id = wk_id.split(":")
    assert (kind, key_id) == ("transit", copy.key_id)  # under the transit key the primary sent
    # The primary, with every key it holds, cannot unwrap the region's transit or data key.
    cn = load_config(cluster.dep.configs[PRIMARY])
    primary_key = RegionKey.load(PRIMARY, cn.keys_dir, open_provider(cn.keys))
    impostor = RegionKey(SG, primary_key._raw)
    for key in (primary_key, impostor):
        # claimed under the region's key id, or under its own (so the HPKE unwrap runs, and fails)
        for kid in (copy.key_id, key.key_id):
            with pytest.raises(SealError):
                key.open_transit_key(kid, transit_id, transit)
            with pytest.raises(SealError):
                key.open_data_key("u-1", kid, wrapped, transit_id, transit)
    # ... nor open the region's private key file with its own provider.
    sg = load_config(cluster.dep.configs[SG])
    with pytest.raises(SealError):
        RegionKey.load(SG, sg.keys_dir, open_provider(cn.keys))
    # The region can.
    assert open_offline(cluster, SG, sg_db, "u-1")["name"].string_value == "Li Wei"

    # Backups taken before erasure open now ...
    copies = {r: backup(cluster.data_dir(r) / "node.db", tmp_path / f"{r}.db") for r in (PRIMARY, SG)}
    for region, db in copies.items():
        assert open_offline(cluster, region, db, "u-1")["name"].string_value == "Li Wei"
    await cluster.delete("u-1")
    await cluster.replicated()
    # ... and not after: the user's data keys are gone from every keyring.
    for region, db in copies.items():
        with pytest.raises(SealError, match="erased"):
            open_offline(cluster, region, db, "u-1")


async def test_rotation_rewraps_data_keys_without_touching_fields_or_traffic(cluster: Cluster):
    users = [f"r-{i}" for i in range(300)]
    req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    for u in users:
        req.records.add(user_id=u).fields["name"].string_value = f"name of {u}"
    await cluster.records().PutRecords(req, timeout=30)
    db = cluster.data_dir(PRIMARY) / "node.db"

    def snapshot() -> tuple[dict, set]:
        with sqlite3.connect(db) as d, sqlite3.connect(db.with_name("keys.db")) as k:
            blobs = dict(d.execute("SELECT user_id, blob FROM records"))
            wks = {r[0] for r in k.execute("SELECT DISTINCT wrapping_key FROM data_keys")}
        return blobs, wks

    before, wks_before = snapshot()
    stop = asyncio.Event()

    async def traffic() -> int:
        n = 0
        while not stop.is_set():
            await cluster.put(f"live-{n}", {"name": "during rotation"})
            assert (
                values(await cluster.get(users[n % len(users)]))["name"] == f"name of {users[n % len(users)]}"
            )
            n += 1
        return n

    writer = asyncio.create_task(traffic())
    out = await asyncio.to_thread(keys_cli, cluster, "rotate", PRIMARY, "--quiet")
    stop.set()
    live = await writer
    assert live > 0  # reads and writes went on during the rewrap
    assert out["data_keys_rewrapped"] >= len(users)
    after, wks_after = snapshot()
    assert {u: after[u] for u in users} == {u: before[u] for u in users}  # fields not re-encrypted
    assert not wks_after & wks_before or len(wks_after) > 1
    keys_cli(cluster, "retire", PRIMARY)  # at once: the node switched before it answered
    keys = load_config(cluster.dep.configs[PRIMARY]).keys_dir
    assert sorted(p.name for p in keys.glob("kek-v*.key")) == ["kek-v2.key"]
    # The log key's own key turned with it, and log.key is under its new version only.
    assert sorted(p.name for p in keys.glob("log-kek-v*.key")) == ["log-kek-v2.key"]
    # A restarted primary (no cached keys) opens everything with the new version only.
    cluster.stop(PRIMARY)
    await cluster.start(PRIMARY)
    for u in users[::50]:
        assert values(await cluster.get(u))["name"] == f"name of {u}"
    for n in range(live):  # written during the rotation, under either version
        assert values(await cluster.get(f"live-{n}"))["name"] == "during rotation"
    events = await until(lambda: key_events(cluster, PRIMARY))
    assert [e["reason"].split(":")[0] for e in events] == ["rotated", "rewrapped", "retired"]
    assert {e["actor"] for e in events} == {cluster.dep.operator.identity().uri}  # the certificate's

    # A region node: the copies' keys (HPKE-wrapped as they arrived) move under a wrapping key
    # of the region's new key version; the copies themselves stay as they are.
    await cluster.replicated()
    sg_db = cluster.data_dir(SG) / "node.db"
    with sqlite3.connect(sg_db) as d:
        copies_before = dict(d.execute("SELECT user_id, blob FROM records"))
    out = keys_cli(cluster, "rotate", SG, "--quiet")
    assert out["data_keys_rewrapped"] == len(copies_before)
    keys_cli(cluster, "retire", SG)
    with sqlite3.connect(sg_db) as d:
        assert dict(d.execute("SELECT user_id, blob FROM records")) == copies_before
    cluster.stop(SG)
    await cluster.start(SG)
    for u in users[::50]:
        assert values(await cluster.get(u, region=SG))["name"] == f"name of {u}"


def impostors(cluster: Cluster, tmp_path: Path) -> dict[str, Credentials]:
    """Certificates that must not run a key command (each with the deployment's CA as `--ca`),
    by what the refusal says."""
    folder, ca = cluster.dir / "pki", cluster.dir / "pki" / "ca.crt"
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    pki.issue(folder, "operator", PRIMARY, "expired", tmp_path / "expired", days=1, not_before=past)
    pki.create_ca(tmp_path / "foreign")  # the same trust domain and names, another CA
    pki.issue(tmp_path / "foreign", "operator", PRIMARY, "operator", tmp_path / "foreign-op")
    reviewer = cluster.dep.credentials("reviewer")
    return {
        "of role reviewer; this needs role operator": reviewer,
        "does not chain to the deployment's CA": Credentials.files(tmp_path / "foreign-op", ca),
        "the certificate expired at": Credentials.files(tmp_path / "expired", ca),
        "does not hold the certificate's key": Credentials(cluster.dep.operator.cert, reviewer.key, ca),
        "are its own operators' to change": cluster.dep.operator,  # an operator of cn-north
    }


async def test_a_shredded_region_key_makes_every_copy_there_unreadable(cluster: Cluster, tmp_path: Path):
    await cluster.put("u-1", {"name": "Li Wei", "language": "zh-CN"})
    await cluster.replicated()
    assert values(await cluster.get("u-1", region=SG))["name"] == "Li Wei"
    # On the stopped node (--config), only an operator of the region and of the node's CA may:
    # every other certificate is refused, whatever --identity it states, and nothing changes.
    # (Through the running node: tests/test_rotation.py.)
    sg = load_config(cluster.dep.configs[SG])
    files_before = {p.name: p.read_bytes() for p in sg.keys_dir.iterdir()}
    operator = cluster.dep.credentials("operator", SG).identity().uri
    extra = {"rotate": ["--quiet"], "retire": [], "shred": ["--yes"]}
    cluster.stop(SG)
    for said, creds in impostors(cluster, tmp_path).items():
        for action in extra if said.startswith("of role") else ["shred"]:
            r = keys_run(
                cluster, action, SG, *extra[action], "--identity", operator, creds=creds, offline=True
            )
            assert r.returncode != 0 and said in r.stderr and "nothing was changed" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout, r.stderr
    r = keys_run(cluster, "shred", SG, "--yes", creds=None, offline=True)
    assert r.returncode != 0 and "need an operator certificate: --cert (or RESIDENCY_CERT)" in r.stderr
    assert {p.name: p.read_bytes() for p in sg.keys_dir.iterdir()} == files_before  # no event either
    await cluster.start(SG)
    assert values(await cluster.get("u-1", region=SG))["name"] == "Li Wei"
    r = keys_run(
        cluster, "shred", SG, "--yes", "--reason", "test: key leaked", "--identity", "operator:root",
        creds=cluster.dep.credentials("operator", SG),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "--identity no longer names the caller; the client certificate does" in r.stderr

    async def refused():
        try:
            await cluster.get("u-1", region=SG)
        except grpc.aio.AioRpcError as e:
            return e
        return None

    e = await until(refused)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shredded" in e.details() and "test: key leaked" in e.details()
    sg = load_config(cluster.dep.configs[SG])
    assert not (sg.keys_dir / "region.key").exists() and not list(sg.keys_dir.glob("kek-v*"))
    (event,) = await until(lambda: key_events(cluster, SG))
    assert event["reason"].startswith("shredded") and event["actor"] == operator
    # Other regions are untouched.
    assert values(await cluster.held("u-1", AFFILIATES[1]))["language"] == "zh-CN"
    # The log signing key is under a key of its own, which the shred left: the restarted
    # node opens it and signs checkpoints (the shred's entry included) that verify with the
    # log.pub reviewers pinned.
    pinned = (sg.keys_dir / "log.pub").read_text().strip()
    assert list(sg.keys_dir.glob("log-kek-v*.key")) and b"wrapped" in (sg.keys_dir / "log.key").read_bytes()
    cluster.stop(SG)
    await cluster.start(SG)
    cp = await cluster.transfer_log(SG).GetCheckpoint(
        translog_pb2.GetCheckpointRequest(refresh=True), timeout=30
    )
    assert cp.verifier_key == pinned and open_note(cp.checkpoint, pinned).size == cp.tree_size >= 1


async def test_verify_credential_answers_match_or_not_and_never_reveals(cluster: Cluster):
    await cluster.put("c-1", {"email": "c@example.cn", "password": "correct horse"})
    stub = cluster.records()

    async def verify(secret: str, field: str = "password", location: str = PRIMARY) -> bool:
        r = await stub.VerifyCredential(
            records_pb2.VerifyCredentialRequest(
                context=ctx(location, "essential.service"), user_id="c-1", field=field, secret=secret
            ),
            timeout=30,
        )
        return r.match

    assert await verify("correct horse") is True
    assert await verify("wrong horse") is False
    for field, location, code in (
        ("email", PRIMARY, grpc.StatusCode.INVALID_ARGUMENT),
        ("password", SG, grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await verify("correct horse", field, location)
        assert e.value.code() == code
    assert "password" not in (await cluster.get("c-1")).record.fields


@pytest.mark.parametrize("name", ["openbao", "aws-kms"])
async def test_a_key_service_down_fails_new_writes_unavailable_with_nothing_written(
    name: str, tmp_path: Path
):
    service = openbao(tmp_path / "svc") if name == "openbao" else moto_kms(tmp_path / "svc")
    service.start()
    if name == "openbao":
        enable_transit(service.url)
        (tmp_path / "token").write_text(BAO_TOKEN)
        primary_keys = {
            "provider": "openbao",
            "address": service.url,
            "token_file": str(tmp_path / "token"),
            "transit_key": "residency-cn-north",
        }
    else:
        alias = AwsKmsProvider.create_key("alias/residency-cn-north", endpoint_url=service.url)
        primary_keys = {"provider": "aws-kms", "kms_key_id": alias, "endpoint_url": service.url}

    def keys(d: Path, region: str) -> dict:
        if region != PRIMARY:
            return local_keys(d, region)
        return {**primary_keys, "dir": f"keys/{region}", "cache_seconds": 0.5}

    cluster = Cluster(tmp_path / "deployment", keys=keys)
    try:
        await cluster.start(PRIMARY)
        await cluster.put("before", {"name": f"sealed through {name}"})
        service.stop()
        n = 0

        async def refused():
            nonlocal n
            n += 1
            try:
                await cluster.put(f"after-{n}", {"name": "must not be written"})
            except grpc.aio.AioRpcError as e:
                return e
            return None

        e = await until(refused)
        said = {"openbao": "OpenBao cannot be reached", "aws-kms": "AWS KMS cannot be reached"}[name]
        assert e.code() == grpc.StatusCode.UNAVAILABLE and said in e.details()
        with pytest.raises(grpc.aio.AioRpcError) as nf:
            await cluster.get(f"after-{n}")
        assert nf.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await cluster.close()
        service.stop()
