"""The rules a node may serve under, and on a store that several front ends share (PostgreSQL)
the rules in force: the text of the rule set last applied is kept in the store beside its
version, a change is notified, and every other front end takes it (in memory and in its own
rules file) within milliseconds; one that starts with a rules file other than the store's
takes the store's and keeps its own file beside it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from residency.server.config.node import NodeConfig
from residency.server.config.rules import rules_from_bytes
from residency.server.core.errors import ConfigError
from residency.server.core.rules import RuleSet
from residency.server.core.schema import Schema
from residency.server.keys.files import write_private
from residency.server.storage.database import UnitOfWork
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records

log = logging.getLogger("residency.node")
T = TypeVar("T")


def rules_refusal(c: NodeConfig, rules: RuleSet) -> str:
    """Why this node cannot serve under `rules` (at start, and applied while it runs), or ""."""
    if c.is_primary and c.region != rules.home_region:
        return f"this primary's region {c.region!r} is not the rules' home_region {rules.home_region!r}"
    if missing := sorted({a.region for a in c.affiliates} - rules.regions):
        return f"'affiliates' names {missing}, which no recipient of the rules is in"
    if c.region not in rules.regions:
        return f"'region' {c.region!r} is not in the rules (regions: {sorted(rules.regions)})"
    return ""


class RulesTextStore(UnitOfWork, Protocol):
    def set_rules_text(self, version: str, text: bytes) -> None: ...
    def rules_text(self) -> tuple[str, bytes] | None: ...
    def notify(self, kind: str) -> None: ...


def _shared(c: NodeConfig, schema: Schema, version: str, text: bytes) -> RuleSet:
    """The store's rule set, which this node must also be able to serve under."""
    new = rules_from_bytes(text, schema, f"the store's rules {version}")
    if why := rules_refusal(c, new):
        raise ConfigError(f"{c.path}: the store's rules {version} (applied by another front end): {why}")
    return new


def rules_at_start(store: RulesTextStore, c: NodeConfig, schema: Schema, rules: RuleSet) -> RuleSet:
    """The rule set a front end of a shared store starts with: the store's when it differs from
    its rules file's (another front end applied a change meanwhile; on a shared store rules
    change through one front end: `ApplyRules`, or a SIGHUP after its file changed). The file
    then holds the store's, and what it held is kept beside it, `RULES.VERSION`."""
    shared = store.rules_text()
    if shared is None or shared[0] == rules.version:
        return rules
    version, text = shared
    new = _shared(c, schema, version, text)
    kept = c.rules.with_name(f"{c.rules.name}.{rules.version}")
    write_private(kept, c.rules.read_bytes())
    write_private(c.rules, text)
    log.warning(
        "rules file %s held %s; it now holds the store's rules %s (its own kept as %s)",
        c.rules,
        rules.version,
        version,
        kept,
    )
    return new


class SharedRules:
    def __init__(
        self,
        c: NodeConfig,
        schema: Schema,
        records: Records,
        db: StoreThread[RulesTextStore],
        lock: asyncio.Lock,
    ):
        self.config, self.schema, self.records, self.db, self.lock = c, schema, records, db, lock

    def share(self, version: str, text: bytes) -> None:
        """In the transaction that makes `version` current: its text, and the notification."""
        self.db.store.set_rules_text(version, text)
        self.db.store.notify("rules")

    def adopt(self) -> tuple[str, str, bytes] | None:
        """In a store transaction: the store's rules swapped in, unless they are this node's;
        (the old version, the store's version and text), or None."""
        shared = self.db.store.rules_text()
        if shared is None or shared[0] == self.records.rules.version:
            return None
        new = _shared(self.config, self.schema, *shared)
        old, self.records.rules = self.records.rules.version, new
        return old, *shared

    async def follow(self) -> None:
        """Another front end changed the rules: take the store's, unless they are ours. Read,
        compared and swapped in one store transaction, under this node's rules lock: neither
        a change of this node's own nor a batch in flight sees them half way."""
        async with self.lock:
            changed = await self.db.write(self.adopt)
            if changed is not None:
                await self._took(*changed)

    async def at_start(self, start: Callable[[], T], text: bytes, shared: bool) -> T:
        """A primary's start, in one store transaction: on a `shared` store, the store's rules
        if another front end applied a change since this one read them (`rules_at_start`),
        then `start` (the change a rules file made while the node was stopped, logged), then
        these rules shared. Apart, a change applied between the read and the share was undone
        everywhere. (On a store of its own the node's rules file wins: what the store holds is
        what the node itself last shared.)"""

        def step() -> tuple[tuple[str, str, bytes] | None, T]:
            adopted = self.adopt() if shared else None
            started = start()
            if adopted is None:
                self.share(self.records.rules.version, text)
            return adopted, started

        async with self.lock:
            adopted, started = await self.db.write(step)
            if adopted is not None:
                await self._took(*adopted)
        return started

    async def _took(self, old: str, version: str, text: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(None, write_private, self.config.rules, text)
        log.info("rules %s -> %s, applied by another front end of the store", old, version)
