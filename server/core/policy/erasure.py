"""Policy 6b (a user whose data leaked is helped with "proper measures") and 2a (no access
after the service ends): what erasure, retention and withdrawal take away.

The decisions here: a field sent under a rule with `retention_days` is withheld once the
record has not been written for longer than that (`expired_fields`); the periodic sweep
finds the records that crossed a period (`retention_cutoffs`) so their copies are projected
again and the field withdrawn; withdrawing the cookie consent erases the stored cookie
fields (`removed_on_withdrawal`). Carrying them out (crypto-shredding a record's data key, a
tombstone to every region, nothing left on disk) is the vault's and storage's work.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from residency.server.core.policy.cookies import is_cookie_consent
from residency.server.core.rules import Allowed, Decision, Rule

DAY = 86400
# The reason of the log entry of an erased record's tombstone sent to a destination: how a
# restore finds, in the log, erasures its backup predates.
ERASED = "the user's record was erased"
# The reason of the home region's own `erasure` entry, written with the erasure itself.
ERASED_HERE = "the user's record was erased at home: tombstone written, data key destroyed"


def expired_fields(
    decisions: Mapping[str, Decision], sent: Iterable[str], updated_at: float, now: float
) -> list[str]:
    """The fields of `sent` whose rule's retention period has passed since `updated_at`."""
    age_days = (now - updated_at) / DAY
    out = []
    for name in sent:
        d = decisions[name]
        days = d.rule.retention_days if isinstance(d, Allowed) else None
        if days is not None and age_days > days:
            out.append(name)
    return out


def retention_cutoffs(rules: Iterable[Rule], now: float) -> list[tuple[int, float]]:
    """(period in days, cutoff time) for each distinct retention period, shortest first: a
    record last written before the cutoff has outlived that period."""
    return [
        (days, now - days * DAY) for days in sorted({r.retention_days for r in rules if r.retention_days})
    ]


def removed_on_withdrawal(purpose: str, recipient: str, cookie_fields: Collection[str]) -> tuple[str, ...]:
    """The stored fields a withdrawn consent erases: the cookie fields for the cookie consent
    (policy 5: refusal stops collection); none otherwise, as re-projection withdraws copies."""
    return tuple(sorted(cookie_fields)) if is_cookie_consent(purpose, recipient) else ()
