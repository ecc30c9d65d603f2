"""Policy 5 ("you have the right to choose accept or reject cookies"): cookie data is collected
and transferred only while the user's cookie consent stands.

A cookie consent is a consent to `functional.storage` (or a purpose above it) that names no
recipient. Cookie fields are the `user.device.cookie*` categories (`rules.is_cookie`, listed
per schema as `Schema.cookie_fields`). At write time a record giving cookie fields for a user
without that consent is refused (`refused_cookie_writes`); at transfer time the rules engine
withholds them (`COOKIE_CONSENT_MISSING`); withdrawing the consent erases them (`erasure`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from residency.server.core.errors import PolicyDenied
from residency.server.core.rules import covers

COOKIE_PURPOSE = "functional.storage"


def is_cookie_consent(purpose: str, recipient: str) -> bool:
    """A consent with no recipient whose purpose covers `functional.storage` (a consent to
    `functional` covers it too)."""
    return not recipient and covers(purpose, COOKIE_PURPOSE)


def refused_cookie_writes(
    writers: Iterable[str], consenting: Collection[str], cookie_fields: Collection[str]
) -> PolicyDenied | None:
    """The refusal for a batch in which `writers` give cookie fields, or None when every one
    of them is in `consenting` (the users whose cookie consent stands)."""
    refused = sorted({u for u in writers if u not in consenting})
    if not refused:
        return None
    return PolicyDenied(
        f"policy 5: {len(refused)} user(s) have not accepted cookies (first: {refused[0]}); "
        f"cookie fields ({', '.join(sorted(cookie_fields))}) are not collected without cookie consent"
    )
