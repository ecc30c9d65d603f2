"""Consents (policy 2a, 2c, 5) as store operations: record the change, log it, and give the
user's record a new version so the replicator projects its copies again."""

from __future__ import annotations

import time

from residency.server.core import translog
from residency.server.core.policy.consent import ConsentChange, change_reason, check_consents
from residency.server.core.policy.erasure import removed_on_withdrawal
from residency.server.vault.records import Records


class Consents:
    records: Records

    def check_consents(self, changes: list[ConsentChange], withdraw: bool) -> None:
        check_consents(changes, self.records.rules.recipients, withdraw)

    def set_consents(self, changes: list[ConsentChange], withdraw: bool, actor: str) -> int:
        """Grants or withdraws consents. Users whose standing consents changed get a new
        record version, so their copies are projected again (withdrawal removes fields
        within the replication lag); a withdrawn cookie consent also erases the stored
        cookie fields (policy 5: refusal stops collection)."""
        store, rules, now = self.records.store, self.records.rules, time.time()
        entries, touched = [], []
        erasing: dict[tuple[str, ...], list[str]] = {}
        for c in changes:
            if not store.consent_set(
                c.user_id, c.purpose, c.recipient, c.sensitive, now, c.evidence, actor, withdraw
            ):
                continue
            touched.append(c.user_id)
            if withdraw and (
                gone := removed_on_withdrawal(c.purpose, c.recipient, self.records.schema.cookie_fields)
            ):
                erasing.setdefault(gone, []).append(c.user_id)
            recipient = rules.recipients.get(c.recipient)
            entries.append(
                translog.entry(
                    "consent",
                    subject=c.user_id,
                    source_region=rules.home_region,
                    destination_region=recipient.region if recipient else "",
                    recipient=c.recipient,
                    purpose=c.purpose,
                    outcome="allowed",
                    actor=actor,
                    rules_version=rules.version,
                    reason=change_reason(c, withdraw),
                )
            )
        if entries:
            store.log_append(entries)
        erased = {u for users in erasing.values() for u in users}
        self.records.bump([u for u in dict.fromkeys(touched) if u not in erased])
        for gone, users in erasing.items():
            self.records.bump(list(dict.fromkeys(users)), remove=gone)
        return len(entries)
