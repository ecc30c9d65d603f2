"""The policies a copy travels with, as stored (`SealedCopy.policies`) and as the core decides
over them (`FieldPolicy`); and how the transfer log describes a copy's fields by them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from residency.server.core import codec, translog
from residency.server.core.policy.sticky import FieldPolicy, deadline
from residency.server.core.rules import Allowed, Decision
from residency.v1 import replica_pb2


def policies_message(decisions: Mapping[str, Decision], names: Any, ends: Mapping[str, float]) -> bytes:
    """The `policies` of a copy holding `names` under `decisions` (each one `Allowed`), as
    encoded bytes to merge into the copy: the same for every copy of that field set under
    one plan, so the replicator encodes it once. `ends`: each grant rule's end."""
    copy = replica_pb2.SealedCopy()
    for name in names:
        d = decisions[name]
        if not isinstance(d, Allowed):
            continue
        rule, m = d.rule, copy.policies[name]
        m.rule, m.legal_basis, m.recipient = rule.id, rule.legal_basis, rule.recipient
        m.purposes.extend(rule.purposes)
        m.retention_days = rule.retention_days or 0
        m.form = rule.form(name)
        if rule.id in ends:
            m.grant = True
            m.ends_at.CopyFrom(codec.timestamp(ends[rule.id]))
    return copy.SerializeToString(deterministic=True)


def policies_of(copy: replica_pb2.SealedCopy) -> dict[str, FieldPolicy | None]:
    """Each sealed field's policy; None for a field sent without one (a copy older than
    travelling policies)."""
    out: dict[str, FieldPolicy | None] = {}
    for name in copy.sealed_fields:
        if name not in copy.policies:  # indexing a missing key would add it
            out[name] = None
            continue
        m = copy.policies[name]
        ends_at = codec.seconds(m.ends_at) if m.HasField("ends_at") else None
        expires_at = deadline(codec.seconds(copy.updated_at), m.retention_days, ends_at)
        out[name] = FieldPolicy(
            m.rule, tuple(m.purposes), m.legal_basis, m.recipient, m.grant, expires_at, m.form
        )
    return out


def describe(
    names: Any, policies: Mapping[str, FieldPolicy | None], categories: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Fields as log entries name them: category, and the rule, legal basis and purposes they
    were sent under (as the primary's entries do)."""
    out = []
    for n in sorted(names):
        item: dict[str, Any] = {"name": n, "category": categories.get(n, "")}
        p = policies.get(n)
        if p is not None:
            item |= {"rule": p.rule, "legal_basis": p.legal_basis, "purposes": list(p.purposes)}
        out.append(item)
    return out


_described: dict[tuple[Any, ...], tuple[translog.Shared, str, dict[str, str]]] = {}


def forms_of(policies: Mapping[str, FieldPolicy | None], names: Any) -> dict[str, str]:
    """The form each of `names` travelled in, for those sent transformed (the log's `forms`)."""
    return {n: p.form for n in names if (p := policies.get(n)) is not None and p.form}


def describe_applied(copy: replica_pb2.SealedCopy) -> tuple[translog.Shared, str, dict[str, str]]:
    """`describe` of every field of an arriving copy, the recipients its fields were sent
    for, and the forms of those sent transformed, for its log entry. Applying is the
    replication hot path and copies repeat a few field sets, so each set's description (and
    its canonical JSON) is made once."""
    policy = copy.policies.get  # indexing a missing key would add it
    key = tuple(sorted((n, copy.categories.get(n, ""), *_policy_key(policy(n))) for n in copy.sealed_fields))
    found = _described.get(key)
    if found is None:
        policies = policies_of(copy)
        found = (
            translog.Shared(describe(copy.sealed_fields, policies, copy.categories)),
            ",".join(sorted({p.recipient for p in policies.values() if p is not None})),
            forms_of(policies, copy.sealed_fields),
        )
        if len(_described) >= 1000:  # field sets vary little; bound it anyway
            _described.clear()
        _described[key] = found
    return found


def _policy_key(m: replica_pb2.FieldPolicy | None) -> tuple[Any, ...]:
    """What of a field's policy its log description shows."""
    return () if m is None else (m.rule, m.legal_basis, m.recipient, m.form, *m.purposes)
