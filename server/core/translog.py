"""The transfer log's entries, their hash chain and query filters (pure; the store persists
them, `residency.server.core.merkle` trees them).

An entry is canonical JSON: UTF-8, keys sorted, no insignificant spaces; those are exactly
the bytes that are hashed and exported. chain[n] = SHA-256(chain[n-1] || entry bytes[n]),
with chain[-1] = 32 zero bytes, so a changed, dropped or reordered entry breaks every later
hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from residency.server.core.rules import Allowed, Withheld
from residency.server.core.schema import Schema

GENESIS = bytes(32)
KINDS = frozenset(
    {
        "replication",
        "remote_read",
        "local_read",  # a read at an affiliate region node by a caller located there
        "disclosure",
        "erasure",
        "consent",
        "rules_change",
        "key_event",
        "grant",
        "admin",  # an operator's act on replication (pause, resume, retry); an access policy reread
        # a call refused for its caller's role or stated purpose, per user it names; and, allowed,
        # a data subject's export (the data handed over, by field name)
        "access",
    }
)
OUTCOMES = frozenset({"allowed", "denied", "failed"})


def leaf_index(sequence: int) -> int:
    """Sequences start at 1 (the store's row ids); RFC 6962 leaf indexes start at 0."""
    return sequence - 1


_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


class Shared(list[Any]):
    """A list that many entries hold alike (a copy's field descriptions, the same for every
    record with the same fields under one plan): its canonical JSON is worked out once.
    Never changed once made."""

    __slots__ = ("json",)

    def __init__(self, items: Any = ()):
        super().__init__(items)
        self.json = _ENCODE(list(self))


def canonical(entry: dict[str, Any]) -> bytes:
    """The entry's canonical JSON: exactly `json.dumps(entry, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`, with `Shared` lists' text reused."""
    members = (
        f"{_ENCODE(k)}:{v.json if isinstance(v, Shared) else _ENCODE(v)}" for k, v in sorted(entry.items())
    )
    return ("{" + ",".join(members) + "}").encode()


def chain_hash(previous: bytes, entry_bytes: bytes) -> bytes:
    return hashlib.sha256(previous + entry_bytes).digest()


def verify_chain(entries: list[tuple[bytes, bytes]], previous: bytes = GENESIS) -> int | None:
    """Index of the first (entry bytes, chain hash) pair that does not follow, or None."""
    for i, (data, recorded) in enumerate(entries):
        previous = chain_hash(previous, data)
        if previous != recorded:
            return i
    return None


def append_time(previous: float, clock: float) -> float:
    """The time of an entry appended after one of time `previous`: the clock's, but never
    earlier (a clock stepped back must not make a later entry look older), so times never
    go backwards along the sequence."""
    return max(round(clock, 6), previous)


def entry(
    kind: str,
    *,
    subject: str,
    source_region: str,
    destination_region: str,
    outcome: str,
    actor: str,
    rules_version: str,
    recipient: str = "",
    purpose: str = "",
    fields: list[dict[str, Any]] | None = None,
    withheld: list[dict[str, Any]] | None = None,
    reason: str = "",
    version: int = 0,
    destination_country: str = "",
    disclosure: dict[str, Any] | None = None,
    forms: dict[str, str] | None = None,
    found_by: str = "",
    subjects: list[str] | None = None,
    export: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One transfer-log entry, without its sequence and time: the store stamps both when it
    appends the entry, inside the transaction that commits it (`append_time`).

    `fields` lists what crossed: name, category, and the rule, legal basis and purposes it
    crossed under. `withheld` lists what did not, with the reason. No field values, ever.
    `destination_country` (a disclosure's: its third party names no region) is the ISO 3166-1
    alpha-2 code of the country the data went to; entries of other kinds have no such key.
    `disclosure` (a disclosure step's) names the request, the step, the ground, its evidence and
    who asked and approved (`policy.disclosure.evidence_of`). `forms` names the fields of
    `fields` that crossed transformed, each with its form ("mask:4", "hash": `core.transform`);
    an entry where every field crossed as its value has no such key.
    `found_by` (a read answering `FindRecords`) names the lookup field searched, never its value.
    `subjects` (a find's one entry for the users it matched but withheld from its caller,
    `subject` empty) names those users; an entry about one user has no such key.
    `export` (a subject export's own `access` entry) commits to what the export holds
    (`core.report.subject.commitment`).
    """
    assert kind in KINDS and outcome in OUTCOMES, (kind, outcome)
    extra: dict[str, Any] = {"destination_country": destination_country} if destination_country else {}
    if disclosure is not None:
        extra["disclosure"] = disclosure
    if forms:
        extra["forms"] = dict(sorted(forms.items()))
    if found_by:
        extra["found_by"] = found_by
    if subjects:
        extra["subjects"] = sorted(subjects)
    if export is not None:
        extra["export"] = export
    return {
        "kind": kind,
        "subject": subject,
        "source_region": source_region,
        "destination_region": destination_region,
        "recipient": recipient,
        "purpose": purpose,
        "fields": fields or [],
        "withheld": withheld or [],
        "outcome": outcome,
        "reason": reason,
        "actor": actor,
        "rules_version": rules_version,
        "record_version": version,
        **extra,
    }


def admin(region: str, actor: str, rules_version: str, reason: str, destination: str = "") -> dict[str, Any]:
    """The entry of an administrative act on `region`'s node (about `destination`, if one)."""
    return entry(
        "admin",
        subject="",
        source_region=region,
        destination_region=destination,
        outcome="allowed",
        actor=actor,
        rules_version=rules_version,
        reason=reason,
    )


def key_event(
    region: str, actor: str, rules_version: str, reason: str, source_region: str = ""
) -> dict[str, Any]:
    """The entry of an event of `region`'s key (rotated, shredded, rekeyed, a new key learned
    by its primary...), logged by the node whose key it is or by `source_region` (its primary)."""
    return entry(
        "key_event",
        subject=f"region:{region}",
        source_region=source_region or region,
        destination_region=region,
        outcome="allowed",
        actor=actor,
        rules_version=rules_version,
        reason=reason,
    )


def about(e: dict[str, Any], subject: str) -> bool:
    """Whether entry `e` is about user `subject`: its `subject`, or one of its `subjects` (a
    find's entry for the users it withheld from its caller)."""
    return e.get("subject") == subject or subject in (e.get("subjects") or ())


@dataclass(frozen=True, slots=True)
class Filter:
    """What a reviewer asks the log for; an empty value matches everything. `region` matches
    either end of a transfer; `legal_basis` matches when any field crossed under it; times
    are seconds since the epoch, `since` inclusive and `until` exclusive."""

    subject: str = ""
    region: str = ""
    recipient: str = ""
    kind: str = ""
    purpose: str = ""
    legal_basis: str = ""
    outcome: str = ""
    since: float | None = None
    until: float | None = None
    # Only entries about `subject` alone (a subject export, handed to that person: an entry
    # whose `subjects` name others too would hand their ids over).
    sole: bool = False

    def matches(self, e: dict[str, Any]) -> bool:
        return (
            (not self.subject or (e.get("subject") == self.subject if self.sole else about(e, self.subject)))
            and (not self.region or self.region in (e.get("source_region"), e.get("destination_region")))
            and (not self.recipient or self.recipient in str(e.get("recipient", "")).split(","))
            and (not self.kind or e.get("kind") == self.kind)
            and (not self.purpose or e.get("purpose") == self.purpose)
            and (not self.outcome or e.get("outcome") == self.outcome)
            and (not self.legal_basis or any(f.get("legal_basis") == self.legal_basis for f in e["fields"]))
            and (self.since is None or e.get("time", 0) >= self.since)
            and (self.until is None or e.get("time", 0) < self.until)
        )


def described(schema: Schema, decisions: dict[str, Any], names: Any) -> list[dict[str, Any]]:
    """An entry's `fields`: each of `names` with its category, and the rule, legal basis and
    purposes it crossed under (none for the home region's own)."""
    out = []
    for n in sorted(names):
        d = decisions[n]
        item = {"name": n, "category": schema.fields[n].category}
        if isinstance(d, Allowed) and d.rule.id != "home":
            item |= {"rule": d.rule.id, "legal_basis": d.rule.legal_basis, "purposes": list(d.rule.purposes)}
        out.append(item)
    return out


def described_withheld(schema: Schema, withheld: dict[str, Withheld]) -> list[dict[str, Any]]:
    """An entry's `withheld`: each field kept back, its category and why."""
    return [
        {"name": n, "category": schema.fields[n].category, "reason": w.reason}
        for n, w in sorted(withheld.items())
    ]


def recipients_of(decisions: dict[str, Any], names: Any) -> str:
    """An entry's `recipient`: the recipients `names` went to, comma-separated."""
    found = {decisions[n].recipient.id for n in names if isinstance(decisions[n], Allowed)}
    return ",".join(sorted(found - {"home"}))
