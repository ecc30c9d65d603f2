"""Finding users by a lookup field (issue 18, `RecordService.FindRecords`): the blind index
says who has the value; each of them is then read exactly as `GetRecord` reads (and logs) it
for the caller, and answered only when that read gives the searched field itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from residency.server.core import translog
from residency.server.core.errors import InvalidRecord
from residency.server.core.lookup import normalize
from residency.server.core.rules import Allowed, Permits
from residency.server.vault.records import Caller, ReadResult, Records

# At most this many index matches are examined per find: a value shared by many users (a
# lookup field without a unique value) costs a bounded amount of work per call.
MAX_EXAMINED = 1000
# A read of one user for a caller, found by a field: `Records.read` or `RegionCopies.read_copy`.
Read = Callable[[str, Caller, str], ReadResult]


@dataclass(slots=True)
class Found:
    results: list[ReadResult]
    # Where the next page starts ("" when this one was not full).
    next_after: str


class Finder:
    def __init__(self, records: Records, read: Read):
        self.records, self.read = records, read
        self.fields = records.schema.lookup_fields

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

    def find(self, field: str, normalized: str, caller: Caller, after_user: str, limit: int) -> Found:
        """Users whose `field` has this value, each read as `GetRecord` reads it for `caller`
        (logged the same way) and answered only if that read gives `field` itself: a user whose
        rules do not let this caller see the field is left out, as if it did not match."""
        records = self.records
        key = records.keyring.index_keys.current()[0]
        candidates = records.store.index_find(
            key.version, field, key.digest(field, normalized), after_user, MAX_EXAMINED
        )
        results = []
        for user_id in candidates:
            result = self.read(user_id, caller, field)
            if field in result.record.fields:
                results.append(result)
                if len(results) == limit:
                    return Found(results, user_id)
        return Found(results, "")
