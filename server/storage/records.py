"""The records table: each user's sealed record (primary) or copy (region node), by user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from residency.server.storage.database import Database

# A restore epoch's share of a version: versions issued after restore N are above N << 40.
VERSION_EPOCH_BITS = 40


@dataclass(slots=True)
class Row:
    """One user's record (primary) or copy (region node). `blob` is a sealed SealedCopy."""

    user_id: str
    version: int
    deleted: bool
    blob: bytes
    updated_at: float


class RecordStore(Protocol):
    """Records read and written by user, counted, paged, and found by age (retention)."""

    def rows(self, user_ids: list[str]) -> dict[str, Row]: ...
    def live_users(self, user_ids: list[str]) -> set[str]: ...
    def upsert(self, rows: list[Row]) -> None: ...
    def counts(self) -> tuple[int, int]: ...
    def max_version(self) -> int: ...
    def version_floor(self) -> int: ...
    def live_blobs(self, after_user: str, limit: int) -> list[tuple[str, bytes]]: ...
    def live_updated_between(self, after: float, upto: float, limit: int) -> list[str]: ...


class RecordRows(Database):
    """The `records` table."""

    def rows(self, user_ids: list[str]) -> dict[str, Row]:
        return {
            r[0]: Row(r[0], r[1], bool(r[2]), r[3], r[4])
            for r in self._where_in(
                "SELECT user_id, version, deleted, blob, updated_at FROM records WHERE user_id IN ({marks})",
                user_ids,
            )
        }

    def live_users(self, user_ids: list[str]) -> set[str]:
        """Those of `user_ids` with a live record (not erased), read without their blobs."""
        return {
            u
            for (u,) in self._where_in(
                "SELECT user_id FROM records WHERE deleted = 0 AND user_id IN ({marks})", user_ids
            )
        }

    def upsert(self, rows: list[Row]) -> None:
        self._db.executemany(
            "INSERT INTO records (user_id, version, deleted, blob, updated_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT (user_id) DO UPDATE SET version=excluded.version, deleted=excluded.deleted, "
            "blob=excluded.blob, updated_at=excluded.updated_at",
            [(r.user_id, r.version, int(r.deleted), r.blob, r.updated_at) for r in rows],
        )
        if any(r.deleted for r in rows):
            self._erased()

    def drop_copies(self) -> int:
        """Deletes every copy a region node holds, and their data keys (after a rekey, all of
        them were sealed to the shredded key: unreadable, and replaced by the primary)."""
        n = self._db.execute("DELETE FROM records").rowcount
        self._db.execute("DELETE FROM lookup_index")
        # Beside the records, not after them: node.db commits first (`Database.transaction`),
        # so a crash in between leaves keys without copies, which the node destroys at start.
        self._db.execute("DELETE FROM keyring.data_keys")
        self._db.execute("DELETE FROM keyring.wrapping_keys")
        self._erased()
        return n

    def counts(self) -> tuple[int, int]:
        """(live records, tombstones)."""
        live, dead = self._db.execute(
            "SELECT count(*) - coalesce(sum(deleted),0), coalesce(sum(deleted),0) FROM records"
        ).fetchone()
        return int(live), int(dead)

    def max_version(self) -> int:
        """The highest version of any record, erased ones included (0: none yet)."""
        return int(self._db.execute("SELECT coalesce(max(version), 0) FROM records").fetchone()[0])

    def version_floor(self) -> int:
        """The version every new one must be above: `epoch << 40` after the store's latest
        restore from a backup (0: never restored). 2**40 versions of one user per epoch."""
        (epoch,) = self._db.execute("SELECT coalesce(max(epoch), 0) FROM restores").fetchone()
        return int(epoch) << VERSION_EPOCH_BITS

    def live_blobs(self, after_user: str, limit: int) -> list[tuple[str, bytes]]:
        """A page of (user, sealed blob) of live records, in user order after `after_user`."""
        return list(
            self._db.execute(
                "SELECT user_id, blob FROM records WHERE deleted=0 AND user_id > ? ORDER BY user_id LIMIT ?",
                (after_user, limit),
            )
        )

    def live_updated_between(self, after: float, upto: float, limit: int) -> list[str]:
        """Live users last written in (after, upto], oldest first (retention sweeps)."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT user_id FROM records WHERE deleted=0 AND updated_at > ? AND updated_at <= ? "
                "ORDER BY updated_at LIMIT ?",
                (after, upto, limit),
            )
        ]
