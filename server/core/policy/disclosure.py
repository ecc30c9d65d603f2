"""Policy 3a-3g ("our APP will disclose all or part of your personal information based on your
personal will or related legal provisions" in seven circumstances): disclosure grounds.

Every disclosure names the country its third party receives the data in (an ISO 3166-1
alpha-2 code: under PIPL, data handed to a party abroad is exported, and counts as such) and
one ground of `GROUNDS`, which fixes its legal basis, the evidence it needs (a court order's
reference, a second person's approval, ...) and the categories it may reach: a complaint over
intellectual property (3e) or a transaction (3f) reaches only the other party's name and
contact. A ground without its evidence, a self-approved request, or a
3a disclosure without the user's standing consent is refused (`refusal`); credentials never go.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from residency.server.core import countries
from residency.server.core.errors import FailedPrecondition, InvalidRecord
from residency.server.core.policy.consent import THIRD_PARTY_SHARING
from residency.server.core.rules import CREDENTIAL, NOT_FOR_GROUND, Withheld, covers
from residency.server.core.schema import FieldSpec


@dataclass(frozen=True, slots=True)
class Ground:
    """A ground's legal basis, the evidence it needs and the categories it may reach (None:
    any field but credentials)."""

    legal_basis: str
    evidence: tuple[str, ...]
    reach: tuple[str, ...] | None = None


GROUNDS: dict[str, Ground] = {
    "consent": Ground("consent", ()),  # 3a
    "requested_service": Ground("contract", ("service",)),  # 3b
    "judicial_or_administrative_request": Ground(  # 3c
        "judicial_or_administrative_request", ("reference", "approver")
    ),
    "violation_of_law_or_agreement": Ground("violation_of_law_or_agreement", ("reference", "approver")),  # 3d
    "ip_complaint": Ground("ip_complaint", ("reference",), ("user.name", "user.contact")),  # 3e
    "transaction_dispute": Ground("transaction_dispute", ("reference",), ("user.name", "user.contact")),  # 3f
    "other_legal_basis": Ground("legal_obligation", ("provision", "approver")),  # 3g
}


@dataclass(slots=True)
class Disclosure:
    """A request to hand a user's fields to a third party in a country (an ISO 3166-1 alpha-2
    code); no `fields` means every field."""

    user_id: str
    third_party: str
    destination_country: str
    ground: str
    fields: list[str]
    evidence: dict[str, str] = field(default_factory=dict)


def check_request(d: Disclosure, schema: Mapping[str, FieldSpec]) -> None:
    """Refuses a request that names no known ground, no third party, no known country or an
    unknown field."""
    if d.ground not in GROUNDS:
        raise InvalidRecord([("ground", f"must be one of {sorted(GROUNDS)}")])
    if not d.third_party.strip():
        raise InvalidRecord([("third_party", "name who receives the data")])
    if not countries.is_alpha_2(d.destination_country):
        raise InvalidRecord([("destination_country", _country_problem(d.destination_country))])
    unknown = [f for f in d.fields if f not in schema]
    if unknown:
        raise InvalidRecord([(f"fields[{f}]", "unknown field") for f in unknown])


def _country_problem(given: str) -> str:
    if not given.strip():
        return "name the country the third party receives the data in: an ISO 3166-1 alpha-2 code, e.g. SG"
    hint = countries.suggest(given)
    return f"{given[:60]!r} is not an ISO 3166-1 alpha-2 country code" + (
        f"; did you mean {hint}?" if hint else " (two upper-case letters, e.g. SG)"
    )


def refusal(d: Disclosure, caller: str, consents_to_sharing: bool) -> str:
    """Why the whole disclosure is refused, or "" if its ground stands: evidence missing, the
    caller approving its own request, or (3a) no standing consent to share with the third
    party. `consents_to_sharing`: whether the user has such a consent (`consent.shares_with`)."""
    needs = GROUNDS[d.ground].evidence
    missing = [k for k in needs if not d.evidence.get(k, "").strip()]
    if missing:
        return f"ground {d.ground} needs evidence: {', '.join(missing)}"
    if "approver" in needs and d.evidence["approver"] == caller:
        return "the approver must be someone other than the caller"
    if d.ground == "consent" and not consents_to_sharing:
        return f"the user has no standing consent to share with {d.third_party} ({THIRD_PARTY_SHARING})"
    return ""


def reaches(ground: str, spec: FieldSpec) -> bool:
    """Whether `ground` may hand over a field: never a credential; within its reach, if any."""
    reach = GROUNDS[ground].reach
    return not spec.credential and (reach is None or any(covers(c, spec.category) for c in reach))


def select(
    d: Disclosure, values: Mapping[str, Any], schema: Mapping[str, FieldSpec], refused: str
) -> tuple[dict[str, Any], dict[str, Withheld]]:
    """Splits the asked fields the record holds into those handed over and those withheld
    (with why); a refused disclosure hands over nothing."""
    sent: dict[str, Any] = {}
    withheld: dict[str, Withheld] = {}
    for name in d.fields or sorted(values):
        if name not in values:
            continue
        spec = schema[name]
        if spec.credential:
            withheld[name] = Withheld(CREDENTIAL)
        elif not reaches(d.ground, spec) or refused:
            withheld[name] = Withheld(NOT_FOR_GROUND)
        else:
            sent[name] = values[name]
    return sent, withheld


def log_reason(d: Disclosure, refused: str) -> str:
    """The transfer-log reason: the refusal, or the ground and its evidence."""
    if refused:
        return refused
    evidence = "; ".join(f"{k} {v}" for k, v in sorted(d.evidence.items()) if v)
    return f"policy 3, ground {d.ground}" + (f"; {evidence}" if evidence else "")


def refusal_error(refused: str, seq: int) -> FailedPrecondition:
    """The error a refused disclosure raises, naming the transfer-log entry that records it."""
    return FailedPrecondition(f"{refused} (transfer-log entry {seq})")
