"""What a restore from a backup reads and writes in the restored store: each live user's
version, the users still queued for a destination, records whose data key the keyring lacks,
and the restore epochs (table `restores`)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

from residency.server.storage.database import Database


def epoch_of(node_db: Path) -> int:
    """The restore epoch of a stopped node's store as it is (0 if there is none, or it cannot
    be read): a restore from an older backup must go above it too."""
    if not node_db.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{node_db}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT coalesce(max(epoch), 0) FROM restores").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


class RestoreStore(Protocol):
    def record_versions(self) -> dict[str, tuple[int, bool]]: ...
    def keyless_users(self) -> list[str]: ...
    def backlog_users(self, destinations: list[str]) -> list[str]: ...
    def restore_epoch(self) -> int: ...
    def add_restore(self, above: int) -> int: ...
    def set_restore_summary(self, epoch: int, summary: dict[str, Any]) -> None: ...


class RestoreRows(Database):
    """The `restores` table, and the whole-store reads a restore makes once."""

    def record_versions(self) -> dict[str, tuple[int, bool]]:
        """Every user's (version, erased)."""
        rows = self._db.execute("SELECT user_id, version, deleted FROM records")
        return {u: (v, bool(d)) for u, v, d in rows}

    def keyless_users(self) -> list[str]:
        """Live records whose data key is not in the keyring: their user was erased after the
        backup was taken (the keyring kept is newer than the records)."""
        return [
            u
            for (u,) in self._db.execute(
                "SELECT user_id FROM records r WHERE deleted = 0 AND NOT EXISTS "
                "(SELECT 1 FROM keyring.data_keys k WHERE k.user_id = r.user_id) ORDER BY user_id"
            )
        ]

    def backlog_users(self, destinations: list[str]) -> list[str]:
        """Users with a change in the outbox that one of `destinations` has not applied."""
        if not destinations:
            return []
        marks = ",".join("?" * len(destinations))
        (applied, known) = self._db.execute(
            f"SELECT min(sequence), count(*) FROM cursors WHERE destination IN ({marks})", destinations
        ).fetchone()
        after = applied if known == len(destinations) else 0
        return [
            u
            for (u,) in self._db.execute(
                "SELECT DISTINCT user_id FROM outbox WHERE sequence > ? ORDER BY user_id", (after,)
            )
        ]

    def restore_epoch(self) -> int:
        return int(self._db.execute("SELECT coalesce(max(epoch), 0) FROM restores").fetchone()[0])

    def add_restore(self, above: int) -> int:
        """Raises the restore epoch above the store's and `above`; returns the new epoch."""
        epoch = max(self.restore_epoch(), above) + 1
        self._db.execute(
            "INSERT INTO restores (epoch, restored_at, summary) VALUES (?,?,'{}')", (epoch, time.time())
        )
        return epoch

    def set_restore_summary(self, epoch: int, summary: dict[str, Any]) -> None:
        self._db.execute(
            "UPDATE restores SET summary=? WHERE epoch=?", (json.dumps(summary, sort_keys=True), epoch)
        )
