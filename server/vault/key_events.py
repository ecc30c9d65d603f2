"""Key events on a node: the events of its key lifecycle (`key_lifecycle`) in `keyring.json`,
each written to the node's transfer log once (kind `key_event`), and acted on: a shred forgets
every key held, a rekey after it opens with the new key and, on a region node, drops the
copies sealed to the shredded one (the primary sends them again). A running node applies them
as it makes them, and at start those made while it was stopped (`residency keys --config`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from residency.server.core import translog
from residency.server.keys import lifecycle
from residency.server.storage.database import UnitOfWork
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records

log = logging.getLogger("residency.keys")


class KeyEventStore(UnitOfWork, Protocol):
    def cursor(self, destination: str) -> int: ...
    def set_cursor(self, destination: str, sequence: int) -> None: ...
    def log_append(self, entries: list[dict[str, Any]]) -> list[int]: ...
    def drop_copies(self) -> int: ...
    def notify(self, kind: str) -> None: ...


class KeyEvents:
    """Applies and logs a node's key events."""

    def __init__(
        self,
        region: str,
        primary: bool,
        keys_dir: Path,
        records: Records,
        db: StoreThread[KeyEventStore],
        forget: Callable[[], None],
    ):
        self.region, self.primary, self.dir = region, primary, keys_dir
        self.records, self.db = records, db
        # Drops every opened (plaintext) record a replicator holds.
        self.forget = forget

    async def erased_elsewhere(self) -> None:
        """Another process of a shared store erased users: the data keys this one holds go
        (a user may be back under a new key, which the old would not open), and so does what
        its replicator opened."""
        await self.db.call(self.records.keyring.data_keys.clear)
        self.forget()

    def _entry(self, actor: str, reason: str) -> dict[str, Any]:
        return translog.key_event(self.region, actor, self.records.rules.version, reason)

    async def apply(self) -> None:
        """Logs the events not logged yet, and acts on them: a shred, a rekey (even both at
        once, if both were made while the node was stopped). A shred is acted on while the
        events say the key is shredded, whoever logged it: another front end or the node a
        standalone worker works for."""
        keyring, region, store = self.records.keyring, self.region, self.db.store
        cursor = f"key_events:{region}"
        events = lifecycle.read_events(self.dir)
        done = await self.db.call(store.cursor, cursor)
        new = [e["event"] for e in events[done:]]
        reason = lifecycle.shredded_reason(region, events)
        if (reason or "shredded" in new) and not keyring.shredded:
            keyring.shred(reason or "the region key was shredded")
            self.forget()  # nothing opened under the shredded keys stays in memory
            log.warning("%s", reason or f"the key of {region} was shredded")
        rekeyed = not reason and "rekeyed" in new
        if rekeyed:
            keyring.rekeyed()
            log.warning("%s has a new region key; copies sealed to the shredded one are dropped", region)

        def write() -> None:
            logged = store.cursor(cursor)  # another process may have logged them meanwhile
            if logged >= len(events):
                return
            entries = [self._entry(e["actor"], f"{e['event']}: {e['detail']}") for e in events[logged:]]
            if rekeyed and not self.primary and any(e["event"] == "rekeyed" for e in events[logged:]):
                dropped = store.drop_copies()
                entries.append(
                    self._entry(
                        "node", f"dropped: {dropped} copies sealed to the shredded key, to be sent again"
                    )
                )
            if entries:
                store.log_append(entries)
                store.set_cursor(cursor, len(events))
                store.notify("keys")  # other front ends of a shared store apply them too

        if len(events) > done:  # nothing else to log: no transaction (a worker asks every second)
            await self.db.write(write)
