"""Building one sealed copy for a destination from the opened record, the user's permits, the
destination's keys and the moment. It decides which fields may go (the rules' plan, then
retention, through the home node's `Sender` view of the rules), seals them for the
destination's region, and writes the transfer-log entry that says so. No store and no
network: the loop fetches, this decides (a destination's data keys are drawn here, from
its `CopyKeys`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from residency.server.core import codec, translog
from residency.server.core.policy.erasure import ERASED
from residency.server.core.rules import Allowed, Permits, Plan, RuleSet, Withheld
from residency.server.core.schema import Schema
from residency.server.core.sealing import COPY_FORMAT, DataKey, field_aads
from residency.server.keys.cache import KeyCache
from residency.server.keys.region import RecipientKey, TransitKey
from residency.server.vault.copy_policy import policies_message
from residency.server.vault.records import Opened
from residency.v1 import replica_pb2


class Sender(Protocol):
    """What a copy takes from the home node (`residency.server.vault.records.Records` is
    one): its region, rules and schema, and how it projects fields."""

    region: str
    rules: RuleSet
    schema: Schema

    def project(
        self, plan: Plan, fields: dict[str, Any], updated_at: float, now: float | None = None
    ) -> tuple[dict[str, Any], dict[str, Withheld]]: ...


class CopyKeys:
    """A destination's sealing keys: its region's public key, the transit key for new DEKs
    (renewed when older than the cache's age: the one HPKE operation of those minutes), and
    each user's DEK while cached (one DEK per user, not per copy)."""

    def __init__(self, recipient: RecipientKey, cache: KeyCache):
        self.recipient = recipient
        self.region = recipient.region
        # user id -> (DEK, DEK wrapped by the transit key, transit key, the home key's mark)
        self.cache = cache
        self.transit: TransitKey | None = None

    def for_user(self, user_id: str, home_mark: bytes) -> tuple[DataKey, bytes, TransitKey]:
        """The user's copy DEK (with its wrapping). `home_mark` is the mark of the key the home
        record opened with (`Opened.key_mark`): a cached DEK made under another one belonged to
        a user erased since, whose tombstone a newer record superseded before it was sent, and
        is never used for the user written again (the region keeps a copy's key until the
        next replaces it; the erased user's old copies must not open under a live key)."""
        hit: tuple[DataKey, bytes, TransitKey, bytes] | None = self.cache.get(user_id)
        if hit is None or hit[3] != home_mark:
            tk = self.transit
            if tk is None or time.monotonic() - tk.born > self.cache.max_age:
                tk = self.transit = self.recipient.new_transit_key()  # the one HPKE operation
            hit = (*tk.new_data_key(user_id), tk, home_mark)
            self.cache.put(user_id, hit)
        return hit[0], hit[1], hit[2]

    def forget(self, user_id: str) -> None:
        self.cache.drop(user_id)


@dataclass(frozen=True, slots=True)
class Described:
    fields: list[dict[str, Any]]
    withheld: list[dict[str, Any]]
    recipients: str
    categories: dict[str, str]
    # The copy's `policies`, encoded (see `copy_policy.policies_message`).
    policies: bytes
    # The fields that go in a form instead of their value, each with its form.
    forms: dict[str, str]


def _entry(
    kind: str, home: Sender, destination: str, user_id: str, version: int, **rest: Any
) -> dict[str, Any]:
    """A copy's log entry; the store dates it when the replicator commits what was shipped."""
    return translog.entry(
        kind,
        subject=user_id,
        source_region=home.region,
        destination_region=destination,
        actor="replicator",
        rules_version=home.rules.version,
        version=version,
        outcome="allowed",
        **rest,
    )


def _tombstone(home: Sender, user_id: str, version: int, reason: str) -> replica_pb2.SealedCopy:
    """A copy that deletes the destination's copy of the user ("erasure", "withdrawn")."""
    return replica_pb2.SealedCopy(
        user_id=user_id,
        version=version,
        deleted=True,
        reason=reason,
        home_region=home.region,
        format=COPY_FORMAT,
    )


def erased_copy(
    home: Sender, keys: CopyKeys, user_id: str, version: int
) -> tuple[replica_pb2.SealedCopy, dict[str, Any]]:
    """The tombstone of an erased record, and its log entry. The user's DEK is forgotten."""
    keys.forget(user_id)
    tomb = _tombstone(home, user_id, version, "erasure")
    entry = _entry("erasure", home, keys.region, user_id, version, reason=ERASED)
    return tomb, entry


def build_copy(
    home: Sender, keys: CopyKeys, opened: Opened, permits: Permits, now: float
) -> tuple[replica_pb2.SealedCopy, dict[str, Any]]:
    """The copy of `opened` its destination may hold now, sealed for that region, and its log
    entry; a withdrawal (a tombstone) when no field may be there."""
    region, user_id, version = keys.region, opened.user_id, opened.version
    plan = home.rules.plan(region, None, permits)
    sent, withheld = home.project(plan, opened.fields, opened.updated_at, now)
    what = _described(home, plan, sent, withheld, permits)
    if not sent:
        # Nothing may be there: make sure nothing is (a copy sent under older rules goes).
        # The region destroys the copy's key: a copy allowed again comes under a new one.
        keys.forget(user_id)
        tomb = _tombstone(home, user_id, version, "withdrawn")
        # Logged as an erasure: what consent, grants, retention or rules allowed before goes.
        return tomb, _entry(
            "erasure",
            home,
            region,
            user_id,
            version,
            withheld=what.withheld,
            reason=f"withdrawn: no field of this record may be held in {region} now",
        )
    dek, wrapped, transit = keys.for_user(user_id, opened.key_mark)
    kid = keys.recipient.key_id
    aad = field_aads(user_id, region, version, kid, format=COPY_FORMAT)
    copy = replica_pb2.SealedCopy(
        user_id=user_id,
        version=version,
        key_id=kid,
        format=COPY_FORMAT,
        wrapped_data_key=wrapped,
        transit_key_id=transit.id,
        wrapped_transit_key=transit.wrapped,
        sealed_fields={n: dek.seal(v.SerializeToString(), aad(n)) for n, v in sent.items()},
        categories=what.categories,
        source=opened.source,
        home_region=home.region,
        created_at=codec.timestamp(opened.created_at),
        updated_at=codec.timestamp(opened.updated_at),
        rules_version=home.rules.version,
    )
    copy.MergeFromString(what.policies)  # each field's policy: the region enforces it
    return copy, _entry(
        "replication",
        home,
        region,
        user_id,
        version,
        recipient=what.recipients,
        fields=what.fields,
        withheld=what.withheld,
        forms=what.forms,
    )


def _described(
    home: Sender, plan: Plan, sent: dict[str, Any], withheld: dict[str, Withheld], permits: Permits
) -> Described:
    """What a copy holds and withholds, as the log and the copy state it: the same for
    every record with the same fields under one plan, so worked out once per such set
    (the lists are shared between entries and never changed)."""
    key = (frozenset(sent), frozenset(withheld.items()))
    memo: Described | None = plan.memo.get(key)
    if memo is None:
        ds = plan.decisions
        memo = Described(
            fields=translog.Shared(translog.described(home.schema, ds, sent)),
            withheld=translog.Shared(translog.described_withheld(home.schema, withheld)),
            recipients=",".join(sorted({d.recipient.id for n in sent if isinstance(d := ds[n], Allowed)})),
            categories={n: home.schema.fields[n].category for n in sent},
            policies=policies_message(ds, sent, {f"grant:{g.id}": g.ends_at for g in permits.active_grants}),
            forms=plan.forms(sent),
        )
        if len(plan.memo) >= 1000:  # field sets vary little; bound it anyway
            plan.memo.clear()
        plan.memo[key] = memo
    return memo
