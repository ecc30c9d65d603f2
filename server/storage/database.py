"""The unit of work both stores share: a transaction, a savepoint per write inside it, the
migrations, and the two-step protocol around data keys. `SqliteDatabase` (the embedded
default) and `PostgresDatabase` supply the connection, the writers' lock and the dialect;
repositories build on this class and run the SQL both accept.

On SQLite, records (`node.db`) and their data keys (`keys.db`, attached) are two files, and
SQLite commits a transaction that writes both one file after the other (see
`SqliteDatabase._commit`), so no transaction here adds a data key beside the records that use
it. Two steps instead: a new data key commits in a keyring transaction of its own before the
records sealed under it (`KeyringRows.add_data_keys`), and an erased user's key is destroyed in
a second transaction after the records' (`_shred`). A crash between two steps leaves at most a
key that no live record uses, which `KeyringRows.drop_orphan_keys` destroys when the node
starts. PostgreSQL commits one database atomically: there a batch's new data keys join the
transaction of its records (`_keys_with_records`), which matters once several front ends
share a store: one starting up must not destroy, as an orphan, a key another has committed
for records it is about to commit.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Migration:
    """One `migrations/NNNN_name.sql` file; `version` is the schema version it brings a
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
    a database's schema version is the number of migrations applied to it."""
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


class Connection(Protocol):
    """What repositories call on `self._db`: SQL with `?` placeholders (or `:name` with a
    dict), cursors that iterate, `fetchone`, `fetchall` and give `rowcount`."""

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ...) -> Any: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...


