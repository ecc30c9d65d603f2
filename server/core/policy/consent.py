"""Policy 2a ("will not ... share your information to any unrelated third part, except that we
get your approval in advance") and 2c (sharing with a partner for its marketing "need your
approval in advance"): consents per user, purpose and recipient.

A consent-gated rule sends a field only to a recipient the user consented to, for a purpose
the consent covers (`consented_rules`); sensitive data needs its own, separate consent (PIPL
Art. 29). A consent is recorded only with evidence of how it was given (a reviewer must be
able to ask for it); a withdrawal needs none, so that nothing stands in its way. A consent
may name a recipient the rules file does not declare only for `third_party_sharing`, where
it backs a disclosure under ground 3a (`shares_with`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from residency.server.core.errors import InvalidRecord
from residency.server.core.policy.cookies import is_cookie_consent
from residency.server.core.rules import RuleSet, covers
from residency.server.core.schema import USER_ID, data_uses

THIRD_PARTY_SHARING = "third_party_sharing"


@dataclass(frozen=True, slots=True)
class ConsentChange:
    """One consent to grant or withdraw, as a caller asks for it."""

    user_id: str
    purpose: str
    recipient: str
    sensitive: bool
    evidence: str


@dataclass(frozen=True, slots=True)
class StandingConsent:
    """A consent on record and not withdrawn."""

    user_id: str
    purpose: str
    recipient: str
    sensitive: bool


@dataclass(slots=True)
class Consented:
    """What one user's standing consents enable: the ids of the consent-gated rules they
    satisfy (for sensitive data, separately) and whether cookie consent stands (policy 5)."""

    rules: set[str] = field(default_factory=set)
    sensitive_rules: set[str] = field(default_factory=set)
    cookies: bool = False


def check_consents(changes: list[ConsentChange], recipients: Collection[str], withdraw: bool = False) -> None:
    """Refuses, naming every offending field at once, a batch that is empty or too large, or
    that holds a malformed user id, an unknown purpose, a recipient the rules do not declare
    (but for `third_party_sharing`), evidence too long or, for consents given (not
    `withdraw`), no evidence. `recipients`: the declared ids."""
    bad: list[tuple[str, str]] = []
    for i, c in enumerate(changes):
        at = f"consents[{i}]"
        if not USER_ID.fullmatch(c.user_id):
            bad.append((f"{at}.user_id", "must be 1-128 characters from [A-Za-z0-9._:@-]"))
        if c.purpose not in data_uses():
            bad.append((f"{at}.purpose", f"{c.purpose!r} is not a Fides data use"))
        known = c.recipient == "" or c.recipient in recipients
        if not known and not (covers(THIRD_PARTY_SHARING, c.purpose) and len(c.recipient) <= 200):
            bad.append((f"{at}.recipient", f"unknown recipient {c.recipient!r}; known: {sorted(recipients)}"))
        if len(c.evidence) > 2000:
            bad.append((f"{at}.evidence", "at most 2,000 characters"))
        elif not withdraw and not c.evidence.strip():
            bad.append((f"{at}.evidence", "say how the user gave this consent, e.g. 'signup form v3, box 2'"))
    if not 1 <= len(changes) <= 1000:
        bad.append(("consents", f"{len(changes)} consents; send 1 to 1,000"))
    if bad:
        raise InvalidRecord(bad)


def change_reason(change: ConsentChange, withdraw: bool) -> str:
    """The transfer-log reason of a consent change."""
    return (
        ("withdrawn" if withdraw else "granted")
        + (" (sensitive personal information)" if change.sensitive else "")
        + (" (cookies, policy 5)" if is_cookie_consent(change.purpose, change.recipient) else "")
    )


def consented_rules(
    rules: RuleSet, user_ids: Iterable[str], consents: Iterable[StandingConsent]
) -> dict[str, Consented]:
    """Each user's standing consents, as the rules engine takes them."""
    out = {u: Consented() for u in user_ids}
    for c in consents:
        got = out[c.user_id]
        if is_cookie_consent(c.purpose, c.recipient):
            got.cookies = True
        for rule in rules.consent_rules(c.purpose, c.recipient):
            (got.sensitive_rules if c.sensitive else got.rules).add(rule.id)
    return out


def shares_with(consents: Iterable[StandingConsent], third_party: str) -> bool:
    """Whether a standing consent lets the user's data be shared with `third_party`: one that
    names it, for a purpose under or above `third_party_sharing` (policy 3a)."""
    return any(
        covers(c.purpose, THIRD_PARTY_SHARING) or covers(THIRD_PARTY_SHARING, c.purpose)
        for c in consents
        if c.recipient == third_party
    )
