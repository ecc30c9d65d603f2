"""A region node's copies under the policy each field travelled with (policy 2a, 2b): local
reads and explanations decided by it, every read logged, and fields deleted when it lapses."""

from __future__ import annotations

import time
from typing import Any

from residency.server.core import translog
from residency.server.core.errors import NotFound
from residency.server.core.policy.sticky import ANY_READER, lapsed, out_of_form, readable
from residency.server.core.rules import FORM_MISMATCH, NO_RULE, Withheld
from residency.server.storage.records import Row
from residency.server.vault.copy_policy import describe, forms_of, policies_of
from residency.server.vault.records import Caller, ReadResult, Records, SealedCopy
from residency.server.vault.rules_change import check_explain

# Who the log names for what a region node's own sweep deletes.
SWEEP_ACTOR = "retention-sweep"


class RegionCopies:
    records: Records

    def _copy(self, user_id: str) -> SealedCopy:
        row = self.records.store.rows([user_id]).get(user_id)
        if row is None or row.deleted:
            raise NotFound(f"user {user_id} has no record in {self.records.region}")
        return SealedCopy.FromString(row.blob)

    def findable_copies(
        self, user_ids: list[str], caller: Caller, field: str, now: float | None = None
    ) -> list[str]:
        """Those of `user_ids` (a find's index matches) whose `field` a `read_copy(found_by=field)`
        by `caller` would give as its value: decided from the policy each copy's field travelled
        with, without opening a copy or writing a log entry."""
        records = self.records
        if caller.location != records.region:
            return []  # copies are not passed on
        now = time.time() if now is None else now
        recipient = caller.name if caller.role == "recipient" else None
        rows = records.store.rows(user_ids)
        out = []
        for u in user_ids:
            row = rows.get(u)
            if row is None or row.deleted:
                continue
            allowed, _ = readable(
                policies_of(SealedCopy.FromString(row.blob)), caller.purpose, recipient, now
            )
            if field in allowed and not allowed[field].form:
                out.append(u)
        return out

    def read_copy(
        self, user_id: str, caller: Caller, now: float | None = None, found_by: str = ""
    ) -> ReadResult:
        """A local caller gets the fields whose policy allows its purpose (and, for a grant's
        field, only the grant's recipient); a caller located elsewhere gets nothing, as copies
        are not passed on from an affiliate region. Logged either way. `found_by`: the lookup
        field of a find, which answers nothing unless that field itself may be read."""
        records, region = self.records, self.records.region
        copy = self._copy(user_id)
        policies = policies_of(copy)
        now = time.time() if now is None else now
        if caller.location == region:
            recipient = caller.name if caller.role == "recipient" else None
            allowed, withheld = readable(policies, caller.purpose, recipient, now)
            kind, why = "local_read", f"no field of this copy may be read for {caller.purpose} by this caller"
        else:
            allowed, withheld = {}, {n: Withheld(NO_RULE) for n in policies}
            kind, why = "remote_read", f"copies held in {region} are not passed on to {caller.location}"
        if found_by and (found_by not in allowed or allowed[found_by].form):
            withheld |= dict.fromkeys(allowed, Withheld(NO_RULE))
            allowed = {}
            why = f"{found_by} of this copy may not be read for {caller.purpose} by this caller"
        rec = records.open_copy(user_id, copy, allowed)
        for name in out_of_form(allowed, rec.fields):
            del rec.fields[name], allowed[name]
            withheld[name] = Withheld(FORM_MISMATCH)
        if found_by and found_by not in allowed:  # the searched field itself was out of form
            withheld |= dict.fromkeys(allowed, Withheld(NO_RULE))
            rec.fields, allowed = {}, {}
            why = f"{found_by} of this copy is not in the form its policy names"
        forms = forms_of(allowed, allowed)
        entry = translog.entry(
            kind,
            subject=user_id,
            source_region=region,
            destination_region=caller.location,
            outcome="allowed" if allowed else "denied",
            actor=caller.identity,
            rules_version=copy.rules_version,
            purpose=caller.purpose,
            recipient=",".join(sorted({p.recipient for p in allowed.values()})),
            fields=describe(allowed, policies, copy.categories),
            forms=forms,
            withheld=[
                {"name": n, "category": copy.categories.get(n, ""), "reason": w.reason}
                for n, w in sorted(withheld.items())
            ],
            version=copy.version,
            reason="" if allowed else why,
            found_by=found_by,
        )
        (seq,) = records.store.log_append([entry])
        return ReadResult(rec, withheld, seq, entry["reason"], forms)

    def explain_copy(self, user_id: str, to: str, purpose: str | None) -> list[dict[str, Any]]:
        """`rules explain` at a region node, from the copy it holds: each field for a caller
        located in `to` (its grant's recipient, for a grant's field), for `purpose`."""
        check_explain(self.records.rules, to, purpose)
        copy = self._copy(user_id)
        policies = policies_of(copy)
        if to == self.records.region:
            allowed, withheld = readable(policies, purpose, ANY_READER, time.time())
        else:  # copies are not passed on
            allowed, withheld = {}, {n: Withheld(NO_RULE) for n in policies}
        out = []
        for name in sorted(policies):
            item: dict[str, Any] = {
                "field": name,
                "category": copy.categories.get(name, ""),
                "transferred": name in allowed,
            }
            if name in allowed:
                p = allowed[name]
                item |= {
                    "rule": p.rule,
                    "legal_basis": p.legal_basis,
                    "recipient": p.recipient,
                    "form": p.form,
                }
            else:
                item |= {"reason": withheld[name].reason, "detail": withheld[name].detail}
            out.append(item)
        return out

    def sweep_copies(self, after: str = "", now: float | None = None, limit: int = 500) -> tuple[str, int]:
        """Deletes, in one page of copies after user `after`, the fields whose policy lapsed
        (the whole copy, and its data key, when none is left) and logs each deletion: retention
        holds at the region even while the primary is unreachable. Returns (the page's last
        user, or "" after the last page; copies changed)."""
        store, region = self.records.store, self.records.region
        now = time.time() if now is None else now
        page = store.live_blobs(after, limit)
        rows, gone, entries = [], [], []
        for user_id, blob in page:
            copy = SealedCopy.FromString(blob)
            policies = policies_of(copy)
            due = lapsed(policies, now)
            if not due:
                continue
            entries.append(
                translog.entry(
                    "erasure",
                    subject=user_id,
                    source_region=copy.home_region,
                    destination_region=region,
                    outcome="allowed",
                    actor=SWEEP_ACTOR,
                    rules_version=copy.rules_version,
                    fields=describe(due, policies, copy.categories),
                    version=copy.version,
                    reason="retention: the period these fields were sent under has passed"
                    + ("" if len(due) < len(policies) else "; no field is left, so the copy is deleted"),
                )
            )
            for name in due:
                del copy.sealed_fields[name]
                copy.policies.pop(name, None)
                copy.categories.pop(name, None)
            if not copy.sealed_fields:
                gone.append(user_id)
                copy = SealedCopy(
                    user_id=user_id,
                    version=copy.version,
                    deleted=True,
                    reason="retention",
                    home_region=copy.home_region,
                )
            rows.append(Row(user_id, copy.version, copy.deleted, copy.SerializeToString(), now))
        if rows:
            store.upsert(rows)
            store.delete_data_keys(gone)  # crypto-shredding, as for an erasure
            store.log_append(entries)
            for user_id in gone:
                self.records.keyring.data_keys.drop(user_id)
            self.records.index.copies_changed(r.user_id for r in rows)
        return (page[-1][0] if len(page) == limit else ""), len(rows)
