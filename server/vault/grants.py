"""Third-party grants (policy 2a) as store operations: open, revoke, and carry out the end of
a grant, logging each and withdrawing the copies a grant no longer allows."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from residency.server.core import translog
from residency.server.core.errors import AlreadyExists, NotFound
from residency.server.core.policy.grants import GrantRequest, check_grant, closed_reason, opened_reason
from residency.server.vault.records import Records


class Grants:
    records: Records

    def create_grant(self, g: dict[str, Any], users: list[str], actor: str) -> str:
        request = GrantRequest(
            g["recipient"],
            g["purpose"],
            g["legal_basis"],
            tuple(g["categories"]),
            g["ends_at"],
            tuple(users),
            g.get("id") or "",
        )
        rules = self.records.rules
        check_grant(request, rules.recipients, rules.never_transfer, time.time())
        store = self.records.store
        if g.get("id") and any(r[0] == g["id"] for r in store.grants_list()):
            raise AlreadyExists(f"a grant {g['id']} exists; name another id, or none for a new one")
        g = {
            **g,
            "id": g.get("id") or uuid.uuid4().hex[:12],
            "created_at": time.time(),
            "actor": actor,
            "categories": json.dumps(sorted(g["categories"])),
        }
        store.grant_put(g, users)
        self._log_grant(g["id"], g["recipient"], users, actor, opened_reason(g["purpose"], g["ends_at"]))
        self.records.bump(users)
        return g["id"]

    def revoke_grant(self, grant_id: str, actor: str) -> bool:
        """Ends a grant now; its copies are withdrawn in the same transaction. False for a grant
        that was over already (revoked or ended): nothing is done, nothing logged."""
        store = self.records.store
        if not store.grant_revoke(grant_id, time.time()):
            if not any(r[0] == grant_id for r in store.grants_list()):
                raise NotFound(f"no grant {grant_id}")
            return False
        self.end_grants(revoked_by={grant_id: actor})
        return True

    def end_grants(self, now: float | None = None, revoked_by: dict[str, str] | None = None) -> int:
        """Carries out every grant that ended or was revoked: logs it (naming who revoked it,
        when that is known; else the policy sweep) and withdraws the copies it allowed
        (policy 2a: after the service, no access to anything)."""
        store = self.records.store
        now = time.time() if now is None else now
        ended = store.grants_ended_unlogged(now)
        for grant_id, recipient, revoked_at in ended:
            users = store.grant_users(grant_id)
            actor = (revoked_by or {}).get(grant_id, "policy")
            self._log_grant(grant_id, recipient, users, actor, closed_reason(bool(revoked_at)))
            self.records.bump(users)
            store.grant_mark_ended(grant_id)
        return len(ended)

    def _log_grant(self, grant_id: str, recipient: str, users: list[str], actor: str, reason: str) -> None:
        rules = self.records.rules
        region = rules.recipients[recipient].region if recipient in rules.recipients else ""
        self.records.store.log_append(
            [
                translog.entry(
                    "grant",
                    subject=u,
                    source_region=rules.home_region,
                    destination_region=region,
                    recipient=recipient,
                    outcome="allowed",
                    actor=actor,
                    rules_version=rules.version,
                    reason=f"{reason} (grant {grant_id})",
                )
                for u in users
            ]
        )
