"""The embedded store: `SqliteDatabase` (one SQLite file in WAL mode, its data keys in a second
one, the writers' file lock, secure deletion) and `SqliteStore`, every repository on it.

Callers hold this one object but are typed by the narrow Protocols they use (each
repository's module, combined per caller in `residency.server.storage.roles`).
A write and its outbox and log entries commit in one transaction.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from pathlib import Path

from residency.server.core.errors import StorageFull
from residency.server.storage.database import Database
from residency.server.storage.repositories import Repositories

log = logging.getLogger("residency.storage")

# A node config's `durability` as SQLite's `synchronous`: `full` fsyncs every commit (an
# acknowledged write survives a power cut), `normal` only at checkpoints (survives a crash).
SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}


class SqliteDatabase(Database):
    """SQLite in WAL mode. `synchronous=FULL` by default: an acknowledged write survives a
    power cut, not only a crash; writes are grouped into batches so the fsync is shared.
    The keyring (`keys.db`, beside the database unless given) is attached as schema `keyring`."""

    _db: sqlite3.Connection

    def __init__(
        self,
        path: str | Path,
        durability: str = "full",
        keyring: str | Path | None = None,
        crash_after: str = "",
    ):
        super().__init__(crash_after)
        synchronous = SYNCHRONOUS[durability]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keyring_path = Path(keyring) if keyring else path.with_name("keys.db")
        self._path = path
        self._where = str(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._writers = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._db.execute("ATTACH DATABASE ? AS keyring", (str(keyring_path),))
        # Switching a new file to WAL answers "database is locked" at once, without waiting,
        # while another process switches it too: processes opening one store take turns.
        fcntl.flock(self._writers, fcntl.LOCK_EX)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA keyring.journal_mode=WAL")
        finally:
            fcntl.flock(self._writers, fcntl.LOCK_UN)
        # Erasure is final on disk: deleted content (an erased record, a copy withdrawn, a
        # destroyed data key) is overwritten with zeros in the page, not only unlinked from the
        # b-tree, and `_scrub` clears the WAL frames that still hold the page as it was.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA keyring.secure_delete=ON")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(f"PRAGMA keyring.synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache (SQLite's default is 2 MiB): a write batch reads its users'
        # current rows, and a primary's hot records then stay in memory.
        self._db.execute("PRAGMA cache_size=-65536")
        # A standalone replicator may share this database from another process.
        self._db.execute("PRAGMA busy_timeout=30000")
        self._migrate()

    def _schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _set_schema_version(self, version: int) -> None:
        self._db.execute(f"PRAGMA user_version={int(version)}")

    def _last_outbox_sequence(self) -> int:
        # AUTOINCREMENT keeps its high-water mark in `sqlite_sequence`.
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        return int(row[0]) if row else 0

    def _lock_writers(self) -> None:
        # Writers of one database (the node and its standalone workers) queue on an advisory
        # lock first: a waiter wakes the moment the holder commits. SQLite's own busy handler
        # polls with sleeps of up to 100 ms, which made a second writing process slow both.
        fcntl.flock(self._writers, fcntl.LOCK_EX)

    def _unlock_writers(self) -> None:
        fcntl.flock(self._writers, fcntl.LOCK_UN)

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def _begin_snapshot(self) -> None:
        # WAL: a deferred transaction's first read fixes the snapshot its later reads see.
        self._db.execute("BEGIN DEFERRED")

    def _commit(self) -> None:
        # With both files in WAL mode this is not atomic across them: vdbeCommit (SQLite's
        # vdbeaux.c) counts no WAL file towards a super-journal (`aMJNeeded[WAL] = 0`), so
        # `nTrans <= 1` and it takes "the simple case", committing each file in turn,
        # `for(i=0; i<db->nDb; i++)`: main (node.db) first, then the attached keys.db. A crash
        # between the two keeps the first.
        self._db.execute("COMMIT")

    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def _failure(self, e: BaseException) -> BaseException | None:
        if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
            return StorageFull(
                f"the node's disk is full ({self._path.parent}): nothing was written; "
                "send it again once space is freed"
            )
        return None

    def _scrub(self) -> None:
        """Copies both WAL files into their databases and truncates them to nothing, so that
        no frame of a page as it was before an erasure survives in any file (with
        `secure_delete` the pages themselves hold zeros where the data was). A reader in
        another process (a standalone worker) can hold the WAL for a moment: then the scrub
        stays owed and the next commit tries again, without waiting here for long.

        It runs after COMMIT: what it cannot do is no failure of the transaction, which has
        committed and must be answered so. On a full disk the copy fails (the database file
        would grow): the scrub stays owed, and the next commit once space returns does it."""
        self._db.execute("PRAGMA busy_timeout=200")
        try:
            busy = 0
            for schema in ("main", "keyring"):
                busy |= self._db.execute(f"PRAGMA {schema}.wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.OperationalError as e:
            log.error(
                "clearing the WAL files after an erasure failed (%s): erased data stays in "
                "their old frames until a later commit clears them; free space in %s",
                e,
                self._path.parent,
            )
            busy = 1
        finally:
            self._db.execute("PRAGMA busy_timeout=30000")
        self._scrub_owed = bool(busy)

    def close(self) -> None:
        self._db.close()
        os.close(self._writers)


class SqliteStore(Repositories, SqliteDatabase):
    """The node's store on SQLite: every repository (`Repositories`) on one SQLite database."""
