"""Retention (policy 2a, 6b) as a store operation: records that outlived a rule's retention
period get a new version, so the copies sent under that rule are withdrawn."""

from __future__ import annotations

import time

from residency.server.core.policy.erasure import retention_cutoffs
from residency.server.vault.records import Records


class Retention:
    records: Records

    def sweep_retention(self, now: float | None = None, limit: int = 1000) -> int:
        """Records that crossed a rule's retention period since the last sweep get a new
        version, so the copies sent under that rule are withdrawn."""
        store = self.records.store
        now = time.time() if now is None else now
        due: dict[str, None] = {}
        for days, upto in retention_cutoffs(self.records.rules.rules, now):
            name = f"retention:{days}"
            users = store.live_updated_between(store.sweep_cutoff(name), upto, limit)
            due.update(dict.fromkeys(users))
            rows = store.rows(users[-1:]) if len(users) == limit else {}
            store.set_sweep_cutoff(name, rows[users[-1]].updated_at if rows else upto)
        self.records.bump(list(due))  # once per record, however many periods it crossed
        return len(due)
