"""Finding users by a lookup field (issue 18, `RecordService.FindRecords`): the blind index
says who has the value; which of them the caller may read the field of is decided from the
rules (at a region node, the copies' policies) before anything is opened or logged; those are
read exactly as `GetRecord` reads (and logs) them for the caller, and the rest are named
together in one entry per find, so the log's sequence numbers say nothing of them."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

from residency.server.core import translog
from residency.server.core.errors import InvalidRecord
from residency.server.core.lookup import normalize
from residency.server.core.rules import NO_RULE, Allowed, Permits, Withheld
from residency.server.keys.indexkey import IndexKey
from residency.server.vault.records import Caller, ReadResult, Records

# At most this many index matches are examined per call: a value shared by many users (a
# lookup field without a unique value) costs a bounded amount of work per call; the page
# token goes on from where the call stopped.
MAX_EXAMINED = 1000
# A read of one user for a caller, found by a field: `Records.read` or `RegionCopies.read_copy`.
Read = Callable[[str, Caller, str], ReadResult]
# Which of a find's matches that read would answer, decided without opening or logging anything:
# `Records.findable` or `RegionCopies.findable_copies`.
Decide = Callable[[list[str], Caller, str], list[str]]
# A page token: the index key version that sealed it, then its sealed cursor (base64url of a
# 12-byte nonce, the 128-byte padded position and a 16-byte tag).
TOKEN = re.compile(r"([1-9][0-9]{0,8})\.([A-Za-z0-9_-]{208})")
BAD_TOKEN = "not a next_page_token this node gave for this find"


@dataclass(slots=True)
class Found:
    results: list[ReadResult]
    # Where the next page starts, sealed ("" when there is no more).
    next_page_token: str


def check_token(token: str) -> None:
    """Refuses a page token that cannot be one this node gave (before anything is looked up)."""
    if token and not TOKEN.fullmatch(token):
        raise InvalidRecord([("page_token", BAD_TOKEN)])


class Finder:
    def __init__(self, records: Records, read: Read, decide: Decide, window: int = MAX_EXAMINED):
        self.records, self.read, self.decide = records, read, decide
        self.fields = records.schema.lookup_fields
        self.window = window

    def check(self, field: str, value: str) -> str:
        """The normalised value to search for, or InvalidRecord (naming the field, never the value)."""
        if field not in self.fields:
            known = ", ".join(sorted(self.fields)) or "none in this schema"
            # Not echoed: a caller's mistake here may be the value itself.
            raise InvalidRecord([("field", f"not a lookup field of the schema (lookup fields: {known})")])
        limit = self.records.schema.fields[field].max_bytes
        if not value or len(value.encode()) > limit:
            raise InvalidRecord([("value", f"must be 1 to {limit} bytes, as {field} values are")])
        normalized = normalize(self.fields[field], value)
        if not normalized:
            kind = self.fields[field]
            raise InvalidRecord([("value", f"nothing is left of it once normalised as {kind}")])
        return normalized

    def searchable(self, field: str, caller: Caller) -> str:
        """Why `caller` may not find by `field` at all, decided from the rules alone (the same
        for every value, so the refusal says nothing about who has which value), or ""."""
        records = self.records
        if not records.primary:
            if caller.location != records.region:
                return f"copies held in {records.region} are not passed on to {caller.location}"
            return ""
        if caller.location == records.region or caller.role == "recipient":
            return ""  # home callers read every field; a recipient's grants are per user
        every = frozenset(r.id for r in records.rules.rules)
        best = Permits(every, every, True)
        decision = records.rules.plan(caller.location, caller.purpose, best).decisions[field]
        if not isinstance(decision, Allowed):
            return f"no rule allows {field} to {caller.location} for {caller.purpose}"
        if form := decision.rule.form(field):
            # A find by the whole value would confirm what the rule lets out only as a form.
            return f"{field} goes to {caller.location} for {caller.purpose} only as {form}: not searchable"
        return ""

    def refuse(self, field: str, caller: Caller, why: str) -> int:
        """Logs a find refused before any lookup: one denied entry, naming the field, no user."""
        records = self.records
        entry = translog.entry(
            "remote_read" if caller.location != records.region else "local_read",
            subject="",
            source_region=records.region,
            destination_region=caller.location,
            outcome="denied",
            actor=caller.identity,
            rules_version=records.rules.version,
            purpose=caller.purpose,
            reason=f"find refused: {why}",
            found_by=field,
        )
        (seq,) = records.store.log_append([entry])
        return seq

    def _context(self, field: str, digest: bytes, caller: Caller) -> bytes:
        """What a page token is bound to: this find (field, value's digest) by this caller."""
        parts = (
            field,
            digest.hex(),
            caller.identity,
            caller.location,
            caller.purpose,
            caller.role,
            caller.name,
        )
        return "\x00".join(("find", *parts)).encode()

    def _seal(self, key: IndexKey, context: bytes, position: str) -> str:
        sealed = base64.urlsafe_b64encode(key.seal_cursor(context, position)).rstrip(b"=").decode()
        return f"{key.version}.{sealed}"

    def _open(self, keys: list[IndexKey], field: str, normalized: str, caller: Caller, token: str) -> str:
        """The position a page token names, or InvalidRecord: a token is opened only with the
        key version that sealed it, for the same find by the same caller."""
        m = TOKEN.fullmatch(token)
        key = next((k for k in keys if m and k.version == int(m[1])), None)
        if m is None or key is None:
            raise InvalidRecord([("page_token", BAD_TOKEN)])
        sealed = base64.urlsafe_b64decode(m[2] + "=" * (-len(m[2]) % 4))
        position = key.open_cursor(self._context(field, key.digest(field, normalized), caller), sealed)
        if position is None:
            raise InvalidRecord([("page_token", BAD_TOKEN)])
        return position

    def find(self, field: str, normalized: str, caller: Caller, token: str, limit: int) -> Found:
        """Users whose `field` has this value, each read as `GetRecord` reads it for `caller`
        (logged the same way) and answered only if that read gives `field` itself: a user whose
        rules do not let this caller see the field is left out, as if it did not match.

        Which matches are answered is decided first, without opening or logging anything; only
        those are opened and logged. The others are named together in one entry, written for
        every logged find (none withheld included): the log sequences a find uses depend only
        on what it answers. The page token seals where the next page starts (the last match
        examined, which may be one withheld), so it names nobody."""
        records = self.records
        keys = records.keyring.index_keys.current()
        key = keys[0]
        digest = key.digest(field, normalized)
        after = self._open(keys, field, normalized, caller, token) if token else ""
        candidates = records.store.index_find(key.version, field, digest, after, self.window)
        answerable = set(self.decide(candidates, caller, field)) if candidates else set()
        results: list[ReadResult] = []
        hidden: list[str] = []
        position = ""
        for user_id in candidates:
            if len(results) == limit:
                break
            position = user_id
            if user_id not in answerable:
                hidden.append(user_id)
                continue
            result = self.read(user_id, caller, field)
            if field in result.record.fields:
                results.append(result)
        if self.logged(caller):
            self._log(field, caller, len(results), hidden)
        more = len(results) == limit or len(candidates) == self.window
        return Found(results, self._seal(key, self._context(field, digest, caller), position) if more else "")

    def logged(self, caller: Caller) -> bool:
        """Whether a find by `caller` is logged: every one but a home service's at the primary
        (which, as for `GetRecord`, reads every record whole, unlogged)."""
        records = self.records
        return not (records.primary and caller.location == records.region and caller.role != "recipient")

    def _log(self, field: str, caller: Caller, answered: int, hidden: list[str]) -> int:
        """The find's one entry: the users it matched but withheld from `caller` (`subjects`)."""
        records = self.records
        said = f"find by {field}: {answered} answered"
        entry = translog.entry(
            "remote_read" if caller.location != records.region else "local_read",
            subject="",
            subjects=hidden,
            source_region=records.region,
            destination_region=caller.location,
            outcome="denied" if hidden else "allowed",
            actor=caller.identity,
            rules_version=records.rules.version,
            purpose=caller.purpose,
            withheld=translog.described_withheld(records.schema, {field: Withheld(NO_RULE)})
            if hidden
            else [],
            reason=f"{said}; {len(hidden)} matched but withheld: their rules do not let this caller "
            f"read {field}"
            if hidden
            else f"{said}; none withheld",
            found_by=field,
        )
        (seq,) = records.store.log_append([entry])
        return seq