class UnitOfWork(Protocol):
    """A transaction, and savepoints inside it so that one failing write rolls back alone."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def in_transaction(self) -> bool: ...
    def failure(self, e: BaseException) -> BaseException | None: ...
    def savepoint(self) -> None: ...
    def rollback_savepoint(self) -> None: ...
    def release_savepoint(self) -> None: ...


class Database:
    """The unit of work over a backend's connection (`_db`). Every method runs on the
    caller's thread: the node calls them from one dedicated executor thread, so a database
    needs no locking of its own; writers in other processes (standalone workers, other front
    ends) queue on the backend's writers' lock, taken when a transaction begins."""

    _db: Connection
    # Whether new data keys commit in the transaction of the records sealed under them
    # (PostgreSQL: one database, committed atomically) instead of one of their own (SQLite).
    _keys_with_records = False
    # What the backend says in messages: "node.db" or the PostgreSQL database's name.
    _where: str = ""

    def __init__(self, crash_after: str = ""):
        self._erasing = False  # this transaction deleted personal data
        self._scrub_owed = False  # a committed erasure whose old pages may still be on disk
        # Users whose data keys this transaction asked to destroy, and those of committed
        # transactions whose keys are not destroyed yet (`_shred` failed: retried next time).
        self._shred_asked: set[str] = set()
        self._committing = False  # COMMIT was sent: a failure now may follow a commit
        self._shred_owed: set[str] = set()
        self._keys_added = False  # the next transaction commits records under new data keys
        # With `_keys_with_records`: (wrapping keys, data keys) the next transaction writes first.
        self._staged_keys: list[tuple[dict[str, bytes], list[tuple[str, str, bytes]], bool, int | None]] = []
        if crash_after not in ("", *CRASH_POINTS):
            raise ValueError(f"crash point {crash_after!r} is not one of {', '.join(CRASH_POINTS)}")
        self._crash_after = crash_after

    # ---- what a backend supplies ---------------------------------------------------------

    def _lock_writers(self) -> None:
        """Before BEGIN: queue behind writers in other processes (SQLite: an advisory file
        lock; PostgreSQL takes its lock inside the transaction, `_begin`)."""

    def _unlock_writers(self) -> None:
        """After COMMIT or ROLLBACK."""

    def _begin(self) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _begin_snapshot(self) -> None:
        """BEGIN of a read-only transaction whose reads all see one committed state."""
        raise NotImplementedError

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that see the store as one moment left it, without the writers' lock: other
        processes' commits meanwhile are not seen, and are not held up."""
        self._begin_snapshot()
        try:
            yield
        finally:
            self._db.execute("ROLLBACK")  # it wrote nothing

    def _rollback(self) -> None:
        self._db.execute("ROLLBACK")

    def in_transaction(self) -> bool:
        """False once the database rolled the whole transaction back by itself (disk full, an
        I/O error): no savepoint is left to roll back to."""
        raise NotImplementedError

    def failure(self, e: BaseException) -> BaseException | None:
        """The domain error `e` stands for (`_failure`), or None."""
        return self._failure(e)

    def _failure(self, e: BaseException) -> BaseException | None:
        """The domain error a failed transaction's exception stands for (`StorageFull`,
        `TransactionConflict`), or None to raise it as it is."""
        return None

    def _scrub(self) -> None:
        """After an erasure committed: clears what the backend keeps on disk of the pages as
        they were before it. Sets `_scrub_owed` to whether some of it is still to do."""
        self._scrub_owed = False

    def _schema_version(self) -> int:
        raise NotImplementedError

    def _set_schema_version(self, version: int) -> None:
        raise NotImplementedError

    def _migration_statements(self, migration: Migration) -> list[str]:
        return migration.statements()

    def now(self) -> float:
        """The clock leases and workers' presence are kept in (seconds since the epoch): the
        database server's where processes on several hosts share the store, whose clocks may
        disagree; SQLite's processes share one host."""
        return time.time()

    def notify(self, kind: str, detail: str = "") -> None:
        """Tells the other processes sharing this store that something they keep in memory
        changed (`rules`, `keys`, `erasure` with its users as `detail`), once the current
        transaction commits. SQLite: nobody to tell (one node per store; a standalone worker
        follows the rules file)."""

    def _last_outbox_sequence(self) -> int:
        """The highest outbox sequence ever given (0: none), trimmed rows included."""
        raise NotImplementedError

    # ---- migrations and the unit of work -------------------------------------------------

    def _migrate(self) -> None:
        """Each migration reads the schema version under the writers' lock: processes opening
        one new store at once (front ends, standalone workers) take turns, and each migration
        runs once."""
        while True:
            with self.transaction():
                current = self._schema_version()
                if current >= len(MIGRATIONS):
                    return
                for statement in self._migration_statements(MIGRATIONS[current]):
                    self._db.execute(statement)
                self._set_schema_version(current + 1)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._lock_writers()
        try:
            self._committing = False
            try:
                self._begin()
                self._began()
                yield
                self._committing = True
                self._commit()
                self._committing = False
            except BaseException as e:
                # A write failed, or COMMIT itself did (disk full, an I/O error, a conflict).
                # The database may have rolled the transaction back on its own already. What
                # it wrote is gone, and so must be every piece of state kept beside it (the
                # transfer log's sequence, chain head and tree leaves).
                if self.in_transaction():
                    self._rollback()
                if self._committing:
                    # COMMIT may have run before its answer was lost (a connection dropped):
                    # the keys of the users it erased are owed. The shred keeps every user
                    # with a live record, so if nothing was committed it destroys nothing.
                    self._shred_owed |= self._shred_asked
                    self._scrub_owed |= self._erasing
                self._erasing = self._keys_added = False
                self._shred_asked.clear()
                self._rolled_back()
                domain = self._failure(e)
                self._committing = False
                if domain is not None:
                    raise domain from e
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
            self._unlock_writers()
        self._committed()

    def savepoint(self) -> None:
        self._db.execute("SAVEPOINT op")
        self._savepoint_taken()

    def rollback_savepoint(self) -> None:
        self._db.execute("ROLLBACK TO SAVEPOINT op")
        self._db.execute("RELEASE SAVEPOINT op")
        self._savepoint_rolled_back()

    def release_savepoint(self) -> None:
        self._db.execute("RELEASE SAVEPOINT op")

    def _shred_after_commit(self, user_ids: list[str]) -> None:
        """Destroys the users' data keys once the current transaction has committed, in a
        transaction of its own (`_shred`), unless a live record of theirs is there then."""
        self._shred_asked.update(user_ids)

    def _shred(self) -> None:
        """The erasure's second step: the data keys of users whose records the committed
        transaction erased leave the keyring. A user with a live record again by now (written
        after the erasure, under a new key; a copy applied since) keeps it. If this fails
        (disk full), the keys stay owed: tried again after the next commit, and at the latest
        when the node starts (`drop_orphan_keys`)."""
        users = sorted(self._shred_owed)
        try:
            self._begin()
            self._db.executemany(
                "DELETE FROM keyring.data_keys WHERE user_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM records r WHERE r.user_id = ? AND r.deleted = 0)",
                [(u, u) for u in users],
            )
            self._commit()
        except Exception as e:
            if self.in_transaction():
                self._rollback()
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

    # A repository that keeps state in memory beside its tables (the transfer log's chain head
    # and Merkle tree) follows the unit of work through these; each override calls super().

    def _began(self) -> None:
        """After BEGIN, with the writers' lock held."""

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
        raise NotImplementedError
