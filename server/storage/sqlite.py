"""Durable state of a node: records (or copies), the outbox, cursors, the transfer log and
its signed checkpoints.

`Store` is the narrow interface the rest of the code uses; `SqliteStore` implements it
(WAL mode, versioned migrations). Every method runs on the caller's thread: the node calls
them from one dedicated executor thread, so a store needs no locking of its own.
A write and its outbox and log entries commit in one transaction.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from residency.server.core import merkle, translog


@dataclass(slots=True)
class Row:
    """One user's record (primary) or copy (region node). `blob` is a sealed SealedCopy."""

    user_id: str
    version: int
    deleted: bool
    blob: bytes
    updated_at: float


@dataclass(slots=True)
class OutboxItem:
    sequence: int
    user_id: str
    version: int
    created_at: float


class Store(Protocol):
    def transaction(self) -> Any: ...
    def savepoint(self) -> None: ...
    def rollback_savepoint(self) -> None: ...
    def release_savepoint(self) -> None: ...
    def rows(self, user_ids: list[str]) -> dict[str, Row]: ...
    def upsert(self, rows: list[Row]) -> None: ...
    def outbox_append(self, items: list[tuple[str, int]]) -> None: ...
    def outbox_after(self, sequence: int, limit: int) -> list[OutboxItem]: ...
    def outbox_head(self) -> int: ...
    def outbox_count_after(self, sequence: int) -> int: ...
    def outbox_trim(self, upto: int) -> None: ...
    def cursor(self, destination: str) -> int: ...
    def set_cursor(self, destination: str, sequence: int) -> None: ...
    def log_append(self, entries: list[dict[str, Any]]) -> list[int]: ...
    def log_after(self, sequence: int, limit: int) -> list[tuple[int, bytes, bytes]]: ...
    def log_count(self) -> int: ...
    def log_tree(self) -> merkle.Tree: ...
    def checkpoint_save(self, size: int, note: str) -> None: ...
    def checkpoint_latest(self) -> tuple[int, str] | None: ...
    def archived_size(self) -> int: ...
    def archive_mark(self, size: int) -> None: ...
    def counts(self) -> tuple[int, int]: ...
    def outbox_trim_below(self, destinations: list[str]) -> None: ...
    def lease_take(self, destination: str, owner: str, now: float, ttl: float) -> tuple[bool, bool]: ...
    def lease_held(self, destination: str, owner: str, now: float) -> bool: ...
    def lease_release(self, destination: str, owner: str) -> None: ...
    def is_paused(self, destination: str) -> bool: ...
    def set_paused(self, destination: str, paused: bool) -> None: ...
    def set_last_error(self, destination: str, error: str) -> None: ...
    def add_copies_sent(self, destination: str, n: int) -> None: ...
    def dead_letter(self, destination: str, items: list[tuple[str, int, str]], now: float) -> None: ...
    def dead_letters_superseded(self, destination: str, delivered: list[tuple[str, int]]) -> None: ...
    def dead_letters(self, destination: str, retry_only: bool = False, limit: int = 1000) -> list[tuple]: ...
    def request_retry(self, destination: str | None) -> int: ...
    def replication_status(self, destinations: list[str], now: float) -> dict[str, Any]: ...
    def live_blobs(self, after_user: str, limit: int) -> list[tuple[str, bytes]]: ...
    def data_keys(self, user_ids: list[str]) -> dict[str, tuple[str, bytes, bytes]]: ...
    def put_data_keys(self, rows: list[tuple[str, str, bytes]]) -> None: ...
    def delete_data_keys(self, user_ids: list[str]) -> None: ...
    def put_wrapping_key(self, id: str, wrapped: bytes) -> None: ...
    def close(self) -> None: ...


