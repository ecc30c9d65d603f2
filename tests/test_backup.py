"""`residency backup` and `residency restore` against real nodes: a backup taken under load, a
primary killed after more writes, erasures and consent changes, restored from the backup and
the transfer-log archive (a real SeaweedFS bucket), and what must hold then; and the liars."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from residency.server.core import merkle
from residency.server.core.checkpoint import open_note
from residency.server.storage.records import VERSION_EPOCH_BITS
from residency.v1 import admin_pb2, records_pb2, records_pb2_grpc, translog_pb2
from tests.conftest import PRIMARY, S3_BUCKET, Cluster, SeaweedFS, ctx
from tests.harness import eventually

SG = "ap-southeast-1"
ARCHIVE_BUCKET = "translog-archive"
FIELDS = {"name": "Li Wei", "email": "li@example.cn", "language": "zh"}


def residency(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "residency.cli.main", *args], capture_output=True, text=True, timeout=300
    )


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(residency, *args)


@pytest.fixture
async def archived(tmp_path: Path, seaweed: SeaweedFS):
    """The primary (archiving its log to SeaweedFS every half second) and ap-southeast-1's node
    running; eu-west-1's copies go to a bucket."""
    await asyncio.to_thread(seaweed.make_bucket, S3_BUCKET)
    c = Cluster(tmp_path / "deployment", s3=seaweed)
    config = c.dep.configs[PRIMARY]
    doc = yaml.safe_load(config.read_text())
    doc["checkpoint_interval_seconds"] = 0.5
    doc["archive"] = {"bucket": ARCHIVE_BUCKET, "endpoint": seaweed.endpoint, "interval_seconds": 0.5}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        await c.start(PRIMARY, SG)
        yield c
    finally:
        await c.close()


async def archived_checkpoint(c: Cluster, size: int, timeout: float = 120.0) -> tuple[int, str]:
    """Waits until the archive holds a checkpoint of at least `size`; returns (size, note)."""
    from residency.server.config.node import load_config
    from residency.server.vault.archive import S3Bucket

    config = load_config(c.dep.configs[PRIMARY])
    assert config.archive is not None
    bucket = S3Bucket(config.archive)
    prefix = f"translog/residency/{PRIMARY}/checkpoints/"
    deadline = asyncio.get_running_loop().time() + timeout
    failed: Exception | None = None
    while True:
        try:
            keys = await asyncio.to_thread(bucket.keys, prefix)
        except Exception as e:  # the node has not made its bucket yet
            keys, failed = [], e
        # By number: the keys list in text order ("99" after "181").
        sizes = {int(k.rsplit("/", 1)[1]): k for k in keys}
        if sizes and max(sizes) >= size:
            top = max(sizes)
            return top, (await asyncio.to_thread(bucket.get, sizes[top])).decode()
        late = asyncio.get_running_loop().time() >= deadline
        assert not late, f"no checkpoint of size {size} archived ({failed!r})"
        await asyncio.sleep(0.1)


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


async def tree_size(c: Cluster) -> int:
    cp = await c.transfer_log().GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=30)
    return cp.tree_size


