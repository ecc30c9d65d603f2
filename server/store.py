"""Durable state of a node: records (or copies), the outbox, cursors and the transfer log.

`Store` is the narrow interface the rest of the code uses; `SqliteStore` implements it
(WAL mode, versioned migrations). Every method runs on the caller's thread: the node calls
them from one dedicated executor thread, so a store needs no locking of its own.
A write and its outbox and log entries commit in one transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server import translog


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
    # 2: replication control, shared by every worker process on this store: leases (one
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

    def __init__(self, path: str | Path, synchronous: str = "FULL"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        # A standalone replicator may share this database from another process.
        self._db.execute("PRAGMA busy_timeout=30000")
        self._pending_log: tuple[int, bytes] | None = None
        self._savepoint_log: tuple[int, bytes] | None = None
        self._log_seq, self._log_head = 0, translog.GENESIS
        self._migrate()
        last = self._db.execute(
            "SELECT sequence, chain FROM translog ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        self._log_seq, self._log_head = (last[0], last[1]) if last else (0, translog.GENESIS)

    def _migrate(self) -> None:
        current = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._pending_log = None
            raise
        self._db.execute("COMMIT")
        if self._pending_log is not None:
            self._log_seq, self._log_head = self._pending_log
            self._pending_log = None

    def savepoint(self) -> None:
        self._db.execute("SAVEPOINT op")
        self._savepoint_log = self._pending_log

    def rollback_savepoint(self) -> None:
        self._db.execute("ROLLBACK TO op")
        self._db.execute("RELEASE op")
        self._pending_log = self._savepoint_log

    def release_savepoint(self) -> None:
        self._db.execute("RELEASE op")

    def rows(self, user_ids: list[str]) -> dict[str, Row]:
        out: dict[str, Row] = {}
        for i in range(0, len(user_ids), 500):
            chunk = user_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._db.execute(
                f"SELECT user_id, version, deleted, blob, updated_at FROM records WHERE user_id IN ({marks})",
                chunk,
            ):
                out[r[0]] = Row(r[0], r[1], bool(r[2]), r[3], r[4])
        return out

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
            last = self._db.execute(
                "SELECT sequence, chain FROM translog ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
            if last is not None:
                self._log_seq, self._log_head = last[0], last[1]
        seq, head = self._pending_log or (self._log_seq, self._log_head)
        rows, out = [], []
        for e in entries:
            seq += 1
            data = translog.canonical({**e, "sequence": seq})
            head = translog.chain_hash(head, data)
            rows.append((seq, data, head))
            out.append(seq)
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

    def close(self) -> None:
        self._db.close()
