"""Transfer rules at run time: explain what a rule set sends of a record, swap the rule set
(logged), and re-project every live record so copies follow the new rules."""

from __future__ import annotations

from typing import Any

from residency.server.core import translog
from residency.server.core.errors import InvalidRecord, NotFound
from residency.server.core.rules import Allowed, RuleSet
from residency.server.core.schema import data_uses
from residency.server.vault.records import Records


class RulesChange:
    records: Records

    def explain(self, user_id: str, to: str, purpose: str | None) -> list[dict[str, Any]]:
        rules = self.records.rules
        check_explain(rules, to, purpose)
        row = self.records.store.rows([user_id]).get(user_id)
        if row is None or row.deleted:
            raise NotFound(f"user {user_id} has no record")
        rec = self.records.open_row(row)
        permits = self.records.permits_for([user_id])[user_id]
        plan = rules.plan(to, purpose or None, permits)
        sent, withheld = self.records.project(plan, rec.fields, rec.updated_at)
        out = []
        for name in sorted(rec.fields):
            spec = self.records.schema.fields[name]
            item = {"field": name, "category": spec.category, "transferred": name in sent}
            d = plan.decisions[name]
            if name in sent and isinstance(d, Allowed):
                item |= {
                    "rule": d.rule.id,
                    "legal_basis": d.rule.legal_basis,
                    "recipient": d.recipient.id,
                    "form": d.rule.form(name),
                }
            else:
                w = withheld[name]
                item |= {"reason": w.reason, "detail": w.detail}
            out.append(item)
        return out

    def swap_rules(self, new: RuleSet, actor: str) -> str:
        """Swaps the rule set atomically and logs the change; the caller then re-projects
        every live record (`reproject`)."""
        old = self.records.rules
        self.records.rules = new
        self.records.store.log_append(
            [
                translog.entry(
                    "rules_change",
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
        page = [u for u, _ in self.records.store.live_blobs(after_user, limit)]
        self.records.bump(page)
        return (page[-1] if page else after_user), len(page)


def check_explain(rules: RuleSet, to: str, purpose: str | None) -> None:
    """An explanation is asked for a known region and, if any, a Fides data use."""
    if to not in rules.regions:
        raise InvalidRecord([("to", f"unknown region {to!r}; known: {sorted(rules.regions)}")])
    if purpose and purpose not in data_uses():
        raise InvalidRecord([("purpose", f"{purpose!r} is not a Fides data use")])