async def test_a_restored_primary_resumes_without_reissuing_versions_or_resurrecting_erasures(
    archived: Cluster, tmp_path: Path
):
    c = archived
    config, data = c.dep.configs[PRIMARY], c.data_dir(PRIMARY)
    users = [f"u-{i}" for i in range(20)]
    for u in users:
        await c.put(u, FIELDS)
    await c.consent("u-14", "marketing.communications", "ie-affiliate")
    await c.replicated()

    # The backup, taken while a writer changes ten users and creates others.
    writing = asyncio.Event()

    async def write() -> int:
        n = 0
        while not writing.is_set():
            await c.put(users[n % 10], {"language": f"zh-{n}"})
            await c.put(f"w-{n}", FIELDS)
            n += 1
        return n

    writer = asyncio.create_task(write())
    while not await asyncio.to_thread(
        lambda: query(data / "node.db", "SELECT 1 FROM records WHERE user_id='w-3'")
    ):
        await asyncio.sleep(0.05)
    out, keys_out = tmp_path / "backup", tmp_path / "backup-keys"
    took = await run("backup", "--config", str(config), "--out", str(out), "--keys-out", str(keys_out))
    writing.set()
    assert await writer > 3
    assert took.returncode == 0, took.stderr
    assert "copying node.db" in took.stderr and "copying keys.db" in took.stderr  # progress
    manifest = json.loads((out / "manifest.json").read_text())
    # One snapshot: the manifest's figures are the copy's, and every live record in the store
    # copy has its key in the keys copy, though new users' keys and records were being written.
    assert query(out / "node.db", "SELECT max(sequence) FROM translog")[0][0] == manifest["tree_size"]
    assert query(out / "node.db", "SELECT max(version) FROM records")[0][0] == manifest["max_version"]
    live = {u for (u,) in query(out / "node.db", "SELECT user_id FROM records WHERE deleted=0")}
    assert live >= set(users)
    keyed = {u for (u,) in query(keys_out / "keys.db", "SELECT user_id FROM data_keys")}
    assert live <= keyed and query(out / "node.db", "PRAGMA integrity_check") == [("ok",)]

    # After the backup: new users, changed users, an erasure, a consent withdrawal.
    for u in ("n-0", "n-1"):
        await c.put(u, FIELDS)
    for u in ("u-10", "u-11", "u-12"):
        await c.put(u, {"email": f"{u}@example.org"})
    await c.delete("u-13")
    await c.consent("u-14", "marketing.communications", "ie-affiliate", withdraw=True)
    await c.replicated()
    held = {u: (await c.held(u, SG)).record.version for u in ("u-10", "u-11", "u-12")}
    size_before = await tree_size(c)
    archived_size, archived_note = await archived_checkpoint(c, size_before)

    # The liars, each refused, nothing changed: a restore while the node runs,
    refused = await run("restore", "--config", str(config), "--from", str(out))
    assert refused.returncode == 2 and "is running" in refused.stderr, refused.stderr
    c.stop(PRIMARY, signal.SIGKILL)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    # a manifest whose digest does not match its file,
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    with sqlite3.connect(forged / "node.db") as db:
        db.execute("UPDATE records SET version = version + 1")
    refused = await run("restore", "--config", str(config), "--from", str(forged))
    assert refused.returncode == 2 and "does not match its digest" in refused.stderr, refused.stderr
    # a backup of another region (its manifest says so, its digests hold),
    other = tmp_path / "other-region"
    await c.transfer_log(SG).GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=30)
    took = await run("backup", "--config", str(c.dep.configs[SG]), "--out", str(other), "--quiet")
    assert took.returncode == 0 and "keys.db) was not backed up" in took.stderr, took.stderr
    refused = await run("restore", "--config", str(config), "--from", str(other))
    assert refused.returncode == 2 and f"of {SG}" in refused.stderr, refused.stderr
    # the same with its manifest edited to name this node (its log is not this node's),
    doc = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**doc, "region": PRIMARY, "role": "primary"}))
    refused = await run("restore", "--config", str(config), "--from", str(other))
    assert refused.returncode == 2 and "log is not this node's" in refused.stderr, refused.stderr
    # and keys backed up with another store.
    refused = await run("restore", "--config", str(config), "--from", str(out), "--keys-from", str(other))
    assert refused.returncode == 2, refused.stderr
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before

    restored = await run("restore", "--config", str(config), "--from", str(out))
    assert restored.returncode == 0, restored.stderr
    summary = json.loads(restored.stdout)
    assert summary["recovered_to"] == archived_size > manifest["tree_size"]
    assert summary["erasures_reapplied"] == 1 and summary["consent_changes_reapplied"] == 1
    assert "users re-versioned" in restored.stderr
    await c.start(PRIMARY)
    await c.replicated()

    # The log extends the checkpoint archived before the loss (`residency log verify`).
    export = tmp_path / "export"
    previous = tmp_path / "previous.checkpoint"
    previous.write_text(archived_note)
    assert (await run("log", "export", *c.target("reviewer"), "--out", str(export))).returncode == 0
    verified = await run("log", "verify", str(export), "--previous", str(previous))
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["consistent_with"]["tree_size"] == archived_size
    stub = c.transfer_log()
    now = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=30)
    proof = await stub.ProveConsistency(
        translog_pb2.ProveConsistencyRequest(from_size=archived_size, tree_size=now.tree_size), timeout=30
    )
    old = open_note(archived_note, now.verifier_key)
    merkle.verify_consistency(old.size, now.tree_size, old.root, now.root_hash, list(proof.hashes))

    entries = [json.loads(e) for e in (export / "entries.jsonl").read_bytes().splitlines()]
    (mark,) = [e for e in entries if e["actor"] == "residency restore" and e["kind"] == "admin"]
    assert "store restored from a backup" in mark["reason"] and f"to {archived_size}" in mark["reason"]
    # Sent after the restore, once per destination and nothing else: the re-versioned users,
    # the re-applied erasure, and tombstones of users created after the backup (lost at home).
    sent = [e for e in entries if e["sequence"] > mark["sequence"] and e["actor"] == "replicator"]
    expected = summary["reversioned"] + summary["erasures_reapplied"] + summary["tombstones_resent"]
    for region in (SG, "eu-west-1"):
        subjects = [e["subject"] for e in sent if e["destination_region"] == region]
        assert len(subjects) == len(set(subjects)) == expected, (region, subjects)
        assert {"u-10", "u-11", "u-12", "u-13", "u-14", "n-0", "n-1"} <= set(subjects)
        assert not set(subjects) & {f"u-{i}" for i in range(15, 20)}  # unchanged since: not sent
    status = await c.replication()
    assert all(d.dead_lettered == 0 and not d.last_error for d in status.values()), status

    # The erased user stays erased everywhere: no record, no copy, no key.
    for region in (PRIMARY, SG):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await (c.held("u-13", region) if region == SG else c.get("u-13"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert not query(c.data_dir(region) / "keys.db", "SELECT 1 FROM data_keys WHERE user_id='u-13'")
    # Users the backup does not hold are gone from the destinations too.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.held("n-0", SG)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # The withdrawn consent stays withdrawn.
    assert query(data / "node.db", "SELECT withdrawn_at IS NOT NULL FROM consents WHERE user_id='u-14'") == [
        (1,)
    ]
    # New writes get versions above any issued before the loss, and arrive.
    floor = summary["restore_epoch"] << VERSION_EPOCH_BITS
    for u in ("u-10", "u-0", "fresh"):
        version = await c.put(u, {"language": "en"})
        assert version > floor > held.get(u, 0)
    await c.replicated()
    assert (await c.held("u-10", SG)).record.version > floor
    assert (await c.held("fresh", SG)).record.fields["language"].string_value == "en"
    status = await c.replication()
    assert all(d.dead_lettered == 0 and not d.last_error for d in status.values()), status


async def backed_up_with_keys(c: Cluster, tmp_path: Path, users: list[str]) -> tuple[Path, Path]:
    """`users` written and replicated, then the primary backed up, its keys apart: (store
    backup, keys backup)."""
    for u in users:
        await c.put(u, FIELDS)
    await c.replicated()
    out, keys_out = tmp_path / "backup", tmp_path / "backup-keys"
    config = str(c.dep.configs[PRIMARY])
    took = await run("backup", "--config", config, "--out", str(out), "--keys-out", str(keys_out), "--quiet")
    assert took.returncode == 0, took.stderr
    return out, keys_out


async def test_keys_restored_with_the_store_still_leave_later_erasures_unopenable(
    archived: Cluster, tmp_path: Path
):
    c = archived
    config, data = c.dep.configs[PRIMARY], c.data_dir(PRIMARY)
    out, keys_out = await backed_up_with_keys(c, tmp_path, ["k-0", "k-1"])
    assert query(keys_out / "keys.db", "SELECT 1 FROM data_keys WHERE user_id='k-0'")
    await c.delete("k-0")
    await c.replicated()
    await archived_checkpoint(c, await tree_size(c))
    c.stop(PRIMARY, signal.SIGKILL)
    # The node's disk is lost: the keys come back from the keys backup, k-0's among them.
    shutil.rmtree(data)
    restored = await run("restore", "--config", str(config), "--from", str(out), "--keys-from", str(keys_out))
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["erasures_reapplied"] == 1
    assert not query(data / "keys.db", "SELECT 1 FROM data_keys WHERE user_id='k-0'")
    await c.start(PRIMARY)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.get("k-0")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await c.get("k-1")).record.fields["name"].string_value == "Li Wei"


async def test_an_erasure_no_tombstone_left_for_stays_erased_with_keys_from_the_backup(
    archived: Cluster, tmp_path: Path
):
    c = archived
    config, data = c.dep.configs[PRIMARY], c.data_dir(PRIMARY)
    out, keys_out = await backed_up_with_keys(c, tmp_path, ["p-0", "p-1"])
    # Replication is paused everywhere: p-0's erasure sends no tombstone, only the home logs it.
    for region in (SG, "eu-west-1"):
        await c.admin().PauseReplication(admin_pb2.PauseReplicationRequest(region=region), timeout=10)
    await c.delete("p-0")
    entries = [json.loads(e) for _, e, _ in await c.log()]
    (erased,) = [e for e in entries if e["kind"] == "erasure" and e["subject"] == "p-0"]
    assert (erased["source_region"], erased["destination_region"], erased["outcome"]) == (
        PRIMARY,
        PRIMARY,
        "allowed",
    )
    assert erased["actor"].startswith("spiffe://") and erased["record_version"] > 1
    await archived_checkpoint(c, await tree_size(c))
    c.stop(PRIMARY, signal.SIGKILL)
    # The disk is lost: the keys come back from the keys backup, p-0's among them.
    shutil.rmtree(data)
    restored = await run("restore", "--config", str(config), "--from", str(out), "--keys-from", str(keys_out))
    assert restored.returncode == 0, restored.stderr
    summary = json.loads(restored.stdout)
    assert summary["erasures_reapplied"] == 1
    assert "erase such users again" in summary["erasures_after"] and "--keys-from" in restored.stderr
    assert not query(data / "keys.db", "SELECT 1 FROM data_keys WHERE user_id='p-0'")
    await c.start(PRIMARY)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.get("p-0")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await c.get("p-1")).record.fields["name"].string_value == "Li Wei"