MIGRATIONS: list[str] = [
    # 1: records, outbox, cursors, transfer log
    """
    CREATE TABLE records (
        user_id    TEXT PRIMARY KEY,
        version    INTEGER NOT NULL,
        deleted    INTEGER NOT NULL DEFAULT 0,
        blob       BLOB NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        sequence   INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id    TEXT NOT NULL,
        version    INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE cursors (
        destination TEXT PRIMARY KEY,
        sequence    INTEGER NOT NULL
    );
    CREATE TABLE translog (
        sequence INTEGER PRIMARY KEY,
        entry    BLOB NOT NULL,
        chain    BLOB NOT NULL
    );
    """,
    # 2: consents, third-party grants, retention sweeps (issue 3)
    """
    CREATE TABLE consents (
        user_id     TEXT NOT NULL,
        purpose     TEXT NOT NULL,
        recipient   TEXT NOT NULL,
        sensitive   INTEGER NOT NULL,
        granted_at  REAL NOT NULL,
        withdrawn_at REAL,
        evidence    TEXT NOT NULL,
        actor       TEXT NOT NULL,
        PRIMARY KEY (user_id, purpose, recipient, sensitive)
    ) WITHOUT ROWID;
    CREATE TABLE grants (
        id          TEXT PRIMARY KEY,
        recipient   TEXT NOT NULL,
        purpose     TEXT NOT NULL,
        legal_basis TEXT NOT NULL,
        categories  TEXT NOT NULL,
        created_at  REAL NOT NULL,
        ends_at     REAL NOT NULL,
        revoked_at  REAL,
        ended_logged INTEGER NOT NULL DEFAULT 0,
        actor       TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE grant_users (
        grant_id TEXT NOT NULL,
        user_id  TEXT NOT NULL,
        PRIMARY KEY (user_id, grant_id)
    ) WITHOUT ROWID;
    CREATE TABLE sweeps (
        name   TEXT PRIMARY KEY,
        cutoff REAL NOT NULL
    );
    CREATE INDEX records_updated ON records (updated_at)
    """,
    # 3: signed checkpoints of the transfer log and how far it is archived (the Merkle tree
    # itself is rebuilt from the entries at start: leaf hashes are a pure function of them)
    """
    CREATE TABLE checkpoints (
        tree_size  INTEGER PRIMARY KEY,
        note       TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE archived (
        tree_size   INTEGER PRIMARY KEY,
        uploaded_at REAL NOT NULL
    );
    """,
    # 4: the keyring (issue 4), a separate file (keys.db) beside node.db: per-user wrapped data keys
    # and the wrapping keys that wrap them. Kept apart so that erasing a user's data key
    # makes any earlier copy of node.db unreadable for that user.
    """
    CREATE TABLE IF NOT EXISTS keyring.wrapping_keys (
        id         TEXT PRIMARY KEY,
        wrapped    BLOB NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS keyring.data_keys (
        user_id      TEXT PRIMARY KEY,
        wrapping_key TEXT NOT NULL,
        wrapped      BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS keyring.data_keys_by_wrapping_key ON data_keys (wrapping_key);
    """,
    # 5: replication control, shared by every worker process on this store: leases (one
    # worker ships to a destination at a time), per-destination state (paused, last error,
    # copies sent) and dead letters (copies a destination refused for good).
    """
    CREATE TABLE leases (
        destination TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        expires_at  REAL NOT NULL
    );
    CREATE TABLE destination_state (
        destination TEXT PRIMARY KEY,
        paused      INTEGER NOT NULL DEFAULT 0,
        last_error  TEXT NOT NULL DEFAULT '',
        copies_sent INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE dead_letters (
        destination TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        version     INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        failed_at   REAL NOT NULL,
        retry       INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (destination, user_id)
    ) WITHOUT ROWID;
    """,
]


