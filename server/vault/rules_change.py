"""Transfer rules at run time: explain what a rule set sends of a record, swap the rule set
(logged), and re-project every live record so copies follow the new rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from residency.server.core import translog
from residency.server.core.errors import InvalidRecord, NotFound
from residency.server.core.rules import Allowed, RuleSet
from residency.server.core.schema import data_uses
from residency.server.storage.rules_state import RulesState
from residency.server.storage.thread import StoreThread
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

    async def swap_rules(
        self, db: StoreThread[Any], new: RuleSet, actor: str, also: Callable[[], None]
    ) -> str:
        """Swaps the rule set and logs the change, with `also` (on the store thread, in the same
        group transaction); returns the old version. The caller then re-projects every live
        record (`reproject`), from the state written here (so a restart resumes it). Until
        the transaction commits the rules are not changed: if it does not, the old ones are in
        force again, and if the database gives it up and it runs again, its entry still says
        old -> new."""
        old = self.records.rules

        def swap() -> str:
            self.records.rules = new
            self._log_change(old.version, new.version, actor, "")
            also()
            return old.version

        try:
            return await db.write(swap)
        except BaseException:
            if self.records.rules is new:
                self.records.rules = old
            raise

    def _log_change(self, old: str, new: str, actor: str, why: str) -> None:
        store = self.records.store
        reason = f"rules {old} -> {new}" + (f": {why}" if why else "")
        store.log_append(
            [
                translog.entry(
                    "rules_change",
                    subject="",
                    source_region=self.records.rules.home_region,
                    destination_region="",
                    outcome="allowed",
                    actor=actor,
                    rules_version=new,
                    reason=reason,
                )
            ]
        )
        store.set_rules_state(RulesState(new, "", 0, store.counts()[0]))

    def rules_at_start(self, actor: str) -> RulesState | None:
        """At a primary's start: the re-projection to run, if any. Rules loaded that differ
        from those the records were last re-projected for (the file changed while the node was
        stopped, or a crash came between writing it and the swap) are logged as a change by
        `actor` and re-projected from the first user, as a live `rules apply` would; one a
        stop cut short goes on where its last page ended."""
        store, now = self.records.store, self.records.rules.version
        state = store.rules_state()
        # A store from before `rules_state`: the rules its newest log entry was made under.
        last = state.version if state is not None else store.last_logged_rules_version()
        if last and last != now:
            why = "found at start: the rules file changed while the node was stopped"
            self._log_change(last, now, actor, why)
            return store.rules_state()
        if state is None:
            store.set_rules_state(RulesState(now, None, 0, 0))
            return None
        return state if state.after is not None else None

    def reproject(self, limit: int) -> RulesState:
        """Gives the next `limit` live records after the saved cursor a new version; returns
        the re-projection's state, saved in the same transaction (`after` None: complete). The
        cursor is read here, not passed: a page that races a swap continues the new one."""
        store = self.records.store
        state = store.rules_state() or RulesState(self.records.rules.version, None, 0, 0)
        if state.after is None:
            return state
        page = [u for u, _ in store.live_blobs(state.after, limit)]
        self.records.bump(page)
        done = state.done + len(page)
        after = page[-1] if len(page) == limit else None
        new = RulesState(state.version, after, done, max(state.total, done))
        store.set_rules_state(new)
        return new


def check_explain(rules: RuleSet, to: str, purpose: str | None) -> None:
    """An explanation is asked for a known region and, if any, a Fides data use."""
    if to not in rules.regions:
        raise InvalidRecord([("to", f"unknown region {to!r}; known: {sorted(rules.regions)}")])
    if purpose and purpose not in data_uses():
        raise InvalidRecord([("purpose", f"{purpose!r} is not a Fides data use")])
