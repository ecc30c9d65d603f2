"""Consents, third-party grants, disclosures, explanations and rule changes: the privacy
policy's sections 2, 3 and 5 as operations on a node's records.

Every method runs on the store thread inside a transaction (see `residency.server.storage.thread`), so a
consent, its transfer-log entry and the record version that makes the replicator project
the user's copies again commit together.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from residency.server.core import translog
from residency.server.core.errors import FailedPrecondition, InvalidRecord, NotFound
from residency.server.core.rules import (
    COOKIE_PURPOSE,
    CREDENTIAL,
    LEGAL_BASES,
    NOT_FOR_GROUND,
    Allowed,
    RuleSet,
    Withheld,
    covers,
)
from residency.server.core.schema import USER_ID, data_categories, data_uses
from residency.server.storage.roles import PolicyStore
from residency.server.vault.records import Caller, Records

THIRD_PARTY_SHARING = "third_party_sharing"

# Policy 3a-3g: the legal basis each ground stands on, the evidence it needs, and the
# categories it may reach (None: any field but credentials).
GROUNDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...] | None]] = {
    "consent": ("consent", (), None),
    "requested_service": ("contract", ("service",), None),
    "judicial_or_administrative_request": (
        "judicial_or_administrative_request",
        ("reference", "approver"),
        None,
    ),
    "violation_of_law_or_agreement": ("violation_of_law_or_agreement", ("reference", "approver"), None),
    "ip_complaint": ("ip_complaint", ("reference",), ("user.name", "user.contact")),
    "transaction_dispute": ("transaction_dispute", ("reference",), ("user.name", "user.contact")),
    "other_legal_basis": ("legal_obligation", ("provision", "approver"), None),
}


@dataclass(slots=True)
class ConsentChange:
    user_id: str
    purpose: str
    recipient: str
    sensitive: bool
    evidence: str


@dataclass(slots=True)
class Disclosure:
    user_id: str
    third_party: str
    ground: str
    fields: list[str]
    evidence: dict[str, str] = field(default_factory=dict)


class Policy:
    def __init__(self, records: Records):
        self.records = records
        self.store: PolicyStore = records.store

    @property
    def rules(self) -> RuleSet:
        return self.records.rules

    # ---- consents -----------------------------------------------------------------------

    def check_consents(self, changes: list[ConsentChange]) -> None:
        bad: list[tuple[str, str]] = []
        for i, c in enumerate(changes):
            at = f"consents[{i}]"
            if not USER_ID.fullmatch(c.user_id):
                bad.append((f"{at}.user_id", "must be 1-128 characters from [A-Za-z0-9._:@-]"))
            if c.purpose not in data_uses():
                bad.append((f"{at}.purpose", f"{c.purpose!r} is not a Fides data use"))
            known = c.recipient == "" or c.recipient in self.rules.recipients
            if not known and not (covers(THIRD_PARTY_SHARING, c.purpose) and len(c.recipient) <= 200):
                bad.append(
                    (
                        f"{at}.recipient",
                        f"unknown recipient {c.recipient!r}; known: {sorted(self.rules.recipients)}",
                    )
                )
            if len(c.evidence) > 2000:
                bad.append((f"{at}.evidence", "at most 2,000 characters"))
        if not 1 <= len(changes) <= 1000:
            bad.append(("consents", f"{len(changes)} consents; send 1 to 1,000"))
        if bad:
            raise InvalidRecord(bad)

    def set_consents(self, changes: list[ConsentChange], withdraw: bool, actor: str) -> int:
        """Grants or withdraws consents. Users whose standing consents changed get a new
        record version, so their copies are projected again (withdrawal removes fields
        within the replication lag); a withdrawn cookie consent also erases the stored
        cookie fields (policy 5: refusal stops collection)."""
        now = time.time()
        entries, touched, cookie_refused = [], [], []
        for c in changes:
            if not self.store.consent_set(
                c.user_id, c.purpose, c.recipient, c.sensitive, now, c.evidence, actor, withdraw
            ):
                continue
            touched.append(c.user_id)
            cookie = not c.recipient and covers(c.purpose, COOKIE_PURPOSE)
            if cookie and withdraw:
                cookie_refused.append(c.user_id)
            recipient = self.rules.recipients.get(c.recipient)
            entries.append(
                translog.entry(
                    "consent",
                    time=now,
                    subject=c.user_id,
                    source_region=self.rules.home_region,
                    destination_region=recipient.region if recipient else "",
                    recipient=c.recipient,
                    purpose=c.purpose,
                    outcome="allowed",
                    actor=actor,
                    rules_version=self.rules.version,
                    reason=("withdrawn" if withdraw else "granted")
                    + (" (sensitive personal information)" if c.sensitive else "")
                    + (" (cookies, policy 5)" if cookie else ""),
                )
            )
        if entries:
            self.store.log_append(entries)
        plain = [u for u in dict.fromkeys(touched) if u not in cookie_refused]
        self.records.bump(plain)
        self.records.bump(
            list(dict.fromkeys(cookie_refused)), remove=tuple(sorted(self.records.schema.cookie_fields))
        )
        return len(entries)

    # ---- grants -------------------------------------------------------------------------

    def create_grant(self, g: dict[str, Any], users: list[str], actor: str) -> str:
        bad = []
        if g["recipient"] not in self.rules.recipients:
            bad.append(
                (
                    "grant.recipient",
                    f"unknown recipient {g['recipient']!r}; a grant's third party must be "
                    "declared in the rules file with its company and contact",
                )
            )
        if g["purpose"] not in data_uses():
            bad.append(("grant.purpose", f"{g['purpose']!r} is not a Fides data use"))
        if g["legal_basis"] not in LEGAL_BASES:
            bad.append(("grant.legal_basis", f"must be one of {sorted(LEGAL_BASES)}"))
        cats = data_categories()
        if not g["categories"] or any(c not in cats for c in g["categories"]):
            bad.append(("grant.categories", "must list Fides data categories"))
        if not users or any(not USER_ID.fullmatch(u) for u in users):
            bad.append(("grant.user_ids", "must list 1 or more well-formed user ids"))
        if g["ends_at"] <= time.time():
            bad.append(("grant.ends_at", "must be in the future"))
        if bad:
            raise InvalidRecord(bad)
        g = {
            **g,
            "id": g.get("id") or uuid.uuid4().hex[:12],
            "created_at": time.time(),
            "actor": actor,
            "categories": json.dumps(sorted(g["categories"])),
        }
        self.store.grant_put(g, users)
        self._log_grant(
            g["id"],
            g["recipient"],
            users,
            actor,
            f"grant opened for {g['purpose']} until "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(g['ends_at']))}",
        )
        self.records.bump(users)
        return g["id"]

    def revoke_grant(self, grant_id: str, actor: str) -> bool:
        """Ends a grant now; its copies are withdrawn in the same transaction."""
        if not self.store.grant_revoke(grant_id, time.time()):
            if not any(r[0] == grant_id for r in self.store.grants_list()):
                raise NotFound(f"no grant {grant_id}")
            return False
        self.end_grants()
        return True

    def end_grants(self, now: float | None = None) -> int:
        """Carries out every grant that ended or was revoked: logs it and withdraws the
        copies it allowed (policy 2a: after the service, no access to anything)."""
        now = time.time() if now is None else now
        ended = self.store.grants_ended_unlogged(now)
        for grant_id, recipient, revoked_at in ended:
            users = self.store.grant_users(grant_id)
            self._log_grant(
                grant_id,
                recipient,
                users,
                "policy",
                "grant revoked: reads denied, copies withdrawn"
                if revoked_at
                else "grant ended: reads denied, copies withdrawn",
            )
            self.records.bump(users)
            self.store.grant_mark_ended(grant_id)
        return len(ended)

    def _log_grant(self, grant_id: str, recipient: str, users: list[str], actor: str, reason: str) -> None:
        region = self.rules.recipients[recipient].region if recipient in self.rules.recipients else ""
        self.store.log_append(
            [
                translog.entry(
                    "grant",
                    time=time.time(),
                    subject=u,
                    source_region=self.rules.home_region,
                    destination_region=region,
                    recipient=recipient,
                    outcome="allowed",
                    actor=actor,
                    rules_version=self.rules.version,
                    reason=f"{reason} (grant {grant_id})",
                )
                for u in users
            ]
        )

    # ---- retention ----------------------------------------------------------------------

    def sweep_retention(self, now: float | None = None, limit: int = 1000) -> int:
        """Records that crossed a rule's retention period since the last sweep get a new
        version, so the copies sent under that rule are withdrawn."""
        now = time.time() if now is None else now
        due: dict[str, None] = {}
        for days in sorted({r.retention_days for r in self.rules.rules if r.retention_days}):
            name = f"retention:{days}"
            after, upto = self.store.sweep_cutoff(name), now - days * 86400
            users = self.store.live_updated_between(after, upto, limit)
            due.update(dict.fromkeys(users))
            rows = self.store.rows(users[-1:]) if len(users) == limit else {}
            self.store.set_sweep_cutoff(name, rows[users[-1]].updated_at if rows else upto)
        self.records.bump(list(due))  # once per record, however many periods it crossed
        return len(due)

    # ---- explain ------------------------------------------------------------------------

    def explain(self, user_id: str, to: str, purpose: str | None) -> list[dict[str, Any]]:
        if to not in self.rules.regions:
            raise InvalidRecord([("to", f"unknown region {to!r}; known: {sorted(self.rules.regions)}")])
        if purpose and purpose not in data_uses():
            raise InvalidRecord([("purpose", f"{purpose!r} is not a Fides data use")])
        row = self.store.rows([user_id]).get(user_id)
        if row is None or row.deleted:
            raise NotFound(f"user {user_id} has no record")
        rec = self.records.open_row(row)
        permits = self.records.permits_for([user_id])[user_id]
        plan = self.rules.plan(to, purpose or None, permits)
        sent, withheld = self.records.project(plan, rec.fields, rec.updated_at)
        out = []
        for name in sorted(rec.fields):
            spec = self.records.schema.fields[name]
            item = {"field": name, "category": spec.category, "transferred": name in sent}
            d = plan.decisions[name]
            if name in sent and isinstance(d, Allowed):
                item |= {"rule": d.rule.id, "legal_basis": d.rule.legal_basis, "recipient": d.recipient.id}
            else:
                w = withheld[name]
                item |= {"reason": w.reason, "detail": w.detail}
            out.append(item)
        return out

    # ---- disclosures (policy 3) ---------------------------------------------------------

    def disclose(self, d: Disclosure, caller: Caller) -> tuple[dict[str, Any], dict[str, Withheld], int, str]:
        """Hands the fields the ground allows to a third party, or refuses for missing
        evidence; logged either way. Returns (fields, withheld, log sequence, refusal)."""
        if d.ground not in GROUNDS:
            raise InvalidRecord([("ground", f"must be one of {sorted(GROUNDS)}")])
        if not d.third_party.strip():
            raise InvalidRecord([("third_party", "name who receives the data")])
        schema = self.records.schema.fields
        unknown = [f for f in d.fields if f not in schema]
        if unknown:
            raise InvalidRecord([(f"fields[{f}]", "unknown field") for f in unknown])
        row = self.store.rows([d.user_id]).get(d.user_id)
        if row is None or row.deleted:
            raise NotFound(f"user {d.user_id} has no record")
        basis, needs, reach = GROUNDS[d.ground]
        missing = [k for k in needs if not d.evidence.get(k, "").strip()]
        refusal = ""
        if missing:
            refusal = f"ground {d.ground} needs evidence: {', '.join(missing)}"
        elif "approver" in needs and d.evidence["approver"] == caller.identity:
            refusal = "the approver must be someone other than the caller"
        elif d.ground == "consent" and not self._consents_to_sharing(d.user_id, d.third_party):
            refusal = (
                f"the user has no standing consent to share with {d.third_party} ({THIRD_PARTY_SHARING})"
            )
        rec = self.records.open_row(row)
        asked = d.fields or sorted(rec.fields)
        sent: dict[str, Any] = {}
        withheld: dict[str, Withheld] = {}
        for name in asked:
            if name not in rec.fields:
                continue
            spec = schema[name]
            if spec.credential:
                withheld[name] = Withheld(CREDENTIAL)
            elif reach is not None and not any(covers(c, spec.category) for c in reach):
                withheld[name] = Withheld(NOT_FOR_GROUND)
            else:
                sent[name] = rec.fields[name]
        if refusal:
            withheld.update({n: Withheld(NOT_FOR_GROUND) for n in sent})
            sent = {}
        evidence = "; ".join(f"{k} {v}" for k, v in sorted(d.evidence.items()) if v)
        entry = translog.entry(
            "disclosure",
            time=time.time(),
            subject=d.user_id,
            source_region=self.rules.home_region,
            destination_region="",
            recipient=d.third_party,
            purpose=caller.purpose,
            outcome="denied" if refusal or not sent else "allowed",
            actor=caller.identity,
            rules_version=self.rules.version,
            version=rec.version,
            fields=[
                {"name": n, "category": schema[n].category, "legal_basis": basis, "ground": d.ground}
                for n in sorted(sent)
            ],
            withheld=self.records.describe_withheld(withheld),
            reason=refusal or f"policy 3, ground {d.ground}" + (f"; {evidence}" if evidence else ""),
        )
        (seq,) = self.store.log_append([entry])
        return sent, withheld, seq, refusal

    def _consents_to_sharing(self, user_id: str, third_party: str) -> bool:
        return any(
            covers(purpose, THIRD_PARTY_SHARING) or covers(THIRD_PARTY_SHARING, purpose)
            for _, purpose, recipient, *_ in self.store.consents([user_id])
            if recipient == third_party
        )

    # ---- rules changes ------------------------------------------------------------------

    def swap_rules(self, new: RuleSet, actor: str) -> str:
        """Swaps the rule set atomically and logs the change; the caller then re-projects
        every live record (`reproject`)."""
        old = self.records.rules
        self.records.rules = new
        self.store.log_append(
            [
                translog.entry(
                    "rules_change",
                    time=time.time(),
                    subject="",
                    source_region=new.home_region,
                    destination_region="",
                    outcome="allowed",
                    actor=actor,
                    rules_version=new.version,
                    reason=f"rules {old.version} -> {new.version}",
                )
            ]
        )
        return old.version

    def reproject(self, after_user: str, limit: int) -> tuple[str, int]:
        """Gives the next `limit` live records a new version; returns (last user, count)."""
        page = [u for u, _ in self.store.live_blobs(after_user, limit)]
        self.records.bump(page)
        return (page[-1] if page else after_user), len(page)


def refusal_error(refusal: str, seq: int) -> FailedPrecondition:
    return FailedPrecondition(f"{refusal} (transfer-log entry {seq})")