async def test_a_tampered_archive_stops_the_roll_forward_where_it_no_longer_verifies(
    archived: Cluster, tmp_path: Path
):
    from residency.server.config.node import load_config
    from residency.server.vault.archive import S3Bucket

    c = archived
    config = c.dep.configs[PRIMARY]
    await c.put("t-0", FIELDS)
    await c.replicated()
    out = tmp_path / "backup"
    took = await run("backup", "--config", str(config), "--out", str(out), "--quiet")
    assert took.returncode == 0, took.stderr
    size = json.loads((out / "manifest.json").read_text())["tree_size"]
    await c.put("t-0", {"language": "en"})
    await c.replicated()
    archived_size, _ = await archived_checkpoint(c, await tree_size(c))
    c.stop(PRIMARY, signal.SIGKILL)
    # Someone rewrites what the archive says left after the backup (no Object Lock here).
    archive = load_config(config).archive
    assert archive is not None
    bucket = S3Bucket(archive)
    segments = bucket.keys(f"translog/residency/{PRIMARY}/segments/")
    last = segments[-1]
    assert int(last.rsplit("-", 1)[1].split(".")[0]) == archived_size
    body = bucket.get(last).replace(b'"ap-southeast-1"', b'"ap-southeast-2"')
    bucket.put(last, body, None)

    restored = await run("restore", "--config", str(config), "--from", str(out))
    assert restored.returncode == 0, restored.stderr
    summary = json.loads(restored.stdout)
    first = int(last.rsplit("/", 1)[1].split("-")[0])
    assert summary["recovered_to"] == max(first, size) < archived_size
    assert f"to {archived_size} are archived but could not be recovered" in summary["lost"]
    await c.start(PRIMARY)
    # Versions stay above what left, whatever the archive lost: t-0's next goes past both.
    assert await c.put("t-0", {"language": "fr"}) > summary["versions_above"]
    await c.replicated()
    assert (await c.held("t-0", SG)).record.fields["language"].string_value == "fr"


