"""Key events on a node: the events of its key lifecycle (`key_lifecycle`) in `keyring.json`,
each written to the node's transfer log once (kind `key_event`), and acted on: a shred forgets
every key held, a rekey after it opens with the new key and, on a region node, drops the
copies sealed to the shredded one (the primary sends them again). A running node applies them
as it makes them, and at start those made while it was stopped (`residency keys --config`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from residency.server.core import translog
from residency.server.core.errors import KeysBehind
from residency.server.keys import lifecycle
from residency.server.storage.database import UnitOfWork
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records

log = logging.getLogger("residency.keys")
# How many of a region's key events the store logged with a digest of them, and the digest.
Head = tuple[int, str] | None


class KeyEventStore(UnitOfWork, Protocol):
    def cursor(self, destination: str) -> int: ...
    def set_cursor(self, destination: str, sequence: int) -> None: ...
    def log_append(self, entries: list[dict[str, Any]]) -> list[int]: ...
    def drop_copies(self) -> int: ...
    def notify(self, kind: str, detail: str = "") -> None: ...
    def key_event_head(self, region: str) -> tuple[int, str] | None: ...
    def set_key_event_head(self, region: str, logged: int, digest: str) -> None: ...


class KeyEvents:
    """Applies and logs a node's key events."""

    def __init__(
        self,
        region: str,
        primary: bool,
        keys_dir: Path,
        records: Records,
        db: StoreThread[KeyEventStore],
        forget: Callable[[str | None], None],
    ):
        self.region, self.primary, self.dir = region, primary, keys_dir
        self.records, self.db = records, db
        # Drops the opened (plaintext) records a replicator holds: one user's (called on the
        # store thread), or (None) all.
        self.forget = forget
        # Why this process's keys folder lags the store's log of key events, while it does.
        self.behind = ""

    async def keys_changed_elsewhere(self, detail: str = "") -> None:
        """Another process of a shared store erased users, or replaced their data keys (a
        region node's copies applied under new keys) (`detail`: their ids as a JSON list; ""
        for unknown, or too many to name): the data keys this one holds of them go (a user may
        be back under a new key, which the old would not open), and so does what its
        replicator opened of them. Of unknown users, every key and every opened record goes."""
        users = _users(detail)
        if users is None:
            await self.db.call(self.records.keyring.data_keys.clear)
            self.forget(None)
            return

        def drop() -> None:  # on the store thread, where the replicator opens and seals too
            cache = self.records.keyring.data_keys
            for u in users:
                cache.drop(u)
                self.forget(u)

        await self.db.call(drop)

    def _entry(self, actor: str, reason: str) -> dict[str, Any]:
        return translog.key_event(self.region, actor, self.records.rules.version, reason)

    async def apply(self) -> None:
        """Logs the events not logged yet, and acts on them: a shred, a rekey (even both at
        once, if both were made while the node was stopped). A shred is acted on while the
        events say the key is shredded, whoever logged it: another front end or the node a
        standalone worker works for."""
        keyring, region, store = self.records.keyring, self.region, self.db.store
        cursor = f"key_events:{region}"
        # The log first: a process appends an event to the folder before it logs it, so one
        # sharing this folder is never seen ahead of it.
        done, head = await self.db.call(lambda: (store.cursor(cursor), store.key_event_head(region)))
        events = lifecycle.read_events(self.dir)
        self._hold(_behind(events, done, head))
        new = [e["event"] for e in events[done:]]
        reason = lifecycle.shredded_reason(region, events)
        if (reason or "shredded" in new) and not keyring.shredded:
            keyring.shred(reason or "the region key was shredded")
            self.forget(None)  # nothing opened under the shredded keys stays in memory
            log.warning("%s", reason or f"the key of {region} was shredded")
        rekeyed = not reason and "rekeyed" in new
        if rekeyed:
            keyring.rekeyed()
            log.warning("%s has a new region key; copies sealed to the shredded one are dropped", region)
        elif not reason and keyring.shredded:  # a rekey another process logged before this one read it
            keyring.rekeyed()
            log.warning("%s has a new region key (rekeyed through another process)", region)

        def write() -> str:
            """Logs what the store has not; or why this folder cannot say (nothing written)."""
            logged = store.cursor(cursor)  # another process may have logged them meanwhile
            held = store.key_event_head(region)
            if logged > len(events):  # logged meanwhile: the next `apply` reads the folder again
                return ""
            if why := _behind(events, logged, held):  # other events than these were logged
                return why
            if logged == len(events):
                if held is None or held[0] < logged:  # logged before the digest was kept
                    store.set_key_event_head(region, logged, lifecycle.events_digest(events))
                return ""
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
                store.set_key_event_head(region, len(events), lifecycle.events_digest(events))
                store.notify("keys")  # other front ends of a shared store apply them too
            return ""

        # Nothing else to log: no transaction (a worker asks every second).
        if len(events) > done or (done and (head is None or head[0] < done)):
            self._hold(await self.db.write(write))

    def _hold(self, why: str) -> None:
        """While this folder lacks events the store has logged, or holds others in their place
        (`why`, from `_behind`): opens nothing, and raises KeysBehind. Opens again once it holds
        them all (`apply` then takes the key's state from all of them)."""
        keyring = self.records.keyring
        if not why:
            if self.behind:
                log.warning("the keys folder %s holds every key event the store has logged", self.dir)
                keyring.resume()
                self.behind = ""
            return
        if not self.behind:  # the first time: forget every key held, and say why once
            keyring.suspend(why)
            self.forget(None)
            log.error("%s (keys folder %s)", why, self.dir)
        elif why != self.behind:
            log.error("%s (keys folder %s)", why, self.dir)
        self.behind = keyring.suspended = why
        raise KeysBehind(why)


def _behind(events: list[dict[str, Any]], logged: int, head: Head) -> str:
    """Why a folder holding `events` lacks key events the store has logged (`logged` of them;
    `head`: how many of them it keeps a digest of, and the digest), or ""."""
    if len(events) < max(logged, head[0] if head else 0):
        why = f"this process's keys folder holds {len(events)} key events and the store has logged {logged}"
    elif head is not None and lifecycle.events_digest(events[: head[0]]) != head[1]:
        why = f"the first {head[0]} key events in this process's keys folder are not those the store logged"
    else:
        return ""
    return why + (
        ": another process of this store made key events (a rotation, a retirement, a shred or a "
        "rekey) in a keys folder this one does not share; it opens nothing until its folder holds "
        "them (give every process of the region the same keys folder)"
    )


def _users(detail: str) -> list[str] | None:
    """The users an erasure notice names; None when it names none, or not as it should."""
    try:
        users = json.loads(detail) if detail else None
    except ValueError:
        return None
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        return None
    return users
