"""The keyring rows (`keys.db`): each user's wrapped data key and the wrapping keys that wrap
them. Only wrapped keys are stored; unwrapping is `residency.server.keys`'s work."""

from __future__ import annotations

import time
from typing import Protocol

from residency.server.storage.database import Database


class KeyStore(Protocol):
    """What writing, reading and erasing records use: users' data keys and their wrappers."""

    def data_keys(self, user_ids: list[str]) -> dict[str, tuple[str, bytes, bytes]]: ...
    def put_data_keys(self, rows: list[tuple[str, str, bytes]]) -> None: ...
    def delete_data_keys(self, user_ids: list[str]) -> None: ...
    def put_wrapping_key(self, id: str, wrapped: bytes) -> None: ...


class KeyringRows(Database):
    """The `keyring.data_keys` and `keyring.wrapping_keys` tables."""

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
        self._erased()

    def put_wrapping_key(self, id: str, wrapped: bytes) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO keyring.wrapping_keys (id, wrapped, created_at) VALUES (?,?,?)",
            (id, wrapped, time.time()),
        )

    # ---- rotation (`residency keys rotate` / `rewrap` / `retire`) -------------------------

    def swap_data_keys(self, rows: list[tuple[str, bytes, str, bytes]]) -> int:
        """Compare-and-swap: each (user, wrapped data key as read, new wrapping key, the data key
        wrapped under it) is written only where the user's row still holds the key that was
        read, so a user erased, or erased and registered again, since keeps what it has now.
        Returns how many rows were swapped."""
        return sum(
            self._db.execute(
                "UPDATE keyring.data_keys SET wrapping_key=?, wrapped=? WHERE user_id=? AND wrapped=?",
                (wk, new, user, old),
            ).rowcount
            for user, old, wk, new in rows
        )

    def data_keys_per_wrapping_key(self) -> list[tuple[str, bytes, int]]:
        """(wrapping key id, the wrapping key as the provider wrapped it, how many data keys it
        wraps) for each wrapping key in use (retire looks for any under an old version)."""
        return list(
            self._db.execute(
                "SELECT d.wrapping_key, coalesce(k.wrapped, x''), count(*) FROM keyring.data_keys d "
                "LEFT JOIN keyring.wrapping_keys k ON k.id = d.wrapping_key GROUP BY d.wrapping_key"
            )
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
        (n,) = self._db.execute(
            "SELECT count(*) FROM keyring.data_keys WHERE wrapping_key != ?", (wrapping_key,)
        ).fetchone()
        return int(n)

    def delete_unused_wrapping_keys(self) -> int:
        return self._db.execute(
            "DELETE FROM keyring.wrapping_keys "
            "WHERE id NOT IN (SELECT DISTINCT wrapping_key FROM keyring.data_keys)"
        ).rowcount