async def test_without_an_archive_a_restore_says_which_checkpoints_it_cannot_match(
    idle_cluster: Cluster, tmp_path: Path
):
    c = idle_cluster
    config = c.dep.configs[PRIMARY]
    await c.start(PRIMARY)
    await c.put("a-0", FIELDS)
    out = tmp_path / "backup"
    took = await run("backup", "--config", str(config), "--out", str(out), "--quiet")
    assert took.returncode == 0, took.stderr
    again = await run("backup", "--config", str(config), "--out", str(out), "--quiet")
    assert again.returncode == 2 and "is not empty" in again.stderr
    inside = await run(
        "backup",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "b2"),
        "--keys-out",
        str(tmp_path / "b2" / "k"),
    )
    assert inside.returncode == 2 and "keys are backed up apart" in inside.stderr
    size = json.loads((out / "manifest.json").read_text())["tree_size"]
    c.stop(PRIMARY, signal.SIGKILL)

    first = await run("restore", "--config", str(config), "--from", str(out))
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["restore_epoch"] == 1 and summary["recovered_to"] == size
    assert summary["lost"].startswith("no archive is configured")
    assert f"not consistent with any checkpoint of a size above {size}" in first.stderr
    await c.start(PRIMARY)
    issued = await c.put("a-0", {"language": "en"})
    assert issued > 1 << VERSION_EPOCH_BITS
    c.stop(PRIMARY, signal.SIGKILL)
    # Restored again from the same backup: the epoch goes above the one the lost store had
    # reached, so the version issued in between is not issued again.
    second = await run("restore", "--config", str(config), "--from", str(out))
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["restore_epoch"] == 2
    await c.start(PRIMARY)
    assert await c.put("a-0", {"language": "fr"}) > 2 << VERSION_EPOCH_BITS > issued


