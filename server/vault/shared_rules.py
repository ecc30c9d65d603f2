"""The rules in force on a store that several front ends share (PostgreSQL): the text of the
rule set last applied is kept in the store beside its version, a change is notified, and every
other front end takes it (in memory and in its own rules file) within milliseconds; one that
starts with a rules file other than the store's takes the store's."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from residency.server.config.rules import rules_from_bytes
from residency.server.core.rules import RuleSet
from residency.server.core.schema import Schema
from residency.server.keys.files import write_private
from residency.server.storage.database import UnitOfWork
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records

log = logging.getLogger("residency.node")


class RulesTextStore(UnitOfWork, Protocol):
    def set_rules_text(self, version: str, text: bytes) -> None: ...
    def rules_text(self) -> tuple[str, bytes] | None: ...
    def notify(self, kind: str) -> None: ...


def rules_at_start(store: RulesTextStore, path: Path, schema: Schema, rules: RuleSet) -> RuleSet:
    """The rule set a front end of a shared store starts with: the store's, written to its own
    rules file, when it differs from the file's (another front end applied a change meanwhile:
    on a shared store, rules change through `ApplyRules` or a SIGHUP of one front end)."""
    shared = store.rules_text()
    if shared is None or shared[0] == rules.version:
        return rules
    version, text = shared
    new = rules_from_bytes(text, schema, f"the store's rules {version}")
    write_private(path, text)
    log.warning("rules file %s held %s; it now holds the store's rules %s", path, rules.version, version)
    return new


class SharedRules:
    def __init__(
        self,
        path: Path,
        schema: Schema,
        records: Records,
        db: StoreThread[RulesTextStore],
        lock: asyncio.Lock,
    ):
        self.path, self.schema, self.records, self.db, self.lock = path, schema, records, db, lock

    def share(self, version: str, text: bytes) -> None:
        """In the transaction that makes `version` current: its text, and the notification."""
        self.db.store.set_rules_text(version, text)
        self.db.store.notify("rules")

    async def follow(self) -> None:
        """Another front end changed the rules: take the store's, unless they are ours."""
        shared = await self.db.call(self.db.store.rules_text)
        if shared is None or shared[0] == self.records.rules.version:
            return
        version, text = shared
        new = rules_from_bytes(text, self.schema, f"the store's rules {version}")
        async with self.lock:
            await asyncio.get_running_loop().run_in_executor(None, write_private, self.path, text)
            old, self.records.rules = self.records.rules.version, new
        log.info("rules %s -> %s, applied by another front end of the store", old, version)
