"""The keyring rows (`keys.db`): each user's wrapped data key and the wrapping keys that wrap
them. Only wrapped keys are stored; unwrapping is `residency.server.keys`'s work.

A data key is added in a transaction of its own, committed before the records sealed under
it, and destroyed after the transaction that erases them (`residency.server.storage.database`
says why); `drop_orphan_keys` destroys, at start, what a crash between the two left.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

from residency.server.core.errors import TransactionConflict
from residency.server.storage.database import Database

# A NOTIFY payload must stay under 8,000 bytes: a notice about more users than fit (an
# erasure, keys replaced) names none, and every other process then forgets every data key it
# holds.
NOTICE_BYTES = 7000


def users_notice(user_ids: list[str]) -> str:
    """The detail of a notice about users (`erasure`, `data-keys`): the users, as a JSON list,
    or "" (everyone)."""
    detail = json.dumps(user_ids, ensure_ascii=False, separators=(",", ":"))
    return detail if len(detail.encode()) <= NOTICE_BYTES else ""


class WrappingKeysRenewed(TransactionConflict):
    """A rotation or retire (through any process of the store) renewed the wrapping keys since
    this process made the one its new data keys went under: nothing was written; the batch
    runs again under a wrapping key of the provider's newest version."""


class KeyStore(Protocol):
    """What writing, reading and erasing records use: users' data keys and their wrappers."""

    def data_keys(self, user_ids: list[str]) -> dict[str, tuple[str, bytes, bytes]]: ...
    def add_data_keys(
        self,
        wrapping_keys: dict[str, bytes],
        rows: list[tuple[str, str, bytes]],
        new_users_only: bool = ...,
        generation: int | None = ...,
    ) -> None: ...
    def delete_data_keys(self, user_ids: list[str]) -> None: ...
    def data_keys_replaced(self, user_ids: list[str], erasure: bool = ...) -> None: ...
    def key_generation(self) -> int: ...

    seen_key_generation: int | None