async def find_email(c: Cluster, value: str) -> list[str]:
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service"))
    request = records_pb2.FindRecordsRequest(
        context=ctx(PRIMARY, "essential.service"), field="email", value=value
    )
    return [r.record.user_id for r in (await stub.FindRecords(request, timeout=30)).results]


async def index_rotated(c: Cluster, version: int) -> None:
    async def done() -> bool:
        s = await c.status(PRIMARY)
        return s.index_key_version == version and not s.index_rebuild_version

    await eventually(done, f"index key version {version} is active", deadline=120)


async def test_finds_work_after_a_restore_across_an_index_key_rotation(idle_cluster: Cluster, tmp_path: Path):
    c = idle_cluster
    config = c.dep.configs[PRIMARY]
    await c.start(PRIMARY)
    await c.put("f-0", FIELDS)
    out = tmp_path / "backup"
    took = await run("backup", "--config", str(config), "--out", str(out), "--quiet")
    assert took.returncode == 0, took.stderr
    # The index key rotates after the backup: the backup's rows are of a version no longer kept.
    old = (await c.status(PRIMARY)).index_key_version
    await c.admin().RotateIndexKey(admin_pb2.RotateIndexKeyRequest(from_version=old), timeout=30)
    await index_rotated(c, old + 1)
    c.stop(PRIMARY, signal.SIGKILL)
    restored = await run("restore", "--config", str(config), "--from", str(out))
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["index_rebuild_version"] == old + 2
    assert not query(c.data_dir(PRIMARY) / "node.db", "SELECT 1 FROM lookup_index")
    await c.start(PRIMARY)
    await index_rotated(c, old + 2)
    assert await find_email(c, "LI@example.cn") == ["f-0"]


async def test_index_rows_of_a_lost_index_key_are_dropped_and_rebuilt_at_start(idle_cluster: Cluster):
    from residency.server.config.node import load_config

    c = idle_cluster
    await c.start(PRIMARY)
    await c.put("f-1", FIELDS)
    assert await find_email(c, "li@example.cn") == ["f-1"]
    c.stop(PRIMARY)
    # The key folder comes back without index.key (a copy made before the docs named it): the
    # next key made is another "version 1", which the rows stored under 1 never match.
    (load_config(c.dep.configs[PRIMARY]).keys_dir / "index.key").unlink()
    await c.start(PRIMARY)
    await index_rotated(c, 2)
    assert await find_email(c, "li@example.cn") == ["f-1"]
