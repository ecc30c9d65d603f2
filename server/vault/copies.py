"""A region node's copies: applying the sealed copies its home primary sends, idempotently
by version, with each copy's wrapped data key kept in the keyring rather than in the copy."""

from __future__ import annotations

import time
from dataclasses import dataclass

from residency.server.storage.records import Row
from residency.server.vault.records import Records


@dataclass(frozen=True, slots=True)
class IncomingCopy:
    """One user's copy as the home primary sent it (or its tombstone, `deleted`)."""

    user_id: str
    version: int
    deleted: bool
    # The home's key the copy's data key is wrapped to, and the wrapped data key: with HPKE
    # directly, or under a transit key (`transit_key_id`, itself wrapped with HPKE).
    key_id: str
    wrapped_data_key: bytes
    transit_key_id: str
    wrapped_transit_key: bytes
    # What the region stores: the serialized copy, without the key material above.
    stored: bytes


def apply_copies(records: Records, copies: list[IncomingCopy]) -> tuple[int, int]:
    """Applies sealed copies idempotently: a version not newer than the one held is
    skipped, so a replay never duplicates or goes back in time. Returns (applied, skipped)."""
    store = records.store
    held = store.rows(list({c.user_id for c in copies}))
    newest: dict[str, IncomingCopy] = {}
    skipped = 0
    for c in copies:
        have = newest.get(c.user_id) or held.get(c.user_id)
        if have is not None and have.version >= c.version:
            skipped += 1
            continue
        newest[c.user_id] = c
    now = time.time()
    keys, gone, transit = [], [], {}
    for c in newest.values():
        if c.deleted:
            gone.append(c.user_id)
            continue
        # The wrapped DEK goes to the keyring, not with the copy: erasing it later makes
        # any earlier copy of node.db unreadable for this user.
        if c.transit_key_id:
            wk_id = f"transit:{c.key_id}:{c.transit_key_id}"
            transit[wk_id] = c.wrapped_transit_key
        else:
            wk_id = f"hpke:{c.key_id}"
        keys.append((c.user_id, wk_id, c.wrapped_data_key))
    for wk_id, wrapped in transit.items():
        store.put_wrapping_key(wk_id, wrapped)
    store.put_data_keys(keys)
    store.delete_data_keys(gone)
    store.upsert([Row(c.user_id, c.version, c.deleted, c.stored, now) for c in newest.values()])
    for user_id in newest:
        records.keyring.data_keys.drop(user_id)
    return len(newest), skipped
