"""Policy 2a (a third party that serves the user together with us: "after the service, the
third part will be prohibited to visit all the information including those could be visited
just previously"): time-bound grants.

A grant lets one declared recipient receive and read listed categories of listed users, for
one purpose, until it ends or is revoked. Once it has, its fields are withheld
(`GRANT_ENDED`), its copies withdrawn and its reads denied; `split_grants` decides which
grants still stand.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from residency.server.core.errors import InvalidRecord
from residency.server.core.rules import LEGAL_BASES, Grant, covers
from residency.server.core.schema import USER_ID, data_categories, data_uses


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """A grant as an operator asks for it."""

    recipient: str
    purpose: str
    legal_basis: str
    categories: tuple[str, ...]
    ends_at: float
    user_ids: tuple[str, ...]
    id: str = ""  # the operator's own name for it, or "" for a new one


# A grant's id (an operator may name it) and how much one grant may hold: its users are
# written, logged and their records re-projected in one transaction.
GRANT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_GRANT_USERS = 10_000
MAX_GRANT_CATEGORIES = 64


def check_grant(
    g: GrantRequest, recipients: Collection[str], never_transfer: Collection[str], now: float
) -> None:
    """Refuses, naming every offending field at once, a grant to a recipient the rules file
    does not declare (the user must be able to learn its company and contact), for an
    unknown purpose, legal basis or category, for a category that never leaves the home
    region (`never_transfer`: such a grant could only ever be withheld, and would claim an
    access that cannot be), for no or malformed users, or already over. A broader category
    is allowed: the never-transfer fields under it are withheld as everywhere."""
    bad = []
    if g.recipient not in recipients:
        bad.append(
            (
                "grant.recipient",
                f"unknown recipient {g.recipient!r}; a grant's third party must be "
                "declared in the rules file with its company and contact",
            )
        )
    if g.purpose not in data_uses():
        bad.append(("grant.purpose", f"{g.purpose!r} is not a Fides data use"))
    if g.legal_basis not in LEGAL_BASES:
        bad.append(("grant.legal_basis", f"must be one of {sorted(LEGAL_BASES)}"))
    cats = data_categories()
    if not g.categories or any(c not in cats for c in g.categories):
        bad.append(("grant.categories", "must list Fides data categories"))
    for c in g.categories:
        kept = next((n for n in never_transfer if covers(n, c)), None)
        if kept is not None:
            bad.append(("grant.categories", f"{c} never leaves the home region (never_transfer: {kept})"))
    if g.id and not GRANT_ID.fullmatch(g.id):
        bad.append(("grant.id", "1 to 64 letters, digits, '.', '_' or '-' (or none, for a new one)"))
    if len(g.categories) > MAX_GRANT_CATEGORIES:
        bad.append(("grant.categories", f"at most {MAX_GRANT_CATEGORIES} ({len(g.categories)} given)"))
    if not g.user_ids or any(not USER_ID.fullmatch(u) for u in g.user_ids):
        bad.append(("grant.user_ids", "must list 1 or more well-formed user ids"))
    elif len(g.user_ids) > MAX_GRANT_USERS:
        bad.append(("grant.user_ids", f"at most {MAX_GRANT_USERS} users a grant ({len(g.user_ids)} given)"))
    if g.ends_at <= now:
        bad.append(("grant.ends_at", "must be in the future"))
    if bad:
        raise InvalidRecord(bad)


def opened_reason(purpose: str, ends_at: float) -> str:
    """The transfer-log reason of a new grant."""
    return f"grant opened for {purpose} until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ends_at))}"


def closed_reason(revoked: bool) -> str:
    """The transfer-log reason of a grant that ended or was revoked."""
    return f"grant {'revoked' if revoked else 'ended'}: reads denied, copies withdrawn"


def state(ends_at: float, revoked_at: float | None, now: float) -> str:
    """Whether a grant stands at `now` ("active", as `Grant.active` decides), or is over:
    "revoked" if revoked before its end time, else "ended"."""
    if revoked_at is None:
        return "active" if now < ends_at else "ended"
    return "revoked" if revoked_at < ends_at else "ended"


def split_grants(grants: Iterable[Grant], now: float) -> tuple[tuple[Grant, ...], tuple[Grant, ...]]:
    """(standing, ended or revoked) grants at `now`, each ordered by id."""
    active: list[Grant] = []
    ended: list[Grant] = []
    for g in grants:
        (active if g.active(now) else ended).append(g)
    return tuple(sorted(active, key=lambda g: g.id)), tuple(sorted(ended, key=lambda g: g.id))
