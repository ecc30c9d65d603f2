"""The `lookup_index` table (issue 18): blind-index rows (key version, field, HMAC, user).
Only keyed hashes are stored; computing them is `residency.server.keys.indexkey`'s work."""

from __future__ import annotations

from typing import Protocol

from residency.server.storage.database import Database

# (key version, field, HMAC, user id)
IndexRow = tuple[int, str, bytes, str]
# A key version's fingerprint row: field and user "" (no lookup field or user has that name),
# the HMAC the key's fingerprint. It comes and goes with the version's rows.
MARK = ""


class LookupStore(Protocol):
    """What keeping and searching blind indexes uses."""

    def index_clear(self, pairs: list[tuple[str, str]]) -> None: ...
    def index_held(self, user_ids: list[str]) -> dict[tuple[str, str], set[tuple[int, bytes]]]: ...
    def index_drop_users(self, user_ids: list[str]) -> None: ...
    def index_add(self, rows: list[IndexRow]) -> None: ...
    def index_find(
        self, version: int, field: str, digest: bytes, after_user: str, limit: int
    ) -> list[str]: ...
    def index_drop_version(self, version: int) -> int: ...
    def index_keep_versions(self, versions: list[int]) -> int: ...
    def index_marks(self) -> dict[int, set[bytes]]: ...
    def index_drop_all(self) -> None: ...


class LookupRows(Database):
    def index_clear(self, pairs: list[tuple[str, str]]) -> None:
        """Removes every row, of any key version, of each (user, field)."""
        self._db.executemany("DELETE FROM lookup_index WHERE user_id = ? AND field = ?", pairs)

    def index_held(self, user_ids: list[str]) -> dict[tuple[str, str], set[tuple[int, bytes]]]:
        """Per (user, field) of `user_ids`, the (key version, HMAC) of each row kept."""
        held: dict[tuple[str, str], set[tuple[int, bytes]]] = {}
        sql = "SELECT user_id, field, key_version, hmac FROM lookup_index WHERE user_id IN ({marks})"
        for u, f, version, digest in self._where_in(sql, user_ids):
            held.setdefault((u, f), set()).add((version, bytes(digest)))
        return held

    def index_drop_users(self, user_ids: list[str]) -> None:
        """Removes every row of `user_ids` (an erasure, a copy withdrawn): in the transaction
        that removes their record, so no index row outlives it."""
        if user_ids:
            self._db.executemany("DELETE FROM lookup_index WHERE user_id = ?", [(u,) for u in user_ids])
            self._erased()

    def index_add(self, rows: list[IndexRow]) -> None:
        self._db.executemany(
            "INSERT INTO lookup_index (key_version, field, hmac, user_id) VALUES (?,?,?,?) "
            "ON CONFLICT DO NOTHING",
            rows,
        )

    def index_find(self, version: int, field: str, digest: bytes, after_user: str, limit: int) -> list[str]:
        """Users whose `field` has the keyed hash `digest` under key `version`, in user order."""
        return [
            u
            for (u,) in self._db.execute(
                "SELECT user_id FROM lookup_index WHERE key_version = ? AND field = ? AND hmac = ? "
                "AND user_id > ? ORDER BY user_id LIMIT ?",
                (version, field, digest, after_user, limit),
            )
        ]

    def index_drop_version(self, version: int) -> int:
        """Drops the rows of an index key version (after a rotation completed)."""
        return int(self._db.execute("DELETE FROM lookup_index WHERE key_version = ?", (version,)).rowcount)

    def index_keep_versions(self, versions: list[int]) -> int:
        """Drops the rows of every key version but `versions` (what a crash between a rotation's
        switch and its clean-up left)."""
        marks = ",".join("?" * len(versions)) or "NULL"
        sql = f"DELETE FROM lookup_index WHERE key_version NOT IN ({marks})"
        return int(self._db.execute(sql, versions).rowcount)

    def index_marks(self) -> dict[int, set[bytes]]:
        """Each key version with rows: the fingerprints stored with them (empty: none, rows
        written before fingerprints were)."""
        out: dict[int, set[bytes]] = {}
        for (v,) in self._db.execute("SELECT DISTINCT key_version FROM lookup_index"):
            out[v] = set()
        for v, fp in self._db.execute(
            "SELECT key_version, hmac FROM lookup_index WHERE field = ? AND user_id = ?", (MARK, MARK)
        ):
            out[v].add(fp)
        return out

    def index_drop_all(self) -> None:
        """Every row of every version (a restore: the backup's rows may be of a key no longer kept)."""
        self._db.execute("DELETE FROM lookup_index")
