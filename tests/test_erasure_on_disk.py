"""Erasure is final on disk (DESIGN.md "Storage and scale"): once an erasure is
acknowledged at the primary and applied in every region, no file under any node's data_dir,
WAL and journal files included, holds the erased user's sealed record bytes, wrapped data
keys or blind-index hashes, while everything of the users who were not erased is still there; and what a node
keeps on disk is readable by its own user only."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from residency.server.config.node import load_config
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.server.keys.files import loose_permissions
from tests.conftest import Cluster

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
        db = sqlite3.connect(f"file:{cluster.data_dir(r) / 'node.db'}?mode=ro", uri=True)
        try:
            hashes = {h for (h,) in db.execute("SELECT hmac FROM lookup_index WHERE user_id=?", (GONE,))}
        finally:
            db.close()
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
