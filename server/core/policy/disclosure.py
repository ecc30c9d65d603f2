"""Policy 3a-3g ("our APP will disclose all or part of your personal information based on your
personal will or related legal provisions" in seven circumstances): disclosure grounds, and the
two-person rule every disclosure passes.

Every disclosure names the country its third party receives the data in (an ISO 3166-1
alpha-2 code: under PIPL, data handed to a party abroad is exported, and counts as such) and
one ground of `GROUNDS`, which fixes its legal basis, the evidence it needs (a court order's
reference, the provision cited, ...) and the categories it may reach: a complaint over
intellectual property (3e) or a transaction (3f) reaches only the other party's name and
contact. A ground without its evidence, or a 3a disclosure without the user's standing consent,
is refused (`refusal`); credentials never go.

A disclosure is a `Request` first: one identity asks, a second person (another identity, of
another name, holding the `approver` role) approves or denies, and only then does the requester
(and nobody else) receive the fields, once. A request not released within `REQUEST_LIFETIME`
expires (`state_at`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from residency.server.core import countries
from residency.server.core.errors import CallerDenied, FailedPrecondition, InvalidRecord, ResidencyError
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
    "judicial_or_administrative_request": Ground("judicial_or_administrative_request", ("reference",)),  # 3c
    "violation_of_law_or_agreement": Ground("violation_of_law_or_agreement", ("reference",)),  # 3d
    "ip_complaint": Ground("ip_complaint", ("reference",), ("user.name", "user.contact")),  # 3e
    "transaction_dispute": Ground("transaction_dispute", ("reference",), ("user.name", "user.contact")),  # 3f
    "other_legal_basis": Ground("legal_obligation", ("provision",)),  # 3g
}
# The evidence a request may carry (each ground requires some of it).
EVIDENCE = ("reference", "provision", "service")


# The longest third party's name or evidence reference a request may give.
MAX_TEXT = 500


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
    # What the log keeps for good, refused or not: a name and references, not documents.
    long = [(k, v) for k, v in [("third_party", d.third_party), *d.evidence.items()] if len(v) > MAX_TEXT]
    if long:
        raise InvalidRecord([(k, f"at most {MAX_TEXT} characters ({len(v)} given)") for k, v in long])
    if not countries.is_alpha_2(d.destination_country):
        raise InvalidRecord([("destination_country", _country_problem(d.destination_country))])
    unknown = [f for f in dict.fromkeys(d.fields) if f not in schema]
    if unknown:
        raise InvalidRecord([(f"fields[{f}]", "unknown field") for f in unknown[:100]])
    if len(set(d.fields)) < len(d.fields):
        raise InvalidRecord([("fields", "name each field once")])


def _country_problem(given: str) -> str:
    if not given.strip():
        return "name the country the third party receives the data in: an ISO 3166-1 alpha-2 code, e.g. SG"
    hint = countries.suggest(given)
    return f"{given[:60]!r} is not an ISO 3166-1 alpha-2 country code" + (
        f"; did you mean {hint}?" if hint else " (two upper-case letters, e.g. SG)"
    )


def refusal(d: Disclosure, consents_to_sharing: bool) -> str:
    """Why the whole disclosure is refused, or "" if its ground stands: evidence missing, or
    (3a) no standing consent to share with the third party. `consents_to_sharing`: whether the
    user has such a consent (`consent.shares_with`)."""
    needs = GROUNDS[d.ground].evidence
    missing = [k for k in needs if not d.evidence.get(k, "").strip()]
    if missing:
        return f"ground {d.ground} needs evidence: {', '.join(missing)}"
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


# ---- the two-person rule --------------------------------------------------------------------

# An approval is for a handover soon, not a standing licence: a request neither denied nor
# released within 7 days of being asked expires, approved or not.
REQUEST_LIFETIME = 7 * 86400.0
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
REQUESTED, APPROVED, DENIED, RELEASED, EXPIRED = "requested", "approved", "denied", "released", "expired"
STATES = (REQUESTED, APPROVED, DENIED, RELEASED, EXPIRED)


@dataclass(slots=True)
class Request:
    """A disclosure asked for, and where it stands: who asked (an identity URI) for which data
    use and when, and who approved or denied it and why."""

    id: str
    disclosure: Disclosure
    purpose: str
    requester: str
    requested_at: float
    expires_at: float
    state: str = REQUESTED
    decided_by: str = ""
    decided_at: float | None = None
    decision_reason: str = ""
    released_at: float | None = None


def check_id(request_id: str) -> None:
    """Refuses a request id that RequestDisclosure cannot have returned."""
    if not REQUEST_ID.fullmatch(request_id):
        raise InvalidRecord([("id", "not a disclosure request id (32 lower-case hexadecimal characters)")])


def state_at(r: Request, now: float) -> str:
    """The request's state at `now`: one neither denied nor released by its expiry has expired."""
    if r.state in (REQUESTED, APPROVED) and now >= r.expires_at:
        return EXPIRED
    return r.state


_NOT_PENDING = {
    APPROVED: "is already approved",
    DENIED: "was denied",
    RELEASED: "was already released",
    EXPIRED: "has expired (a request lasts 7 days); ask again with RequestDisclosure",
}


def decision_refusal(
    r: Request, approver: str, approver_name: str, requester_name: str, now: float
) -> ResidencyError | None:
    """Why `approver` (an identity URI, and the NAME its certificate names) may not approve
    or deny the request at `now`, or None: it is the requester, or holds a certificate of the
    requester's name, in any case (the same holder under another role), or the request is not
    waiting."""
    # Names are compared without case: LEGAL-WANG and legal-wang are one holder.
    if approver == r.requester or approver_name.casefold() == requester_name.casefold():
        return CallerDenied(
            f"disclosure request {r.id}: the approver must be someone other than the requester"
            " (two-person rule)",
            permission="disclosures.approve of another's request",
        )
    state = state_at(r, now)
    if state != REQUESTED:
        return FailedPrecondition(f"disclosure request {r.id} {_NOT_PENDING[state]}")
    return None


def release_refusal(r: Request, caller: str, now: float) -> ResidencyError | None:
    """Why `caller` (an identity URI) may not receive the request's fields at `now`, or None:
    only its requester may, once, after approval and before expiry."""
    if caller != r.requester:
        return CallerDenied(
            f"disclosure request {r.id} is released only to the identity that requested it",
            permission="disclosures.release of its own request",
        )
    state = state_at(r, now)
    if state == REQUESTED:
        return FailedPrecondition(
            f"disclosure request {r.id} awaits an approver's ApproveDisclosure; nothing is released before"
        )
    if state != APPROVED:
        return FailedPrecondition(f"disclosure request {r.id} {_NOT_PENDING[state]}")
    return None


def evidence_of(r: Request, step: str) -> dict[str, Any]:
    """What a step's transfer-log entry records of the request (its `disclosure` member): the
    request id, the step, the ground and its evidence, the fields asked for, the requester and
    (once decided) the approver. Field names only, never a value."""
    d = r.disclosure
    return {
        "request": r.id,
        "step": step,
        "ground": d.ground,
        **{k: v for k, v in sorted(d.evidence.items()) if v},
        "fields_asked": sorted(d.fields),
        "requester": r.requester,
        **({"approver": r.decided_by} if r.decided_by else {}),
    }
