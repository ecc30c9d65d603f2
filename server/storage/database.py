"""The node's SQLite database: connection, pragmas, the writers' lock, migrations and the unit
of work (a transaction, and a savepoint per write inside it). Repositories build on it.

Records (`node.db`) and their data keys (`keys.db`, attached) are two files, and SQLite
commits a transaction that writes both one file after the other (see `transaction`), so no
transaction here adds a data key beside the records that use it. Two steps instead: a new
data key commits in a keyring transaction of its own before the records sealed under it
(`KeyringRows.add_data_keys`), and an erased user's key is destroyed in a second transaction
after the records' (`_shred`). A crash between two steps leaves at most a key that no live
record uses, which `KeyringRows.drop_orphan_keys` destroys when the node starts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from residency.server.core.errors import StorageFull


@dataclass(frozen=True, slots=True)
class Migration:
    """One `migrations/NNNN_name.sql` file; `version` is the `user_version` it brings a
    database to."""

    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        # Comments go first: a `;` inside one must not split a statement.
        code = "\n".join(line for line in self.sql.splitlines() if not line.lstrip().startswith("--"))
        return [s for s in code.split(";") if s.strip()]


def load_migrations() -> tuple[Migration, ...]:
    """The package's migrations in order. Their numbers must run 1, 2, 3, ... without a gap:
    a database's `user_version` is the number of migrations applied to it."""
    found = []
    for f in resources.files("residency.server.storage").joinpath("migrations").iterdir():
        if m := re.fullmatch(r"(\d{4})_(\w+)\.sql", f.name):
            found.append(Migration(int(m[1]), m[2], f.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(
            f"storage migrations must be numbered 1..{len(found)} without gaps, got {versions}"
        )
    return tuple(found)


MIGRATIONS = load_migrations()
log = logging.getLogger("residency.storage")

# The steps of the two-step protocol after which a node can be made to kill itself (SIGKILL,
# `crash_after`), so that the fault tests crash it between every two of them: a batch's new
# data keys committed (`keys`), the records' transaction that uses them or erases records
# committed (`records`), the erased users' keys destroyed (`shred`).
CRASH_POINTS = ("keys", "records", "shred")

# A node config's `durability` as SQLite's `synchronous`: `full` fsyncs every commit (an
# acknowledged write survives a power cut), `normal` only at checkpoints (survives a crash).
SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}


class UnitOfWork(Protocol):
    """A transaction, and savepoints inside it so that one failing write rolls back alone."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def in_transaction(self) -> bool: ...
    def savepoint(self) -> None: ...
    def rollback_savepoint(self) -> None: ...
    def release_savepoint(self) -> None: ...


class Database:
    """SQLite in WAL mode. `synchronous=FULL` by default: an acknowledged write survives a
    power cut, not only a crash; writes are grouped into batches so the fsync is shared.

    Every method runs on the caller's thread: the node calls them from one dedicated executor
    thread, so a database needs no locking of its own. The keyring (`keys.db`, beside the
    database unless given) is attached as schema `keyring`."""

    def __init__(
        self,
        path: str | Path,
        durability: str = "full",
        keyring: str | Path | None = None,
        crash_after: str = "",
    ):
        synchronous = SYNCHRONOUS[durability]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keyring_path = Path(keyring) if keyring else path.with_name("keys.db")
        self._path = path
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
        self._erasing = False  # this transaction deleted personal data
        self._scrub_owed = False  # a committed erasure whose WAL frames are not yet cleared
        # Users whose data keys this transaction asked to destroy, and those of committed
        # transactions whose keys are not destroyed yet (`_shred` failed: retried next time).
        self._shred_asked: set[str] = set()
        self._shred_owed: set[str] = set()
        self._keys_added = False  # the next transaction commits records under new data keys
        if crash_after not in ("", *CRASH_POINTS):
            raise ValueError(f"crash point {crash_after!r} is not one of {', '.join(CRASH_POINTS)}")
        self._crash_after = crash_after
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(f"PRAGMA keyring.synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache (SQLite's default is 2 MiB): a write batch reads its users'
        # current rows, and a primary's hot records then stay in memory.
        self._db.execute("PRAGMA cache_size=-65536")
        # A standalone replicator may share this database from another process.
        self._db.execute("PRAGMA busy_timeout=30000")
        self._migrate()

    def _migrate(self) -> None:
        """Each migration reads the schema version under the write lock: processes opening one
        new store at once (the primary and its standalone workers) take turns, and each
        migration runs once."""
        while True:
            with self.transaction():
                current = self._db.execute("PRAGMA user_version").fetchone()[0]
                if current >= len(MIGRATIONS):
                    return
                for statement in MIGRATIONS[current].statements():
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
                # With both files in WAL mode this is not atomic across them: vdbeCommit
                # (SQLite's vdbeaux.c) counts no WAL file towards a super-journal
                # (`aMJNeeded[WAL] = 0`), so `nTrans <= 1` and it takes "the simple case",
                # committing each file in turn, `for(i=0; i<db->nDb; i++)`: main (node.db)
                # first, then the attached keys.db. A crash between the two keeps the first.
                self._db.execute("COMMIT")
            except BaseException as e:
                # A write failed, or COMMIT itself did (disk full, an I/O error, a deferred
                # constraint). SQLite may have rolled the transaction back on its own already.
                # What it wrote is gone, and so must be every piece of state kept beside it
                # (the transfer log's sequence, chain head and tree leaves).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._erasing = self._keys_added = False
                self._shred_asked.clear()
                self._rolled_back()
                if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
                    raise StorageFull(
                        f"the node's disk is full ({self._path.parent}): nothing was written; "
                        "send it again once space is freed"
                    ) from e
                raise
            if self._keys_added or self._shred_asked:
                self._reached("records")
            self._keys_added = False
            self._scrub_owed |= self._erasing
            self._erasing = False
            self._shred_owed |= self._shred_asked
            self._shred_asked.clear()
            if self._shred_owed:
                self._shred()
            if self._scrub_owed:
                self._scrub()
        finally:
            fcntl.flock(self._writers, fcntl.LOCK_UN)
        self._committed()

    def in_transaction(self) -> bool:
        """False once SQLite rolled the whole transaction back by itself (disk full, I/O
        error): no savepoint is left to roll back to."""
        return self._db.in_transaction

    def savepoint(self) -> None:
        self._db.execute("SAVEPOINT op")
        self._savepoint_taken()

    def rollback_savepoint(self) -> None:
        self._db.execute("ROLLBACK TO op")
        self._db.execute("RELEASE op")
        self._savepoint_rolled_back()

    def release_savepoint(self) -> None:
        self._db.execute("RELEASE op")

    def _shred_after_commit(self, user_ids: list[str]) -> None:
        """Destroys the users' data keys once the current transaction has committed, in a
        transaction of its own (`_shred`), unless a live record of theirs is there then."""
        self._shred_asked.update(user_ids)

    def _shred(self) -> None:
        """The erasure's second step: the data keys of users whose records the committed
        transaction erased leave keys.db (overwritten in the file, `secure_delete`). A user
        with a live record again by now (written after the erasure, under a new key; a copy
        applied since) keeps it. If this fails (disk full), the keys stay owed: tried again
        after the next commit, and at the latest when the node starts (`drop_orphan_keys`)."""
        users = sorted(self._shred_owed)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "DELETE FROM keyring.data_keys WHERE user_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM records r WHERE r.user_id = ? AND r.deleted = 0)",
                [(u, u) for u in users],
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            log.error(
                "%d erased users' data keys are not destroyed yet (%s): tried again after the "
                "next commit and when the node starts",
                len(users),
                e.__class__.__name__,
            )
            return
        self._shred_owed.clear()
        self._scrub_owed = True
        self._reached("shred")

    def _reached(self, step: str) -> None:
        """A step of the two-step protocol has committed: the fault tests' crash point."""
        if step == self._crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def _erased(self) -> None:
        """A repository deleted personal data in the current transaction: once it commits,
        before the caller hears of it, no file may keep what was deleted."""
        self._erasing = True

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
            logging.getLogger("residency.storage").error(
                "clearing the WAL files after an erasure failed (%s): erased data stays in "
                "their old frames until a later commit clears them; free space in %s",
                e,
                self._path.parent,
            )
            busy = 1
        finally:
            self._db.execute("PRAGMA busy_timeout=30000")
        self._scrub_owed = bool(busy)

    # A repository that keeps state in memory beside its tables (the transfer log's chain head
    # and Merkle tree) follows the unit of work through these; each override calls super().

    def _committed(self) -> None:
        """After COMMIT, with the writers' lock released."""

    def _rolled_back(self) -> None:
        """After ROLLBACK of the whole transaction."""

    def _savepoint_taken(self) -> None:
        """After SAVEPOINT."""

    def _savepoint_rolled_back(self) -> None:
        """After ROLLBACK TO the savepoint."""

    def _where_in(self, sql: str, keys: Sequence[str]) -> list[Any]:
        """Runs `sql`, whose `{marks}` stands for an IN list, over `keys` in chunks of 500
        (SQLite bounds the number of parameters of one statement)."""
        out: list[Any] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            out += self._db.execute(sql.format(marks=",".join("?" * len(chunk))), chunk).fetchall()
        return out

    def close(self) -> None:
        self._db.close()
        os.close(self._writers)
