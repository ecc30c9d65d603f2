"""Disclosures (policy 3a-3g) as store operations under the two-person rule: a request, an
approver's decision, the release to the requester; each step, taken or refused, is a
transfer-log entry written in the same transaction.

A refused step returns its error (naming its log entry) instead of raising it: raising would
roll back the entry that records the refusal. The servicer raises it once the entry commits.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from residency.server.core import translog
from residency.server.core.errors import CallerDenied, FailedPrecondition, NotFound, ResidencyError
from residency.server.core.policy import disclosure
from residency.server.core.policy.consent import shares_with
from residency.server.core.policy.disclosure import (
    APPROVED,
    DENIED,
    GROUNDS,
    RELEASED,
    REQUEST_LIFETIME,
    Disclosure,
    Request,
)
from residency.server.core.rules import Withheld
from residency.server.keys.pki import parse_uri
from residency.server.vault.records import Caller, Records

# What a release hands over: the fields, those withheld (and why), its log entry, the request.
Released = tuple[dict[str, Any], dict[str, Withheld], int, Request]


class Disclosures:
    records: Records

    def request_disclosure(self, d: Disclosure, caller: Caller) -> tuple[Request, int] | ResidencyError:
        """Checks the ground, its evidence and the record now, stores the request and logs it;
        or logs its refusal (evidence missing, no consent for 3a) and returns the error."""
        disclosure.check_request(d, self.records.schema.fields)
        self._live_row(d.user_id)
        now = time.time()
        r = Request(uuid.uuid4().hex, d, caller.purpose, caller.identity, now, now + REQUEST_LIFETIME)
        refused = disclosure.refusal(d, self._consented(d))
        if refused:
            return self._refuse(r, "request", caller.identity, FailedPrecondition(refused), request_id="")
        self.records.store.disclosure_put(
            {
                "id": r.id,
                "user_id": d.user_id,
                "third_party": d.third_party,
                "destination_country": d.destination_country,
                "ground": d.ground,
                "fields": json.dumps(d.fields),
                "evidence": json.dumps({k: v for k, v in d.evidence.items() if v}),
                "purpose": r.purpose,
                "requester": r.requester,
                "requested_at": r.requested_at,
                "expires_at": r.expires_at,
                "state": r.state,
            }
        )
        reason = f"requested: {disclosure.log_reason(d, '')}; awaits an approver"
        return r, self._log(r, "request", caller.identity, "allowed", reason)

    def decide_disclosure(
        self, request_id: str, approver: Caller, deny_reason: str = ""
    ) -> int | ResidencyError:
        """An approver's approval (or, with a reason, denial) of a waiting request; refused
        (and logged) for the requester itself, a holder of the requester's name, or a request
        not waiting."""
        r = self.disclosure_request(request_id)
        step = "deny" if deny_reason else "approve"
        requester = parse_uri(r.requester)
        now = time.time()
        refused = disclosure.decision_refusal(
            r, approver.identity, approver.name, requester.name if requester else "", now
        )
        if refused:
            return self._refuse(r, step, approver.identity, refused)
        state = DENIED if deny_reason else APPROVED
        self.records.store.disclosure_decide(r.id, state, approver.identity, now, deny_reason)
        r.state, r.decided_by, r.decided_at, r.decision_reason = state, approver.identity, now, deny_reason
        if deny_reason:
            return self._log(r, step, approver.identity, "denied", f"denied by the approver: {deny_reason}")
        return self._log(r, step, approver.identity, "allowed", "approved: the requester may release it")

    def release_disclosure(
        self, request_id: str, caller: Caller, purpose_refusal: Callable[[str], str | CallerDenied]
    ) -> Released | ResidencyError:
        """Hands the approved request's fields to its requester, once, reading the record now:
        a record erased since, a 3a consent withdrawn since, or a purpose the requester may no
        longer state (`purpose_refusal`: why not, or "", or the refusal itself) discloses
        nothing."""
        r = self.disclosure_request(request_id)
        refused = disclosure.release_refusal(r, caller.identity, time.time())
        if refused:
            return self._refuse(r, "release", caller.identity, refused)
        if why := purpose_refusal(r.purpose):
            denied = (
                why if isinstance(why, CallerDenied) else CallerDenied(why, permission=f"purpose {r.purpose}")
            )
            return self._refuse(r, "release", caller.identity, denied)
        records, d = self.records, r.disclosure
        row = records.store.rows([d.user_id]).get(d.user_id)
        if row is None or row.deleted:
            return self._refuse(r, "release", caller.identity, NotFound(f"user {d.user_id} has no record"))
        grounds = disclosure.refusal(d, self._consented(d))
        if grounds:
            return self._refuse(r, "release", caller.identity, FailedPrecondition(grounds))
        rec = records.open_row(row)
        schema = records.schema.fields
        sent, withheld = disclosure.select(d, rec.fields, schema, "")
        basis = GROUNDS[d.ground].legal_basis
        r.state, r.released_at = RELEASED, time.time()
        records.store.disclosure_released(r.id, r.released_at)
        seq = self._log(
            r,
            "release",
            caller.identity,
            "allowed" if sent else "denied",
            disclosure.log_reason(d, ""),
            version=rec.version,
            fields=[
                {"name": n, "category": schema[n].category, "legal_basis": basis, "ground": d.ground}
                for n in sorted(sent)
            ],
            withheld=translog.described_withheld(records.schema, withheld),
        )
        return sent, withheld, seq, r

    def disclosure_request(self, request_id: str) -> Request:
        """The request of that id, as stored; NotFound if there is none."""
        disclosure.check_id(request_id)
        row = self.records.store.disclosure_get(request_id)
        if row is None:
            raise NotFound(f"no disclosure request {request_id}")
        return _request(row)

    def disclosure_requests(self, state: str = "", user_id: str = "") -> list[Request]:
        """Every request (those in `state` now, about `user_id`, if given), oldest first."""
        now = time.time()
        found = [_request(row) for row in self.records.store.disclosures_list()]
        return [
            r
            for r in found
            if (not state or disclosure.state_at(r, now) == state)
            and (not user_id or r.disclosure.user_id == user_id)
        ]

    def _live_row(self, user_id: str) -> None:
        row = self.records.store.rows([user_id]).get(user_id)
        if row is None or row.deleted:
            raise NotFound(f"user {user_id} has no record")

    def _consented(self, d: Disclosure) -> bool:
        return d.ground == "consent" and shares_with(
            self.records.standing_consents([d.user_id]), d.third_party
        )

    def _refuse(
        self, r: Request, step: str, actor: str, error: ResidencyError, request_id: str | None = None
    ) -> ResidencyError:
        """Logs a refused step; returns the error to raise, naming the entry."""
        seq = self._log(r, step, actor, "denied", f"refused: {error}", request_id=request_id)
        said = f"{error} (transfer-log entry {seq})"
        if isinstance(error, CallerDenied):  # the permission it names goes along
            return CallerDenied(said, permission=error.permission)
        return type(error)(said)

    def _log(
        self,
        r: Request,
        step: str,
        actor: str,
        outcome: str,
        reason: str,
        request_id: str | None = None,
        version: int = 0,
        fields: list[dict[str, Any]] | None = None,
        withheld: list[dict[str, Any]] | None = None,
    ) -> int:
        rules, d = self.records.rules, r.disclosure
        evidence = disclosure.evidence_of(r, step)
        if request_id is not None:  # a refused request is never stored: it has no id to name
            evidence["request"] = request_id
        entry = translog.entry(
            "disclosure",
            subject=d.user_id,
            source_region=rules.home_region,
            destination_region="",
            destination_country=d.destination_country,
            recipient=d.third_party,
            purpose=r.purpose,
            outcome=outcome,
            actor=actor,
            rules_version=rules.version,
            version=version,
            fields=fields,
            withheld=withheld,
            reason=reason,
            disclosure=evidence,
        )
        (seq,) = self.records.store.log_append([entry])
        return seq


def _request(row: dict[str, Any]) -> Request:
    d = Disclosure(
        row["user_id"],
        row["third_party"],
        row["destination_country"],
        row["ground"],
        json.loads(row["fields"]),
        json.loads(row["evidence"]),
    )
    return Request(
        row["id"],
        d,
        row["purpose"],
        row["requester"],
        row["requested_at"],
        row["expires_at"],
        row["state"],
        row["decided_by"],
        row["decided_at"],
        row["decision_reason"],
        row["released_at"],
    )
