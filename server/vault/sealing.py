"""Merging a write into a user's stored record and sealing the result: pure work on bytes, so
a batch is sealed in one pass before anything reaches the store."""

from __future__ import annotations

from residency.server.core import codec
from residency.server.core.sealing import DataKey, record_aad
from residency.v1 import records_pb2, storage_pb2

StoredRecord = storage_pb2.StoredRecord

# One write as seal_writes takes it: (user_id, serialized Record holding only fields,
# fields to remove, touch, source).
_Item = tuple[str, bytes, tuple[str, ...], bool, str]
# A stored row: (version, deleted, sealed StoredRecord, updated_at).
_Prior = tuple[int, bool, bytes, float]


def next_version(old: int, floor: int) -> int:
    """A record's next version: one above its last, and above the store's restore floor, so
    that a store restored from a backup never issues again a version its lost self sent."""
    return max(old, floor) + 1


def seal_writes(
    region: str,
    now: float,
    items: list[_Item],
    priors: dict[str, _Prior],
    keys: dict[str, DataKey],
    new_key_ids: dict[str, str],
    floor: int = 0,
) -> tuple[list[int], list[tuple[str, int, bytes, float]]]:
    """Merges each write into its user's stored record and seals the result, in order; a
    user written twice in one batch gets two versions. A user without a live prior row
    starts a new record under `new_key_ids[user]`; `keys` holds every user's data key.
    Every version is above `floor` (the store's restore epoch: `RecordRows.version_floor`).
    Returns the version of each item and the final row of each user. Pure work on bytes:
    no store, no keyring."""
    stamp = codec.timestamp(now)
    rows: dict[str, tuple[str, int, bytes, float]] = {}
    versions = []
    for user_id, body, remove, touch, source in items:
        dek = keys[user_id]
        stored = StoredRecord(user_id=user_id, home_region=region, updated_at=stamp)
        done = rows.get(user_id)
        old_age: float | None
        if done is not None:
            version, deleted, blob, old_age = done[1], False, done[2], done[3]
        elif user_id in priors:
            version, deleted, blob, old_age = priors[user_id]
        else:
            version, deleted, blob, old_age = 0, True, b"", None
        if not deleted:
            prior = StoredRecord.FromString(blob)
            old_body = dek.open(prior.sealed_fields, record_aad(user_id, region, prior.version, prior.key_id))
            # Serialized messages concatenate as a merge: a map entry given again replaces
            # the stored one, the others are kept.
            merged = records_pb2.Record.FromString(old_body + body)
            for name in remove:
                merged.fields.pop(name, None)
            body = merged.SerializeToString()
            stored.created_at.CopyFrom(prior.created_at)
            if not touch:
                stored.updated_at.CopyFrom(prior.updated_at)
            stored.source = source or prior.source
            stored.key_id = prior.key_id
        else:
            stored.key_id = new_key_ids[user_id]
            stored.created_at.CopyFrom(stamp)
            stored.source = source or "registration"
        version = next_version(version, floor)
        stored.version = version
        stored.sealed_fields = dek.seal(body, record_aad(user_id, region, version, stored.key_id))
        # Retention counts from the last real write: a rewrite that only changes what may be
        # sent keeps the record's age.
        age = now if touch or old_age is None else old_age
        rows[user_id] = (user_id, version, stored.SerializeToString(), age)
        versions.append(version)
    return versions, list(rows.values())
