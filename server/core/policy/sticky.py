"""Policy 2a, 2b at an affiliate region: the policy travels with the copy. Each field of a copy
carries the rule (or grant) it was sent under, and the region decides from that alone, as the
primary would, who may read it for what and until when; no store, no clock, no network here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from residency.server.core import codec
from residency.server.core.policy.erasure import DAY
from residency.server.core.rules import (
    GRANT_ENDED,
    NO_RULE,
    POLICY_MISSING,
    RETENTION_EXPIRED,
    Withheld,
    covers,
)
from residency.server.core.transform import conforms

Value = codec.Value

# A reader for `readable`: each field for whoever its policy names (`rules explain` at a region).
ANY_READER = "*"


@dataclass(frozen=True, slots=True)
class FieldPolicy:
    """The policy one field of a copy was sent under."""

    rule: str
    purposes: tuple[str, ...]
    legal_basis: str
    recipient: str
    # Sent under a third party's grant: only that recipient may read it.
    grant: bool = False
    # When the field must be gone (seconds since the epoch); None: no retention limit.
    expires_at: float | None = None
    # The form it was sent in instead of its value ("mask:4", ...: `core.transform`); "": the value.
    form: str = ""

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def deadline(updated_at: float, retention_days: int | None, ends_at: float | None) -> float | None:
    """When a field must be gone: its rule's retention counted from the record's last write
    (as the primary counts it), or its grant's end, whichever is earlier; None: never."""
    retention = None if not retention_days else updated_at + retention_days * DAY
    found = [t for t in (retention, ends_at) if t is not None]
    return min(found) if found else None


def readable(
    policies: Mapping[str, FieldPolicy | None], purpose: str | None, recipient: str | None, now: float
) -> tuple[dict[str, FieldPolicy], dict[str, Withheld]]:
    """Splits a copy's fields into those its policies let this reader have now and those
    withheld, with the primary's reasons. `purpose` None: for any of the field's purposes.
    `recipient`: None for a caller that is not a third party (fields sent under rules only),
    a recipient id for that recipient (its own grants only, as at the primary), or
    `ANY_READER`. A field without a policy (a copy sent before policies travelled) is read
    for nothing until the primary sends it again."""
    allowed: dict[str, FieldPolicy] = {}
    withheld: dict[str, Withheld] = {}
    for name, p in policies.items():
        if p is None:
            withheld[name] = Withheld(POLICY_MISSING)
        elif not _reaches(p, purpose, recipient):
            withheld[name] = Withheld(NO_RULE)
        elif p.expired(now):
            withheld[name] = Withheld(GRANT_ENDED if p.grant else RETENTION_EXPIRED)
        else:
            allowed[name] = p
    return allowed, withheld


def _reaches(p: FieldPolicy, purpose: str | None, recipient: str | None) -> bool:
    """Whether the reader is one the field was sent for: a grant's field its recipient only,
    a rule's field any local caller but a third party; for a purpose the rule covers."""
    if recipient != ANY_READER and (recipient != p.recipient if p.grant else recipient is not None):
        return False
    return purpose is None or any(covers(allowed, purpose) for allowed in p.purposes)


def out_of_form(allowed: Mapping[str, FieldPolicy], values: Mapping[str, Value]) -> list[str]:
    """The opened fields whose value is not in the form their policy names: never served (a
    home's bug, or a forger holding the signing key, cannot make a region show a value whole)."""
    return sorted(
        n for n, p in allowed.items() if p.form and not conforms(p.form, codec.from_value(values[n]))
    )


def lapsed(policies: Mapping[str, FieldPolicy | None], now: float) -> list[str]:
    """The fields whose policy's deadline has passed: the region's retention sweep deletes them."""
    return sorted(n for n, p in policies.items() if p is not None and p.expired(now))
