"""A destination's next batch, built on the store thread: the current row of each user the
outbox entries (or a re-drive) name, opened once for every destination's batch, made into
that destination's sealed copies with their transfer-log entries, and the batch's signed
high-water mark. The loop (`loop`) ships it and commits it."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from residency.replicator.copies import build_copy, erased_copy
from residency.replicator.destinations import Destination
from residency.server.core.rules import Permits
from residency.server.storage.records import Row
from residency.server.storage.replication import OutboxItem
from residency.server.vault.records import Opened, Records
from residency.v1 import replica_pb2

log = logging.getLogger("residency.replicator")


@dataclass(slots=True)
class Prepared:
    copies: list[replica_pb2.SealedCopy]
    entries: list[dict[str, Any]]
    last_sequence: int
    # The home's signed statement of the highest version it had issued (none in the batch is above).
    high_water: replica_pb2.HighWater
    # time.monotonic() when its making began (the store as read then)
    made: float
    # The version of the rules its copies were projected under.
    rules_version: str = ""


class RulesMoved(Exception):
    """The store's rules are not those a batch was projected under (another process of the
    store applied a change this one has not taken yet): nothing of it is shipped; the worker
    takes the store's rules, then prepares again. Shipped, a copy narrowed by the change
    would have reached its region after the change under the old rules, and after the
    re-projection meant to withdraw it, for good (review finding)."""


async def take_rules(follow: Callable[[], Awaitable[None]] | None, records: Records, version: str) -> bool:
    """After `RulesMoved`: the store's rules taken (`follow`: `SharedRules.follow`); False, and
    why logged, if this process still runs others (they do not load here, the store failed):
    the caller waits before it tries again, rather than spin."""
    try:
        if follow is not None:
            await follow()
    except Exception as e:
        log.warning("the store's rules (%s) not taken: %s", version, e)
        return False
    if records.rules.version == version:
        return True
    log.warning("the store's rules are %s, this one runs %s: nothing shipped", version, records.rules.version)
    return False


def rules_moved(store: Any, batch: Prepared) -> str:
    """On the store thread, after the batch's outbox entries were read: the version of the
    rules in force if the batch was not projected under it, else "". A re-projection's
    entries are written after its change commits, so a batch holding one sees it here."""
    shared = store.rules_version()
    return shared if shared and batch.copies and shared != batch.rules_version else ""


class Batches:
    """Builds batches for every destination of one worker, keeping the records it opened for
    the other destinations' batches of the same changes (one open each, bounded)."""

    def __init__(self, records: Records, epoch: Callable[[str], int], keep: int):
        self.records = records
        # The lease epoch a destination's batch is made under (the worker's current hold).
        self._epoch = epoch
        # How many opened records to keep: a few batches' worth for every destination.
        self._keep = keep
        self._opened: dict[tuple[str, int], Opened] = {}
        # Raised by every `forget()`: a batch begun before it (on the store thread, while the
        # event loop forgot) keeps nothing it opened.
        self._generation = self._generation_read = 0
        # The store's highest record version when last read: read again for a batch with one above it.
        self._high_water = 0

    def of_outbox(self, d: Destination, items: list[OutboxItem]) -> Prepared:
        made, self._generation_read = time.monotonic(), self._generation
        rules = self.records.rules.version  # before: rules swapped meanwhile make the batch stale
        users = list({i.user_id for i in items})
        rows = self.records.store.rows(users)
        permits = self.records.permits_for(users)
        self.records.warm_keys([u for u, row in rows.items() if (u, row.version) not in self._opened])
        copies, entries = [], []
        for item in items:
            row = rows.get(item.user_id)
            # A later outbox entry carries a newer version: ship each version once, the newest.
            if row is None or row.version != item.version:
                continue
            copy, entry = self.copy_for(d, row, permits[row.user_id])
            copies.append(copy)
            entries.append(entry)
        return Prepared(copies, entries, items[-1].sequence, self._mark(d, copies), made, rules)

    def of_users(self, d: Destination, user_ids: list[str]) -> tuple[Prepared, list[str]]:
        """Copies of the current version of each user (re-driving dead letters), and the
        users who have no record left (nothing to re-drive)."""
        made, self._generation_read = time.monotonic(), self._generation
        rules = self.records.rules.version
        rows = self.records.store.rows(user_ids)
        permits = self.records.permits_for(user_ids)
        copies, entries = [], []
        gone = []
        for u in user_ids:
            row = rows.get(u)
            if row is None:
                gone.append(u)
                continue
            copy, entry = self.copy_for(d, row, permits[u])
            copies.append(copy)
            entries.append(entry)
        return Prepared(copies, entries, 0, self._mark(d, copies), made, rules), gone

    def _mark(self, d: Destination, copies: list[replica_pb2.SealedCopy]) -> replica_pb2.HighWater:
        """The batch's signed high-water mark: the highest version the store holds (read from
        the store, not the batch), the lease epoch, the hashes of the unsigned copies."""
        if max((c.version for c in copies), default=0) > self._high_water:
            self._high_water = self.records.store.max_version()
        return d.mark(self._high_water, self._epoch(d.region), copies)

    def copy_for(
        self, d: Destination, row: Row, permits: Permits
    ) -> tuple[replica_pb2.SealedCopy, dict[str, Any]]:
        if row.deleted:
            copy, entry = erased_copy(self.records, d.keys, row.user_id, row.version)
        else:
            copy, entry = build_copy(self.records, d.keys, self._open(row), permits, time.time())
        if copy.deleted:
            # Erased, or withdrawn from this destination: the user's plaintext leaves memory
            # (another destination that still gets the copy opens the record again).
            self.forget(row.user_id)
        # Signed (or stamped for the batch's mark) last: the signature covers the copy as sent.
        return d.finish(copy), entry

    def forget(self, user_id: str | None = None) -> None:
        """Drops opened (plaintext) records: one user's, on erasure, or every one (a key
        shredded, the worker stopping; from any thread)."""
        if user_id is None:
            self._generation += 1
            self._opened = {}
            return
        opened = self._opened
        for key in [k for k in list(opened) if k[0] == user_id]:  # list(): one step, any thread
            opened.pop(key, None)

    def _open(self, row: Row) -> Opened:
        key = (row.user_id, row.version)
        opened = self._opened.get(key)
        if opened is None:
            opened = self.records.open_row(row)
            if self._generation == self._generation_read:
                kept = self._opened
                oldest = next(iter(kept), None) if len(kept) >= self._keep else None
                if oldest is not None:
                    kept.pop(oldest, None)
                kept[key] = opened
        return opened
