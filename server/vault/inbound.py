"""A copy as a region node takes it in (`IncomingCopy`, sent by a `Sender`) and the entries
the region's transfer log keeps of copies applied, refused, or erased in passing."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from residency.server.core import translog
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
    # The fields that came in a form instead of their value, each with its form.
    forms: dict[str, str]
    # When the home first wrote the user (seconds, nanos): another than the held copy's is a
    # user erased and written again there since.
    born: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent a batch (its certificate's identity) and from where, for the log's entries,
    and the lease epoch it was shipped under, as the home's signed high-water mark states it
    (None when the mark is missing or not the home's: the batch is refused anyway)."""

    actor: str
    home_region: str
    lease_epoch: int | None = None


def log_refused(
    records: Records, copies: list[IncomingCopy], sender: Sender, refused: list[tuple[str, str]]
) -> None:
    """One denied entry per refused copy (one for the batch when its high-water mark is)."""
    reasons: dict[int, list[str]] = {}
    for path, why in refused:
        i = int(path[len("copies[") : path.index("]")]) if path.startswith("copies[") else -1
        reasons.setdefault(i, []).append(f"{path} {why}")
    records.store.log_append(
        [
            translog.entry(
                "replication",
                subject=copies[i].user_id if i >= 0 else "",
                source_region=sender.home_region,
                destination_region=records.region,
                outcome="denied",
                actor=sender.actor,
                rules_version=records.rules.version,
                version=copies[i].version if i >= 0 else 0,
                reason="copy refused: " + "; ".join(why),
            )
            for i, why in sorted(reasons.items())
        ]
    )


def applied(region: str, c: IncomingCopy, actor: str) -> dict[str, Any]:
    """A copy taken in (kind replication: its fields and their rules) or a tombstone applied
    (kind erasure: an erasure, or a withdrawal when no field may be held here any more)."""
    why = f"{c.reason or 'deleted'}: the copy is deleted in {region}" if c.deleted else ""
    kind = "erasure" if c.deleted else "replication"
    described = {"recipient": c.recipient, "fields": c.fields, "forms": c.forms}
    return _entry(kind, region, c, actor, c.version, why, **described)


def _entry(
    kind: str, region: str, c: IncomingCopy, actor: str, version: int, reason: str, **rest: Any
) -> dict[str, Any]:
    """An allowed entry of `kind` about `c`'s user."""
    return translog.entry(
        kind,
        subject=c.user_id,
        source_region=c.home_region,
        destination_region=region,
        outcome="allowed",
        actor=actor,
        rules_version=c.rules_version,
        version=version,
        reason=reason,
        **rest,
    )


def born(stored: bytes) -> tuple[int, int] | None:
    """When the home first wrote the user of a stored copy (`IncomingCopy.born`); None for a
    copy that does not decode."""
    try:
        t = replica_pb2.SealedCopy.FromString(stored).created_at
    except DecodeError:
        return None
    return t.seconds, t.nanos


def reborn(
    region: str, c: IncomingCopy, actor: str, held_version: int, held_born: tuple[int, int] | None
) -> dict[str, Any]:
    """The erasure of the copy held (`held_version`, first written at home at `held_born`),
    which `c` replaces: the home's record of the user was created anew since (an erasure
    there, then a write; a restore of an earlier backup), and the tombstone in between, if
    any, was superseded before it was sent, so the region erases the held copy as that
    tombstone would have. The erasure's own version is not known here: the entry has none
    (0), and its reason names the version of the copy it erased."""
    then = "an unreadable time" if held_born is None else _when(held_born)
    why = (
        f"erasure: the copy is deleted in {region} (version {held_version}, created {then}); the "
        f"home's record of the user was created anew since ({_when(c.born)}), and the next copy "
        "replaces it under a new key"
    )
    return _entry("erasure", region, c, actor, 0, why)


def _when(born: tuple[int, int]) -> str:
    return datetime.datetime.fromtimestamp(born[0] + born[1] / 1e9, datetime.UTC).isoformat(
        timespec="microseconds"
    )
