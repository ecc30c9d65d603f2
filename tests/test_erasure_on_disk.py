"""Erasure is final on disk (DESIGN.md "Storage and scale"): once an erasure is
acknowledged at the primary and applied in every region, no file under any node's data_dir,
WAL and journal files included, holds the erased user's sealed record bytes, wrapped data
keys or blind-index hashes, while everything of the users who were not erased is still there; and what a node
keeps on disk is readable by its own user only."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import grpc
import pytest

from residency.server.config.node import load_config
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.server.keys.files import loose_permissions
from residency.v1 import admin_pb2
from tests.conftest import Cluster, values
from tests.faults.tools import applied_twice

GONE, KEPT = "gone-1", "kept-1"


def stored_secrets(data_dir: Path, user_id: str) -> set[bytes]:
    """Every byte string of 16 or more bytes that a node's databases hold for a user (sealed
    record or copy, wrapped data and transit keys), read through a short read-only connection
    so that it holds no lock on the WAL afterwards."""
    found: set[bytes] = set()
    for name in ("node.db", "keys.db"):
        db = sqlite3.connect(f"file:{data_dir / name}?mode=ro", uri=True)
        try:
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                columns = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
                if "user_id" not in columns:
                    continue
                for row in db.execute(f"SELECT * FROM {table} WHERE user_id=?", (user_id,)):
                    found |= {v for v in row if isinstance(v, bytes) and len(v) >= 16}
        finally:
            db.close()
    return found


def pieces(secrets: set[bytes], shared: set[bytes] = frozenset()) -> set[bytes]:
    """Every 16-byte piece of the secrets (a value is contiguous in a page unless it
    overflows, and then each piece still is), less those that also stand in `shared` values:
    a copy names its region's key and transit key, which serve every user alike."""
    common = b"\0".join(shared)
    cut = {s[i : i + 16] for s in secrets for i in [*range(0, len(s) - 16, 16), len(s) - 16]}
    return {p for p in cut if p not in common}


def files_holding(data_dir: Path, wanted: set[bytes]) -> list[str]:
    """Files under data_dir that hold any of the pieces."""
    hits = []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path.name} holds {piece.hex()}" for piece in wanted if piece in data]
    return hits


def held_row(c: Cluster, region: str, user_id: str) -> tuple[int, bytes]:
    """The (version, sealed copy) a region node's node.db holds for a user."""
    (row,) = c.query(region, "SELECT version, blob FROM records WHERE user_id=?", (user_id,))
    return row


async def put_back_and_refused(
    c: Cluster, region: str, user_id: str, old: tuple[int, bytes], purpose: str = "essential.service"
) -> None:
    """Puts an earlier copy back into the region's node.db with the node stopped (a backup
    restored) and checks that it no longer opens there (read for `purpose`)."""
    c.stop(region)
    db = sqlite3.connect(c.data_dir(region) / "node.db")
    try:
        db.execute("UPDATE records SET version=?, blob=? WHERE user_id=?", (*old, user_id))
        db.commit()
    finally:
        db.close()
    c.dep.start(region)
    await c.dep.wait_serving()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await c.get(user_id, region=region, purpose=purpose)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not open" in (refused.value.details() or "")


async def test_an_erased_users_sealed_bytes_and_keys_are_in_no_file_of_any_node(cluster: Cluster):
    regions = (PRIMARY, *AFFILIATES)
    gone: dict[str, set[bytes]] = {r: set() for r in regions}
    # Several versions, each sealed anew: every one of them must go, not only the last.
    for version in range(3):
        for user in (GONE, KEPT):
            await cluster.put(
                user, {"name": f"Li Wei {version}", "email": f"{user}@example.cn", "language": "zh"}
            )
        await cluster.replicated()
        for r in regions:
            gone[r] |= stored_secrets(cluster.data_dir(r), GONE)
    kept = {r: stored_secrets(cluster.data_dir(r), KEPT) for r in regions}
    for r in regions:  # the e-mail's blind-index hashes (issue 18) are among what must go
        hashes = {h for (h,) in cluster.query(r, "SELECT hmac FROM lookup_index WHERE user_id=?", (GONE,))}
        assert hashes and hashes <= gone[r], r
    assert all(gone[r] for r in regions) and all(kept[r] for r in regions)  # every node held both
    wanted = {r: pieces(gone[r], shared=kept[r]) for r in regions}
    for r in regions:  # the scan finds what is there: the erased user's bytes, before the erasure
        assert len(wanted[r]) > 20 and files_holding(cluster.data_dir(r), wanted[r])

    await cluster.delete(GONE)
    await cluster.replicated()

    for r in regions:
        # What is left of the user is the tombstone (id, version, erased), nothing it held.
        assert not stored_secrets(cluster.data_dir(r), GONE) & gone[r]
        assert files_holding(cluster.data_dir(r), wanted[r]) == [], r
        # The users who were not erased are untouched, down to their bytes.
        assert stored_secrets(cluster.data_dir(r), KEPT) == kept[r]
        assert files_holding(cluster.data_dir(r), pieces(kept[r], shared=gone[r]))