class SqliteStore:
    """SQLite in WAL mode. `synchronous=FULL` by default: an acknowledged write survives a
    power cut, not only a crash; writes are grouped into batches so the fsync is shared."""

    def __init__(self, path: str | Path, synchronous: str = "FULL", keyring: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keyring_path = Path(keyring) if keyring else self.path.with_name("keys.db")
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._writers = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._db.execute("ATTACH DATABASE ? AS keyring", (str(self.keyring_path),))
        # Switching a new file to WAL answers "database is locked" at once, without waiting,
        # while another process switches it too: processes opening one store take turns.
        fcntl.flock(self._writers, fcntl.LOCK_EX)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA keyring.journal_mode=WAL")
        finally:
            fcntl.flock(self._writers, fcntl.LOCK_UN)
        # A destroyed data key is overwritten in the file, not only unlinked from the b-tree.
        self._db.execute("PRAGMA keyring.secure_delete=ON")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(f"PRAGMA keyring.synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache (SQLite's default is 2 MiB): a write batch reads its users'
        # current rows, and a primary's hot records then stay in memory.
        self._db.execute("PRAGMA cache_size=-65536")
        # A standalone replicator may share this database from another process.
        self._db.execute("PRAGMA busy_timeout=30000")
        self._pending_log: tuple[int, bytes] | None = None
        self._savepoint_log: tuple[int, bytes] | None = None
        # Leaf hashes of entries appended in the open transaction; the tree gets them at commit.
        self._pending_leaves: list[bytes] = []
        self._savepoint_leaves = 0
        self._log_seq, self._log_head = 0, translog.GENESIS
        self._migrate()
        last = self._db.execute(
            "SELECT sequence, chain FROM translog ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        self._log_seq, self._log_head = (last[0], last[1]) if last else (0, translog.GENESIS)
        # Leaf index = sequence - 1: sequences start at 1, RFC 6962 leaf indexes at 0.
        rows = self._db.execute("SELECT entry FROM translog ORDER BY sequence")
        self.tree = merkle.Tree(merkle.leaf_hash(data) for (data,) in rows)

    def _migrate(self) -> None:
        """Each migration reads the schema version under the write lock: processes opening one
        new store at once (the primary and its standalone workers) take turns, and each
        migration runs once."""
        while True:
            with self.transaction():
                current = self._db.execute("PRAGMA user_version").fetchone()[0]
                if current >= len(MIGRATIONS):
                    return
                for statement in MIGRATIONS[current].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={current + 1}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        # Writers of one database (the node and its standalone workers) queue on an advisory
        # lock first: a waiter wakes the moment the holder commits. SQLite's own busy handler
        # polls with sleeps of up to 100 ms, which made a second writing process slow both.
        fcntl.flock(self._writers, fcntl.LOCK_EX)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                self._pending_log = None
                self._pending_leaves = []
                raise
            self._db.execute("COMMIT")
        finally:
            fcntl.flock(self._writers, fcntl.LOCK_UN)
        if self._pending_log is not None:
            self._log_seq, self._log_head = self._pending_log
            self._pending_log = None
            self.tree.extend(self._pending_leaves)
            self._pending_leaves = []

    def savepoint(self) -> None:
        self._db.execute("SAVEPOINT op")
        self._savepoint_log = self._pending_log
        self._savepoint_leaves = len(self._pending_leaves)

    def rollback_savepoint(self) -> None:
        self._db.execute("ROLLBACK TO op")
        self._db.execute("RELEASE op")
        self._pending_log = self._savepoint_log
        del self._pending_leaves[self._savepoint_leaves :]

    def release_savepoint(self) -> None:
        self._db.execute("RELEASE op")

    def _where_in(self, sql: str, keys: list[str]) -> list[tuple]:
        """Runs `sql`, whose `{marks}` stands for an IN list, over `keys` in chunks of 500
        (SQLite bounds the number of parameters of one statement)."""
        out: list[tuple] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            out += self._db.execute(sql.format(marks=",".join("?" * len(chunk))), chunk).fetchall()
        return out

    def rows(self, user_ids: list[str]) -> dict[str, Row]:
        return {
            r[0]: Row(r[0], r[1], bool(r[2]), r[3], r[4])
            for r in self._where_in(
                "SELECT user_id, version, deleted, blob, updated_at FROM records WHERE user_id IN ({marks})",
                user_ids,
            )
        }

    def upsert(self, rows: list[Row]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO records (user_id, version, deleted, blob, updated_at) VALUES (?,?,?,?,?)",
            [(r.user_id, r.version, int(r.deleted), r.blob, r.updated_at) for r in rows],
        )

    def outbox_append(self, items: list[tuple[str, int]]) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT INTO outbox (user_id, version, created_at) VALUES (?,?,?)",
            [(u, v, now) for u, v in items],
        )

    def outbox_after(self, sequence: int, limit: int) -> list[OutboxItem]:
        return [
            OutboxItem(*r)
            for r in self._db.execute(
                "SELECT sequence, user_id, version, created_at FROM outbox WHERE sequence > ? "
                "ORDER BY sequence LIMIT ?",
                (sequence, limit),
            )
        ]

    def outbox_head(self) -> int:
        # AUTOINCREMENT keeps the high-water mark even after the outbox is trimmed.
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        return row[0] if row else 0

    def outbox_count_after(self, sequence: int) -> int:
        return self._db.execute("SELECT count(*) FROM outbox WHERE sequence > ?", (sequence,)).fetchone()[0]

    def outbox_oldest_after(self, sequence: int) -> float | None:
        row = self._db.execute(
            "SELECT created_at FROM outbox WHERE sequence > ? ORDER BY sequence LIMIT 1", (sequence,)
        ).fetchone()
        return row[0] if row else None

    def outbox_trim(self, upto: int) -> None:
        self._db.execute("DELETE FROM outbox WHERE sequence <= ?", (upto,))

    def cursor(self, destination: str) -> int:
        row = self._db.execute("SELECT sequence FROM cursors WHERE destination=?", (destination,)).fetchone()
        return row[0] if row else 0

    def set_cursor(self, destination: str, sequence: int) -> None:
        self._db.execute(
            "INSERT INTO cursors (destination, sequence) VALUES (?,?) "
            "ON CONFLICT(destination) DO UPDATE SET sequence=excluded.sequence",
            (destination, sequence),
        )

    def log_append(self, entries: list[dict[str, Any]]) -> list[int]:
        """Appends entries (inside the caller's transaction) and returns their sequences."""
        if self._pending_log is None:
            # Another process (a standalone replicator) may have appended since: the write
            # lock is held here, so the head read now is the one to chain onto.
            self._catch_up()
        seq, head = self._pending_log or (self._log_seq, self._log_head)
        rows, out = [], []
        for e in entries:
            seq += 1
            data = translog.canonical({**e, "sequence": seq})
            head = translog.chain_hash(head, data)
            rows.append((seq, data, head))
            out.append(seq)
            self._pending_leaves.append(merkle.leaf_hash(data))
        self._db.executemany("INSERT INTO translog (sequence, entry, chain) VALUES (?,?,?)", rows)
        self._pending_log = (seq, head)
        return out

    def log_after(self, sequence: int, limit: int) -> list[tuple[int, bytes, bytes]]:
        return list(
            self._db.execute(
                "SELECT sequence, entry, chain FROM translog WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (sequence, limit),
            )
        )

    def log_count(self) -> int:
        row = self._db.execute("SELECT max(sequence) FROM translog").fetchone()
        return row[0] or 0

    def outbox_trim_below(self, destinations: list[str]) -> None:
        """Drops outbox entries every destination has applied."""
        if not destinations:
            return
        marks = ",".join("?" * len(destinations))
        applied, known = self._db.execute(
            f"SELECT min(sequence), count(*) FROM cursors WHERE destination IN ({marks})", destinations
        ).fetchone()
        if known == len(destinations) and applied:
            self.outbox_trim(applied)

    # ---- replication control (leases, pause, dead letters) ----------------------------

    def lease_take(self, destination: str, owner: str, now: float, ttl: float) -> tuple[bool, bool]:
        """Takes or renews the lease on `destination` for `owner` if it is free, expired or
        already `owner`'s. Returns (held, paused)."""
        self._db.execute(
            "INSERT INTO leases (destination, owner, expires_at) VALUES (?,?,?) "
            "ON CONFLICT(destination) DO UPDATE SET owner=excluded.owner, expires_at=excluded.expires_at "
            "WHERE leases.owner=excluded.owner OR leases.expires_at < ?",
            (destination, owner, now + ttl, now),
        )
        held = self.lease_held(destination, owner, now)
        row = self._db.execute(
            "SELECT paused FROM destination_state WHERE destination=?", (destination,)
        ).fetchone()
        return held, bool(row and row[0])

    def lease_held(self, destination: str, owner: str, now: float) -> bool:
        row = self._db.execute(
            "SELECT owner, expires_at FROM leases WHERE destination=?", (destination,)
        ).fetchone()
        return row is not None and row[0] == owner and row[1] > now

    def lease_release(self, destination: str, owner: str) -> None:
        self._db.execute("DELETE FROM leases WHERE destination=? AND owner=?", (destination, owner))

    def _state(self, destination: str, column: str, value: Any) -> None:
        self._db.execute(
            f"INSERT INTO destination_state (destination, {column}) VALUES (?,?) "
            f"ON CONFLICT(destination) DO UPDATE SET {column}=excluded.{column}",
            (destination, value),
        )

    def is_paused(self, destination: str) -> bool:
        row = self._db.execute(
            "SELECT paused FROM destination_state WHERE destination=?", (destination,)
        ).fetchone()
        return bool(row and row[0])

    def set_paused(self, destination: str, paused: bool) -> None:
        self._state(destination, "paused", int(paused))

    def set_last_error(self, destination: str, error: str) -> None:
        self._state(destination, "last_error", error)

    def add_copies_sent(self, destination: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO destination_state (destination, copies_sent) VALUES (?,?) "
            "ON CONFLICT(destination) DO UPDATE SET copies_sent=copies_sent+excluded.copies_sent",
            (destination, n),
        )

    def dead_letter(self, destination: str, items: list[tuple[str, int, str]], now: float) -> None:
        """Records copies (user, version, reason) a destination refused for good. One per
        user: a later refused version replaces an earlier one."""
        self._db.executemany(
            "INSERT OR REPLACE INTO dead_letters (destination, user_id, version, reason, failed_at, retry) "
            "VALUES (?,?,?,?,?,0)",
            [(destination, u, v, r, now) for u, v, r in items],
        )

    def dead_letters_superseded(self, destination: str, delivered: list[tuple[str, int]]) -> None:
        """A delivered version supersedes any dead letter of the same user at or below it."""
        self._db.executemany(
            "DELETE FROM dead_letters WHERE destination=? AND user_id=? AND version<=?",
            [(destination, u, v) for u, v in delivered],
        )

    def dead_letters(self, destination: str, retry_only: bool = False, limit: int = 1000) -> list[tuple]:
        """(user, version, reason, failed_at, retry) of a destination's dead letters."""
        where = " AND retry=1" if retry_only else ""
        return list(
            self._db.execute(
                "SELECT user_id, version, reason, failed_at, retry FROM dead_letters "
                f"WHERE destination=?{where} ORDER BY failed_at LIMIT ?",
                (destination, limit),
            )
        )

    def request_retry(self, destination: str | None) -> int:
        """Marks dead letters (of one destination, or all) to be re-driven; returns how many."""
        if destination is None:
            cur = self._db.execute("UPDATE dead_letters SET retry=1")
        else:
            cur = self._db.execute("UPDATE dead_letters SET retry=1 WHERE destination=?", (destination,))
        return cur.rowcount

    def replication_status(self, destinations: list[str], now: float) -> dict[str, Any]:
        """Per destination: cursor, pending entries, lag, dead letters, pause, lease."""
        out: dict[str, Any] = {"head": self.outbox_head(), "destinations": {}}
        for d in destinations:
            cursor = self.cursor(d)
            oldest = self.outbox_oldest_after(cursor)
            state = self._db.execute(
                "SELECT paused, last_error, copies_sent FROM destination_state WHERE destination=?", (d,)
            ).fetchone() or (0, "", 0)
            lease = self._db.execute(
                "SELECT owner, expires_at FROM leases WHERE destination=?", (d,)
            ).fetchone()
            (dead,) = self._db.execute(
                "SELECT count(*) FROM dead_letters WHERE destination=?", (d,)
            ).fetchone()
            out["destinations"][d] = {
                "applied_sequence": cursor,
                "pending": self.outbox_count_after(cursor),
                "lag_seconds": max(0.0, now - oldest) if oldest else 0.0,
                "paused": bool(state[0]),
                "last_error": state[1],
                "copies_sent": state[2],
                "dead_lettered": dead,
                "lease_owner": lease[0] if lease and lease[1] > now else "",
            }
        return out

    def log_tree(self) -> merkle.Tree:
        """The Merkle tree of committed entries (leaf index = sequence - 1). Read it on the
        store thread only: commits extend it there."""
        if self._pending_log is None:
            self._catch_up()
        return self.tree

    def _catch_up(self) -> None:
        """Takes in entries another process (a standalone replicator) committed: the chain
        head to append after, and their leaves in the tree."""
        last = self._db.execute(
            "SELECT sequence, chain FROM translog ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        if last is None or last[0] == self._log_seq:
            return
        self._log_seq, self._log_head = last[0], last[1]
        if self.tree.size < last[0]:
            rows = self._db.execute(
                "SELECT entry FROM translog WHERE sequence > ? ORDER BY sequence", (self.tree.size,)
            )
            self.tree.extend(merkle.leaf_hash(data) for (data,) in rows)

    def checkpoint_save(self, size: int, note: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO checkpoints (tree_size, note, created_at) VALUES (?,?,?)",
            (size, note, time.time()),
        )

    def checkpoint_latest(self) -> tuple[int, str] | None:
        row = self._db.execute(
            "SELECT tree_size, note FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
        ).fetchone()
        return (row[0], row[1]) if row else None

    def archived_size(self) -> int:
        """The tree size up to which sealed segments are in the archive bucket."""
        return self._db.execute("SELECT coalesce(max(tree_size), 0) FROM archived").fetchone()[0]

    def archive_mark(self, size: int) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO archived (tree_size, uploaded_at) VALUES (?,?)", (size, time.time())
        )

    def counts(self) -> tuple[int, int]:
        """(live records, tombstones)."""
        live, dead = self._db.execute(
            "SELECT coalesce(sum(deleted=0),0), coalesce(sum(deleted=1),0) FROM records"
        ).fetchone()
        return live, dead

    def live_blobs(self, after_user: str, limit: int) -> list[tuple[str, bytes]]:
        return list(
            self._db.execute(
                "SELECT user_id, blob FROM records WHERE deleted=0 AND user_id > ? ORDER BY user_id LIMIT ?",
                (after_user, limit),
            )
        )

    # ---- keyring ------------------------------------------------------------------------

    def data_keys(self, user_ids: list[str]) -> dict[str, tuple[str, bytes, bytes]]:
        """user id -> (wrapping key id, wrapping key as the provider wrapped it, wrapped DEK).
        For a region node's copies the wrapping key id is `hpke:KEYID` and its blob empty."""
        return {
            u: (wk, w, dek)
            for u, wk, w, dek in self._where_in(
                "SELECT d.user_id, d.wrapping_key, coalesce(k.wrapped, x''), d.wrapped "
                "FROM keyring.data_keys d LEFT JOIN keyring.wrapping_keys k ON k.id = d.wrapping_key "
                "WHERE d.user_id IN ({marks})",
                user_ids,
            )
        }

    def put_data_keys(self, rows: list[tuple[str, str, bytes]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO keyring.data_keys (user_id, wrapping_key, wrapped) VALUES (?,?,?)", rows
        )

    def delete_data_keys(self, user_ids: list[str]) -> None:
        self._db.executemany("DELETE FROM keyring.data_keys WHERE user_id=?", [(u,) for u in user_ids])

    def put_wrapping_key(self, id: str, wrapped: bytes) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO keyring.wrapping_keys (id, wrapped, created_at) VALUES (?,?,?)",
            (id, wrapped, time.time()),
        )

    def data_keys_not_under(
        self, wrapping_key: str, after_user: str, limit: int
    ) -> list[tuple[str, str, bytes, bytes]]:
        """A page of data keys wrapped by anything but `wrapping_key` (rotation): by another
        wrapping key, or (region nodes) by HPKE to the region key, `hpke:KEYID`."""
        return list(
            self._db.execute(
                "SELECT d.user_id, d.wrapping_key, coalesce(k.wrapped, x''), d.wrapped "
                "FROM keyring.data_keys d LEFT JOIN keyring.wrapping_keys k ON k.id = d.wrapping_key "
                "WHERE d.wrapping_key != ? AND d.user_id > ? ORDER BY d.user_id LIMIT ?",
                (wrapping_key, after_user, limit),
            )
        )

    def count_data_keys_not_under(self, wrapping_key: str) -> int:
        return self._db.execute(
            "SELECT count(*) FROM keyring.data_keys WHERE wrapping_key != ?",
            (wrapping_key,),
        ).fetchone()[0]

    def delete_unused_wrapping_keys(self) -> int:
        return self._db.execute(
            "DELETE FROM keyring.wrapping_keys "
            "WHERE id NOT IN (SELECT DISTINCT wrapping_key FROM keyring.data_keys)"
        ).rowcount

    # ---- consents and grants (issue 3) ------------------------------------------------

    def consent_set(
        self,
        user_id: str,
        purpose: str,
        recipient: str,
        sensitive: bool,
        when: float,
        evidence: str,
        actor: str,
        withdraw: bool,
    ) -> bool:
        """Grants or withdraws one consent; returns whether the standing state changed."""
        row = self._db.execute(
            "SELECT withdrawn_at FROM consents WHERE user_id=? AND purpose=? AND recipient=? AND sensitive=?",
            (user_id, purpose, recipient, int(sensitive)),
        ).fetchone()
        standing = row is not None and row[0] is None
        if withdraw:
            if standing:
                self._db.execute(
                    "UPDATE consents SET withdrawn_at=?, evidence=?, actor=? WHERE user_id=? AND purpose=? "
                    "AND recipient=? AND sensitive=?",
                    (when, evidence, actor, user_id, purpose, recipient, int(sensitive)),
                )
            return standing
        self._db.execute(
            "INSERT OR REPLACE INTO consents (user_id, purpose, recipient, sensitive, granted_at,"
            " withdrawn_at, evidence, actor) VALUES (?,?,?,?,?,NULL,?,?)",
            (user_id, purpose, recipient, int(sensitive), when, evidence, actor),
        )
        return not standing

    def consents(self, user_ids: list[str], include_withdrawn: bool = False) -> list[tuple]:
        """(user_id, purpose, recipient, sensitive, granted_at, withdrawn_at, evidence, actor)."""
        extra = "" if include_withdrawn else " AND withdrawn_at IS NULL"
        return self._where_in(
            "SELECT user_id, purpose, recipient, sensitive, granted_at, withdrawn_at, evidence, actor "
            "FROM consents WHERE user_id IN ({marks})" + extra + " ORDER BY user_id, purpose, recipient",
            user_ids,
        )

    def grant_put(self, grant: dict[str, Any], users: list[str]) -> None:
        self._db.execute(
            "INSERT INTO grants (id, recipient, purpose, legal_basis, categories, created_at, ends_at, actor)"
            " VALUES (:id, :recipient, :purpose, :legal_basis, :categories, :created_at, :ends_at, :actor)",
            grant,
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO grant_users (grant_id, user_id) VALUES (?,?)",
            [(grant["id"], u) for u in users],
        )

    def grant_revoke(self, grant_id: str, when: float) -> bool:
        cur = self._db.execute(
            "UPDATE grants SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (when, grant_id)
        )
        return cur.rowcount == 1

    def grants_for(self, user_ids: list[str]) -> list[tuple]:
        """(user_id, id, recipient, purpose, legal_basis, categories, ends_at, revoked_at) of every grant
        naming one of `user_ids`, ended or not."""
        return self._where_in(
            "SELECT gu.user_id, g.id, g.recipient, g.purpose, g.legal_basis, g.categories, g.ends_at,"
            " g.revoked_at FROM grant_users gu JOIN grants g ON g.id = gu.grant_id"
            " WHERE gu.user_id IN ({marks})",
            user_ids,
        )

    def grants_list(self) -> list[tuple]:
        return self._db.execute(
            "SELECT id, recipient, purpose, legal_basis, categories, created_at, ends_at, revoked_at, actor,"
            " (SELECT count(*) FROM grant_users WHERE grant_id = grants.id) FROM grants ORDER BY created_at"
        ).fetchall()

    def grants_ended_unlogged(self, now: float) -> list[tuple[str, str, float | None]]:
        """Grants past their end (or revoked) whose ending is not yet carried out."""
        return self._db.execute(
            "SELECT id, recipient, revoked_at FROM grants"
            " WHERE ended_logged=0 AND (ends_at <= ? OR revoked_at IS NOT NULL)",
            (now,),
        ).fetchall()

    def grant_users(self, grant_id: str) -> list[str]:
        return [
            r[0] for r in self._db.execute("SELECT user_id FROM grant_users WHERE grant_id=?", (grant_id,))
        ]

    def grant_mark_ended(self, grant_id: str) -> None:
        self._db.execute("UPDATE grants SET ended_logged=1 WHERE id=?", (grant_id,))

    def sweep_cutoff(self, name: str) -> float:
        row = self._db.execute("SELECT cutoff FROM sweeps WHERE name=?", (name,)).fetchone()
        return row[0] if row else 0.0

    def set_sweep_cutoff(self, name: str, cutoff: float) -> None:
        self._db.execute(
            "INSERT INTO sweeps (name, cutoff) VALUES (?,?)"
            " ON CONFLICT(name) DO UPDATE SET cutoff=excluded.cutoff",
            (name, cutoff),
        )

    def live_updated_between(self, after: float, upto: float, limit: int) -> list[str]:
        return [
            r[0]
            for r in self._db.execute(
                "SELECT user_id FROM records WHERE deleted=0 AND updated_at > ? AND updated_at <= ? "
                "ORDER BY updated_at LIMIT ?",
                (after, upto, limit),
            )
        ]

    def close(self) -> None:
        self._db.close()
        os.close(self._writers)
