"""A region node's copies: applying the sealed copies its home primary sends, idempotently
by version, with each copy's wrapped data key kept in the keyring rather than in the copy."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from residency.server.core import translog
from residency.server.storage.records import Row
from residency.server.vault.copy_policy import describe_applied
from residency.server.vault.records import Records
from residency.v1 import replica_pb2


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
    # What the region's own log says of it: where it came from, under which rules, each
    # field with the policy it came under (`copy_policy.describe_applied`), or why it is a
    # tombstone ("erasure", "withdrawn").
    home_region: str
    rules_version: str
    fields: list[dict[str, Any]]
    recipient: str
    reason: str


def incoming(c: replica_pb2.SealedCopy) -> IncomingCopy:
    """A copy as it arrived, split into what the keyring keeps (its key material) and what
    the store keeps (the rest: sealed fields and the policies they travel with)."""
    keys = (c.key_id, c.wrapped_data_key, c.transit_key_id, c.wrapped_transit_key)
    fields, recipient = describe_applied(c)
    if not c.deleted:
        for name in ("wrapped_data_key", "transit_key_id", "wrapped_transit_key"):
            c.ClearField(name)
    return IncomingCopy(
        c.user_id,
        c.version,
        c.deleted,
        *keys,
        stored=c.SerializeToString(),
        home_region=c.home_region,
        rules_version=c.rules_version,
        fields=fields,
        recipient=recipient,
        reason=c.reason,
    )


def apply_copies(records: Records, copies: list[IncomingCopy], actor: str) -> tuple[int, int]:
    """Applies sealed copies idempotently: a version not newer than the one held is
    skipped, so a replay never duplicates or goes back in time. Each copy applied is an entry
    in the region's own log naming `actor` (the sender's identity). Returns (applied, skipped)."""
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
    # A tombstone for a copy this region never held (nothing was there to withdraw) is no event.
    held_live = {u for u, r in held.items() if not r.deleted}
    store.log_append(
        [
            _applied(records.region, c, actor)
            for c in newest.values()
            if not c.deleted or c.user_id in held_live
        ]
    )
    for user_id in newest:
        records.keyring.data_keys.drop(user_id)
    return len(newest), skipped


def _applied(region: str, c: IncomingCopy, actor: str) -> dict[str, Any]:
    """A copy taken in (kind replication: its fields and their rules) or a tombstone applied
    (kind erasure: an erasure, or a withdrawal when no field may be held here any more)."""
    return translog.entry(
        "erasure" if c.deleted else "replication",
        subject=c.user_id,
        source_region=c.home_region,
        destination_region=region,
        outcome="allowed",
        actor=actor,
        rules_version=c.rules_version,
        recipient=c.recipient,
        fields=c.fields,
        version=c.version,
        reason=f"{c.reason or 'deleted'}: the copy is deleted in {region}" if c.deleted else "",
    )
