"""Blind indexes on a node (issue 18), kept with the records or copies they index: each lookup
field's normalised value, keyed by the region's index key, in `lookup_index` (finding by them is
`residency.server.vault.finding`'s).

Every method runs on the store thread inside the caller's transaction, so an index row commits
with the record it indexes and goes with it (an erasure, a copy withdrawn)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, Protocol

from residency.server.core.lookup import forms
from residency.server.core.schema import Schema
from residency.server.keys.keyring import Keyring
from residency.server.storage.lookup import MARK
from residency.server.storage.records import Row
from residency.server.storage.roles import VaultStore
from residency.v1 import records_pb2, replica_pb2

Forms = tuple[tuple[str, str], ...]  # (lookup field, normalised form): `core.lookup.forms`


class Opens(Protocol):
    """What the index opens records with (`Records`): a home record whole, a copy's named fields."""

    primary: bool
    schema: Schema
    keyring: Keyring
    store: VaultStore

    def open_row(self, row: Row) -> Any: ...
    def open_copy(self, user_id: str, copy: replica_pb2.SealedCopy, names: Collection[str] | None) -> Any: ...
    def warm_keys(self, user_ids: list[str]) -> None: ...


class BlindIndex:
    """A node's blind indexes: HMAC-SHA256 of each lookup field's normalised value under the
    region's index key (`Keyring.index_keys`), in `lookup_index`."""

    def __init__(self, records: Opens):
        self.records = records
        self.fields = records.schema.lookup_fields

    # ---- keeping the index with the data ---------------------------------------------------

    def _set(self, changes: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> None:
        """Sets, per user, each lookup field given to its normalised form's keyed hash under
        every current key version (the active one, and during a rotation the one being built),
        or clears it (form ""). A user changed twice (one batch) keeps the last form. Rows
        that already say so stay as they are (most updates leave a user's e-mail and phone
        unchanged): one read of the users' rows instead of a delete and an insert each."""
        merged: dict[str, dict[str, str]] = {}
        for u, given in changes:
            merged.setdefault(u, {}).update((f, n) for f, n in given if f in self.fields)
        keys = self.records.keyring.index_keys.current()
        want = {
            (u, f): {(k.version, k.digest(f, n)) for k in keys} if n else set()
            for u, given in merged.items()
            for f, n in given.items()
        }
        if not want:
            return
        held = self.records.store.index_held(list(merged))
        changed = [pair for pair, rows in want.items() if held.get(pair, set()) != rows]
        if not changed:
            return
        self.records.store.index_clear([pair for pair in changed if pair in held])
        self.records.store.index_add(
            [(version, f, digest, u) for u, f in changed for version, digest in want[(u, f)]]
            + [(k.version, MARK, k.fingerprint(), MARK) for k in keys]
        )

    def written(
        self, writes: Iterable[tuple[str, bytes, tuple[str, ...], tuple[tuple[str, str], ...] | None]]
    ) -> None:
        """After a primary's writes (user, the serialized Record of the fields given, fields
        removed, the given lookup fields' forms if the check found them): each lookup field
        given or removed, in write order."""
        if not self.fields:
            return
        changes = []
        for user_id, body, remove, found in writes:
            if found is None:
                found = forms(self.fields, records_pb2.Record.FromString(body).fields) if body else ()
            # Removed last, as sealing does: a field both given and removed is gone.
            changes.append((user_id, [*found, *((f, "") for f in remove)]))
        self._set(changes)

    def copies_changed(self, user_ids: Iterable[str]) -> None:
        """After a region node applied, withdrew or swept copies: each user's index follows the
        copy it now holds (none: no rows)."""
        if not self.fields:
            return
        users = list(dict.fromkeys(user_ids))
        rows = self.records.store.rows(users)
        gone = [u for u in users if u not in rows or rows[u].deleted]
        self.records.store.index_drop_users(gone)
        self._set(
            (rec.user_id, self._held(rec)) for rec in self._open([rows[u] for u in users if u not in gone])
        )

    def erased(self, user_ids: list[str]) -> None:
        self.records.store.index_drop_users(user_ids)

    def _open(self, rows: list[Row]) -> list[Any]:
        """The rows' lookup fields opened (a copy's other fields stay sealed)."""
        records = self.records
        if records.primary:
            return [records.open_row(r) for r in rows]
        records.warm_keys([r.user_id for r in rows])  # one keyring query, not one a copy
        return [
            records.open_copy(r.user_id, replica_pb2.SealedCopy.FromString(r.blob), self.fields) for r in rows
        ]

    def _held(self, rec: Any) -> list[tuple[str, str]]:
        """Every lookup field's form in an opened record or copy ("" for one it lacks)."""
        given = dict(forms(self.fields, rec.fields))
        return [(f, given.get(f, "")) for f in self.fields]

    # ---- a rotation's rebuild --------------------------------------------------------------

    def rebuild_page(self, version: int, after_user: str, limit: int) -> tuple[str, int]:
        """Indexes one page of live records (copies) after `after_user` under key `version` (the
        one being built). Read and written in one step on the store thread, so no write can
        fall between: writes meanwhile index under both versions themselves. Returns (the
        page's last user, "" after the last page; users indexed)."""
        store = self.records.store
        page = store.live_blobs(after_user, limit)
        key = next(k for k in self.records.keyring.index_keys.current() if k.version == version)
        opened = self._open([Row(u, 0, False, blob, 0.0) for u, blob in page])
        rows = [
            (version, f, key.digest(f, n), rec.user_id) for rec in opened for f, n in self._held(rec) if n
        ]
        store.index_add([*rows, (version, MARK, key.fingerprint(), MARK)])
        return (page[-1][0] if len(page) == limit else ""), len(page)

    def unknown_rows(self) -> bool:
        """Whether rows are kept of a key `index.key` does not hold: a version it has not, or
        one whose fingerprint is not that of its key of the same number (the file lost and
        made anew, or restored older), or rows without a fingerprint. Such rows never match."""
        marks = self.records.store.index_marks()
        if not marks:
            return False
        keys = {k.version: k.fingerprint() for k in self.records.keyring.index_keys.current()}
        return any(v not in keys or fps != {keys[v]} for v, fps in marks.items())

    def switch(self) -> int:
        """Ends a rotation: the new version becomes the active one; the old one's rows go."""
        old = self.records.keyring.index_keys.finish_rotation()
        return self.records.store.index_drop_version(old)
