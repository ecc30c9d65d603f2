"""Backups of a node's files: `node.db` and `keys.db` copied with SQLite's online backup API
from one read transaction (so the two agree, while writers go on), the figures a restore checks
a backup against, and putting a backed-up file in place of a stopped node's."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from residency.server.core import merkle

# Pages copied per step of the backup API: the store's writers wait on no lock meanwhile (WAL),
# and the progress shown moves every few MiB.
PAGES_PER_STEP = 1024

# (file name, pages copied, pages in all), after each step of a file's copy.
Progress = Callable[[str, int, int], None]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _figures(db: sqlite3.Connection) -> dict[str, Any]:
    """What the snapshot holds, read inside the backup's read transaction."""

    def one(sql: str) -> Any:
        return db.execute(sql).fetchone()[0]

    latest = db.execute("SELECT tree_size, note FROM checkpoints ORDER BY tree_size DESC LIMIT 1").fetchone()
    return {
        "schema_version": one("PRAGMA user_version"),
        "tree_size": one("SELECT coalesce(max(sequence), 0) FROM translog"),
        "checkpoint": {"tree_size": latest[0], "note": latest[1]} if latest else None,
        "archived_size": one("SELECT coalesce(max(tree_size), 0) FROM archived"),
        "max_version": one("SELECT coalesce(max(version), 0) FROM records"),
        "outbox_end": one("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name='outbox'"),
        "cursors": dict(db.execute("SELECT destination, sequence FROM cursors ORDER BY destination")),
        "restore_epoch": one("SELECT coalesce(max(epoch), 0) FROM restores")
        if one("SELECT count(*) FROM sqlite_master WHERE name='restores'")
        else 0,
        "data_keys": one("SELECT count(*) FROM keyring.data_keys"),
    }


def copy_store(data_dir: Path, out: Path, keys_out: Path | None, progress: Progress) -> dict[str, Any]:
    """Copies `data_dir/node.db` into `out` and, with `keys_out`, `data_dir/keys.db` into it,
    both as of one moment (one read transaction over both files), while the node may be
    writing. Returns the snapshot's figures and each copy's SHA-256."""
    source = sqlite3.connect(data_dir / "node.db", isolation_level=None, timeout=30)
    try:
        source.execute("ATTACH DATABASE ? AS keyring", (str(data_dir / "keys.db"),))
        # One snapshot of both files: every read below, and every page the backup API copies
        # (it uses the source connection's open read transaction), is of this moment.
        source.execute("BEGIN")
        figures = _figures(source)
        digests = {"node.db": _copy(source, "main", out / "node.db", progress)}
        if keys_out is not None:
            digests["keys.db"] = _copy(source, "keyring", keys_out / "keys.db", progress)
        source.execute("COMMIT")
    finally:
        source.close()
    return {**figures, "sha256": digests}


def _copy(source: sqlite3.Connection, schema: str, to: Path, progress: Progress) -> str:
    target = sqlite3.connect(to)
    try:

        def step(status: int, remaining: int, total: int) -> None:
            progress(to.name, total - remaining, total)

        source.backup(target, pages=PAGES_PER_STEP, progress=step, name=schema)
        # The copy is a file of its own, not a WAL database waiting for its -wal beside it.
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()
    _fsync(to)
    return sha256(to)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backed_up_log(path: Path) -> tuple[merkle.Tree, tuple[int, str] | None]:
    """The Merkle tree of a backup's transfer log and its latest checkpoint (size, note), read
    without writing anything (a backup is a file of its own, without a WAL)."""
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        tree = merkle.Tree(
            merkle.leaf_hash(e) for (e,) in db.execute("SELECT entry FROM translog ORDER BY sequence")
        )
        latest = db.execute(
            "SELECT tree_size, note FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
        ).fetchone()
        return tree, (int(latest[0]), str(latest[1])) if latest else None
    finally:
        db.close()


def copy_file(source: Path, target: Path) -> None:
    """Copies `source` to `target`, fsynced."""
    target.write_bytes(source.read_bytes())
    _fsync(target)


def move_in_place(source: Path, target: Path) -> None:
    """Renames the database file `source` over `target` (a stopped node's). The old file's WAL
    and shared-memory files go first: SQLite would otherwise replay the old WAL onto it."""
    _fsync(source)
    for suffix in ("-wal", "-shm"):
        target.with_name(target.name + suffix).unlink(missing_ok=True)
    os.replace(source, target)
    _fsync(target.parent)