async def test_an_old_copy_of_an_erased_user_does_not_open_under_the_key_of_the_user_written_again(
    cluster: Cluster,
):
    """A user erased and written again while replication to a region was paused reaches it
    as one copy: the erasure's tombstone was superseded before it was sent. That copy must
    come under a new data key all the same, or the erased user's copy in any earlier copy of
    the region's node.db (a backup, here put back with the node stopped) would still open
    under a key the region keeps; and the region erases the copy it held as a tombstone
    would have: logged, and in no file once the new copy is applied."""
    c, sg, user = cluster, "ap-southeast-1", "again-1"
    await c.put(user, {"name": "Old Name"})
    await c.replicated()
    old = held_row(c, sg, user)
    erased = stored_secrets(c.data_dir(sg), user)  # the copy and its wrapped key

    admin = c.admin()
    await admin.PauseReplication(admin_pb2.PauseReplicationRequest(region=sg), timeout=10)
    await c.delete(user)
    await c.put(user, {"name": "New Name"})
    await admin.ResumeReplication(admin_pb2.ResumeReplicationRequest(region=sg), timeout=10)
    await c.replicated()
    assert values(await c.get(user, region=sg))["name"] == "New Name"
    # No tombstone reached the region on its own: it tells the erasure by the copy's new
    # creation time, logs it, and keeps nothing of the erased copy in any file.
    entries = [json.loads(e) for _, e, _ in await c.log(sg)]
    copies = [e for e in entries if e["subject"] == user and e["kind"] in ("replication", "erasure")]
    new_version = held_row(c, sg, user)[0]
    assert [(e["kind"], e["record_version"]) for e in copies] == [
        ("replication", old[0]),
        ("erasure", 0),  # no tombstone came: its version is not known here
        ("replication", new_version),
    ]
    assert f"(version {old[0]}, created " in copies[1]["reason"]
    assert "record of the user was created anew" in copies[1]["reason"]
    assert applied_twice(entries, sg) == (0, [])  # each copy applied once, versions rising
    now = stored_secrets(c.data_dir(sg), user)
    assert erased and not erased & now
    assert files_holding(c.data_dir(sg), pieces(erased, shared=now)) == []

    await put_back_and_refused(c, sg, user, old)


async def test_a_copy_withdrawn_and_allowed_again_comes_under_a_new_copy_key(cluster: Cluster):
    """A copy withdrawn from a region (consent withdrawn: its key destroyed there) and allowed
    again comes under a new copy key: the withdrawn copy, in an earlier copy of the region's
    node.db, does not open under the key the region holds now."""
    c, eu, user, marketing = cluster, "eu-west-1", "wd-1", "marketing.communications"
    await c.put(user, {"name": "Li Wei"})  # only marketing, with consent, sends it to eu-west-1
    await c.consent(user, marketing, "ie-affiliate")
    await c.replicated()
    assert values(await c.get(user, region=eu, purpose=marketing))["name"] == "Li Wei"
    old = held_row(c, eu, user)
    await c.consent(user, marketing, "ie-affiliate", withdraw=True)
    await c.replicated()
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await c.get(user, region=eu, purpose=marketing)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    await c.consent(user, marketing, "ie-affiliate")
    await c.replicated()
    assert values(await c.get(user, region=eu, purpose=marketing))["name"] == "Li Wei"
    await put_back_and_refused(c, eu, user, old, marketing)


async def test_data_and_key_folders_are_the_nodes_alone_and_looser_ones_are_named_at_start(
    cluster: Cluster,
):
    for r in (PRIMARY, *AFFILIATES):
        config = load_config(cluster.dep.configs[r])
        for folder in (config.data_dir, config.keys_dir):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
            for f in folder.iterdir():
                if f.is_file() and f.suffix != ".pub":
                    assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert not loose_permissions(config.data_dir, config.keys_dir)
    # An operator's copy that left the store readable by others: the node names it at start.
    config = load_config(cluster.dep.configs[AFFILIATES[0]])
    cluster.stop(AFFILIATES[0])
    config.data_dir.chmod(0o755)
    (config.data_dir / "node.db").chmod(0o644)
    await cluster.start(AFFILIATES[0])
    log = (config.data_dir / "node.log").read_text()
    assert f"loose permissions: {config.data_dir} is 755" in log
    assert f"chmod 600 {config.data_dir / 'node.db'}" in log
    # init keeps each passphrase beside its keys (a local demo): the node says so at start,
    # naming the file, and again if others may read it.
    passphrase = config.keys.secret_file
    assert passphrase is not None and passphrase.parent == config.keys_dir
    assert f"key provider secret: {passphrase} sits beside the keys it protects" in log
    assert "readable beyond its owner: chmod 600 " + str(passphrase) not in log
    moved = config.path.parent / "passphrase-elsewhere"
    cluster.stop(AFFILIATES[0])
    passphrase.rename(moved)
    moved.chmod(0o644)
    node_yaml = cluster.dep.configs[AFFILIATES[0]]
    node_yaml.write_text(
        node_yaml.read_text().replace(str(passphrase.relative_to(node_yaml.parent)), moved.name)
    )
    await cluster.start(AFFILIATES[0])
    log = (config.data_dir / "node.log").read_text().split(f"loose permissions: {config.data_dir} is 755")[-1]
    (warning,) = [line for line in log.splitlines() if "key provider secret:" in line]
    assert warning.endswith(
        f"key provider secret: {moved} is 644, readable beyond its owner: chmod 600 {moved}"
    )