class KeyringRows(Database):
    """The `keyring.data_keys` and `keyring.wrapping_keys` tables."""

    def data_keys(self, user_ids: list[str]) -> dict[str, tuple[str, bytes, bytes]]:
        """user id -> (wrapping key id, wrapping key as the provider wrapped it, wrapped DEK).
        For a region node's copies the wrapping key id is `hpke:KEYID` and its blob empty."""
        return {
            u: (wk, w or b"", dek)
            for u, wk, w, dek in self._where_in(
                "SELECT d.user_id, d.wrapping_key, k.wrapped, d.wrapped "
                "FROM keyring.data_keys d LEFT JOIN keyring.wrapping_keys k ON k.id = d.wrapping_key "
                "WHERE d.user_id IN ({marks})",
                user_ids,
            )
        }

    def put_data_keys(self, rows: list[tuple[str, str, bytes]], new_users_only: bool = False) -> None:
        """Stores (user, wrapping key id, wrapped key) rows. `new_users_only`: a row leaves
        the key of a user with a live record as it is (another front end of a shared store
        may have committed that user's first record under its own new key meanwhile)."""
        only = (
            " WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.user_id = excluded.user_id AND r.deleted = 0)"
            if new_users_only
            else ""
        )
        self._db.executemany(
            "INSERT INTO keyring.data_keys (user_id, wrapping_key, wrapped) VALUES (?,?,?) "
            "ON CONFLICT (user_id) DO UPDATE SET wrapping_key=excluded.wrapping_key, "
            "wrapped=excluded.wrapped" + only,
            rows,
        )

    def add_data_keys(
        self,
        wrapping_keys: dict[str, bytes],
        rows: list[tuple[str, str, bytes]],
        new_users_only: bool = False,
        generation: int | None = None,
    ) -> None:
        """The first step of a write under new data keys: the keys (user, wrapping key id,
        wrapped key) and the wrapping keys they went under, committed in a transaction of
        their own, outside any other (one per batch, for all its new keys). A key replaces
        the user's stored one; with `new_users_only` (a primary's new users) only where the
        user has no live record when it is written. `generation`: the wrapping keys' (see
        `key_generation`); if it is no longer current, nothing is written and
        `WrappingKeysRenewed` is raised (by the transaction's start, when staged)."""
        if self._keys_with_records:  # written by the next transaction, first (`_began`)
            self._staged_keys.append((wrapping_keys, rows, new_users_only, generation))
        else:
            with self.transaction():
                self._put_keys(wrapping_keys, rows, new_users_only, generation)
        self._keys_added = True
        self._reached("keys")

    def _put_keys(
        self,
        wrapping_keys: dict[str, bytes],
        rows: list[tuple[str, str, bytes]],
        new_users_only: bool,
        generation: int | None,
    ) -> None:
        if generation is not None and generation != self.key_generation():
            raise WrappingKeysRenewed(
                f"wrapping keys of generation {generation} were renewed (now {self.seen_key_generation})"
            )
        for id, wrapped in wrapping_keys.items():
            self.put_wrapping_key(id, wrapped)
        self.put_data_keys(rows, new_users_only)

    def _began(self) -> None:
        super()._began()
        staged, self._staged_keys = self._staged_keys, []
        for wrapping_keys, rows, new_users_only, generation in staged:
            self._put_keys(wrapping_keys, rows, new_users_only, generation)

    def _rolled_back(self) -> None:
        # The batch's keys go with it, whether it began or not: a retry prepares them again
        # (`StoreThread`), and no later transaction may write them over keys committed since.
        super()._rolled_back()
        self._staged_keys = []
        # A renewal read inside it may not have committed: read the generation again.
        self.seen_key_generation = None

    def delete_data_keys(self, user_ids: list[str]) -> None:
        """Crypto-shredding: the users' data keys are destroyed right after the current
        transaction, which erases their records, has committed (`Database._shred`), before
        its callers are answered. The other processes of a shared store forget the keys they
        hold (`notify`): the user may come back under a new key, which theirs would not open."""
        self._shred_after_commit(user_ids)
        if user_ids:
            self.notify("erasure", users_notice(user_ids))

    def data_keys_replaced(self, user_ids: list[str], erasure: bool = False) -> None:
        """The users' data keys were replaced in the keyring (a region node's copies applied
        under keys the home sent): once the current transaction commits, the other processes
        of a shared store forget the keys they hold of them (`notify`), which would not open
        the new copies, as after an erasure. `erasure`: some of the copies replaced were an
        erased user's, and nothing of the pages as they were stays on disk (`_erased`)."""
        if user_ids:
            self.notify("data-keys", users_notice(user_ids))
        if erasure:
            self._erased()

    def drop_orphan_keys(self) -> int:
        """Destroys every data key whose user has no live record (on a region node: no live
        copy), which only a crash between the two steps of a write or an erasure leaves, and
        returns how many. Run when the node starts, before it serves: no write is under way.
        Both WALs are cleared after it, whatever it found: a crash between an erasure's
        commit and that clearing left the pages as they were before it in their frames."""
        with self.transaction():
            n = self._db.execute(
                "DELETE FROM keyring.data_keys WHERE NOT EXISTS (SELECT 1 FROM records r "
                "WHERE r.user_id = data_keys.user_id AND r.deleted = 0)"
            ).rowcount
            self._erased()
        return int(n)

    def put_wrapping_key(self, id: str, wrapped: bytes) -> None:
        self._db.execute(
            "INSERT INTO keyring.wrapping_keys (id, wrapped, created_at) VALUES (?,?,?) "
            "ON CONFLICT DO NOTHING",
            (id, wrapped, time.time()),
        )

    # ---- rotation (`residency keys rotate` / `rewrap` / `retire`) -------------------------

    # The generation `key_generation` last read (None: not read yet), which a process's new data
    # keys follow without reading it before every batch: a batch made under an outdated one
    # fails `WrappingKeysRenewed`, which reads the current one, and runs again.
    seen_key_generation: int | None = None

    def key_generation(self) -> int:
        """How many times the wrapping keys were renewed (a rotation or a retire, through any
        process of the store): a process's wrapping key belongs to the generation it was made
        in, and new data keys go only under one of the current generation."""
        row = self._db.execute("SELECT generation FROM key_generation WHERE id = 1").fetchone()
        self.seen_key_generation = int(row[0])
        return self.seen_key_generation

    def key_event_head(self, region: str) -> tuple[int, str] | None:
        """How many of `region`'s key events the store has logged with a digest of them
        (`lifecycle.events_digest`), and that digest; None before one was (a store from before
        schema version 18 until its first `apply`)."""
        sql = "SELECT logged, digest FROM key_event_heads WHERE region = ?"
        row = self._db.execute(sql, (region,)).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def set_key_event_head(self, region: str, logged: int, digest: str) -> None:
        self._db.execute(
            "INSERT INTO key_event_heads (region, logged, digest) VALUES (?,?,?) "
            "ON CONFLICT (region) DO UPDATE SET logged=excluded.logged, digest=excluded.digest",
            (region, logged, digest),
        )

    def renew_wrapping_keys(self) -> int:
        """A new generation (after the provider's new version, or before a retire), returned:
        from its commit on, a batch under a wrapping key made before it writes nothing and runs
        again (writers take turns, so none is half-way through meanwhile)."""
        self._db.execute("UPDATE key_generation SET generation = generation + 1 WHERE id = 1")
        return self.key_generation()

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
        return [
            (wk, w or b"", n)
            for wk, w, n in self._db.execute(
                "SELECT d.wrapping_key, max(k.wrapped), count(*) FROM keyring.data_keys d "
                "LEFT JOIN keyring.wrapping_keys k ON k.id = d.wrapping_key GROUP BY d.wrapping_key"
            )
        ]

    def data_keys_not_under(
        self, wrapping_key: str, after_user: str, limit: int
    ) -> list[tuple[str, str, bytes, bytes]]:
        """A page of data keys wrapped by anything but `wrapping_key` (rotation): by another
        wrapping key, or (region nodes) by HPKE to the region key, `hpke:KEYID`."""
        return [
            (u, wk, w or b"", dek)
            for u, wk, w, dek in self._db.execute(
                "SELECT d.user_id, d.wrapping_key, k.wrapped, d.wrapped "
                "FROM keyring.data_keys d LEFT JOIN keyring.wrapping_keys k ON k.id = d.wrapping_key "
                "WHERE d.wrapping_key != ? AND d.user_id > ? ORDER BY d.user_id LIMIT ?",
                (wrapping_key, after_user, limit),
            )
        ]

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
