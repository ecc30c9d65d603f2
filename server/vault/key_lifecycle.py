"""A node's key lifecycle: rotate, rewrap, retire, shred and rekey its keys, one act at a time,
each logged (kind `key_event`) naming the operator. A running node does them itself
(AdminService), so it switches at once; `residency keys ... --config` does the same for a
stopped node.

Every step that changes the keyring runs on the store thread, between write batches: after a
rotation's switch no write can still wrap a new data key under the old version (a question
that changes nothing, such as the provider's newest version, is asked off it). A rewrap reads
a page, rewraps it and writes it back in separate steps (writes go on in between), so each
row is swapped only if it still holds the key that was read (`swap_data_keys`).

Other front ends of a shared store wrap new data keys too, each under a wrapping key of its
own. A rotation and a retire renew the store's wrapping-key generation (`renew_wrapping_keys`)
in a transaction of their own, after the provider's new version exists: from its commit on, a
front end's batch under an older wrapping key writes nothing and runs again under a new one of
the newest version. So a rotation's rewrap, which reads after that commit, finds every data key
under an old version, and a retire's check is not outdated by the time it retires."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from residency.server.core.errors import FailedPrecondition, InvalidRecord, KeyUnavailable
from residency.server.keys import lifecycle
from residency.server.keys.keyring import WrappingKey
from residency.server.keys.providers import KeyProvider
from residency.server.keys.region import RecipientKey
from residency.server.storage.thread import StoreThread
from residency.server.vault.index_rebuild import IndexRebuild
from residency.server.vault.key_events import KeyEvents, KeyEventStore

PAGE = 500
# Called with (data keys done, data keys in all) as a rewrap goes on.
Progress = Callable[[int, int], None]


class KeyringStore(KeyEventStore, Protocol):
    """What the key acts use of the node's store: its keyring rows and the log."""

    def put_wrapping_key(self, id: str, wrapped: bytes) -> None: ...
    def renew_wrapping_keys(self) -> int: ...
    def key_generation(self) -> int: ...
    def count_data_keys_not_under(self, wrapping_key: str) -> int: ...
    def data_keys_not_under(
        self, wrapping_key: str, after_user: str, limit: int
    ) -> list[tuple[str, str, bytes, bytes]]: ...
    def swap_data_keys(self, rows: list[tuple[str, bytes, str, bytes]]) -> int: ...
    def data_keys_per_wrapping_key(self) -> list[tuple[str, bytes, int]]: ...
    def delete_unused_wrapping_keys(self) -> int: ...


class KeyLifecycle:
    """The key acts of one node (its region, keyring, key folder and store), one at a time."""

    def __init__(self, events: KeyEvents, db: StoreThread[KeyringStore], log_keys: KeyProvider, kem: str):
        self.events, self.db, self.log_keys, self.kem = events, db, log_keys, kem
        self.region, self.dir = events.region, events.dir
        self.keyring = events.records.keyring
        # Two operators at once, or an act and a rewrap: one waits for the other.
        self._lock = asyncio.Lock()
        # The blind-index key's rotation and rebuild (issue 18).
        self.index = IndexRebuild(events.records.index, db, self._record, self._current)

    @property
    def provider(self) -> KeyProvider:
        return self.keyring.provider

    def newest_version(self) -> str:
        """The provider's newest key version ("" once shredded, or where the service names none)."""
        return "" if self.keyring.shredded else self.provider.newest_version()

    def region_key_id(self) -> str:
        """The id of the region key (`region.pub`), what a shred must name."""
        try:
            return RecipientKey.load(self.region, self.dir / "region.pub").key_id
        except KeyUnavailable:  # no region key (yet): nothing to name
            return ""

    async def _current(self) -> None:
        """Before a key command: the events of other processes applied, and refused (KeysBehind)
        while this folder lacks some: the command's own event would then be counted in their
        place, and never logged. Refused too once the key is shredded."""
        await self.events.apply()
        self.keyring.check()

    async def _record(self, actor: str, event: str, detail: str) -> None:
        """Adds the event to `keyring.json` and applies it: logged before the call returns."""
        await asyncio.to_thread(lifecycle.append_event, self.dir, event, actor, detail)
        await self.events.apply()

    async def rotate(self, actor: str, from_version: str, progress: Progress | None = None) -> dict[str, Any]:
        """A new key version, if the newest is still `from_version` (what the caller saw): from
        the switch on every new data key is wrapped under it; then every data key is rewrapped."""
        async with self._lock:
            await self._current()
            newest = await asyncio.to_thread(self.provider.newest_version)
            if from_version != newest:
                raise FailedPrecondition(
                    f"the key of {self.region} is at version {newest or '(unnamed)'}, not "
                    f"{from_version or '(none given)'}: it was rotated since, or the version was "
                    f"mistyped; nothing was rotated (rotate from {newest or '(unnamed)'} if a new "
                    "version is still wanted)"
                )

            version = await self.db.call(
                lambda: lifecycle.rotate(self.region, self.provider, self.dir, log_keys=self.log_keys)
            )
            new, generation = await self._renew()
            await self._record(actor, "rotated", f"new key version {version}")
            done = await self._rewrap(new, generation, progress)
            await self._record(actor, "rewrapped", f"{done} data keys rewrapped under {version}")
            return {"region": self.region, "version": version, "data_keys_rewrapped": done}

    async def rewrap(self, actor: str, progress: Progress | None = None) -> dict[str, Any]:
        """Every data key under a fresh wrapping key of the newest version (after a rotation cut
        short, before a retire)."""
        async with self._lock:
            await self._current()
            generation = await self.db.call(self.db.store.key_generation)
            new = await self.db.call(self._fresh, generation)
            version = await asyncio.to_thread(self.provider.newest_version)
            done = await self._rewrap(new, generation, progress)
            under = f" under {version}" if version else ""
            await self._record(actor, "rewrapped", f"{done} data keys rewrapped{under}")
            return {"region": self.region, "version": version, "data_keys_rewrapped": done}

    async def _renew(self) -> tuple[WrappingKey, int]:
        """A new wrapping-key generation, committed (every process's next batch of new data keys
        goes under a wrapping key of the provider's newest version), and this process's new
        wrapping key in it."""
        generation = await self.db.write(self.db.store.renew_wrapping_keys)
        return await self.db.call(self._fresh, generation), generation

    def _fresh(self, generation: int) -> WrappingKey:
        self.keyring.follow(generation)
        return self.keyring.new_wrapping_key()

    async def _rewrap(self, new: WrappingKey, generation: int, progress: Progress | None) -> int:
        store, keyring = self.db.store, self.keyring
        total = await self.db.call(store.count_data_keys_not_under, new.id)
        done, after = 0, ""
        if progress:
            progress(done, total)
        while True:

            def read(after: str = after) -> list[tuple[str, bytes, str, bytes]]:
                return lifecycle.rewrap_page(keyring, store.data_keys_not_under(new.id, after, PAGE), new)

            rows = await self.db.call(read)
            if not rows:
                return done

            def swap(rows: list[tuple[str, bytes, str, bytes]] = rows, done: int = done) -> int:
                if store.key_generation() != generation:
                    raise FailedPrecondition(
                        f"the keys of {self.region} were rotated or retired meanwhile (through "
                        f"another front end?): this rewrap stopped after {done} data keys; run "
                        "`residency keys rewrap` again"
                    )
                store.put_wrapping_key(new.id, new.wrapped)
                return store.swap_data_keys(rows)

            done += await self.db.write(swap, weight=len(rows))
            after = rows[-1][0]
            if progress:
                progress(min(done, total), max(done, total))

    async def retire(self, actor: str) -> dict[str, Any]:
        """Old key versions stop unwrapping; refused while any data key is under one."""
        async with self._lock:
            await self._current()
            store = self.db.store

            # The version the check and the retire go by, read first: one another front end's
            # rotation makes meanwhile is newer, and stays (its rewrap may still be under way).
            def read_newest() -> str:
                self.provider.refresh()
                return self.provider.newest_version()

            newest = await self.db.call(read_newest)
            # New data keys go under that version or a newer one from here on, whoever made it
            # (a version made in the key service's own console included), through whichever
            # front end, so none lands under an older one between this check and the retire.
            await self._renew()
            old = await self.db.call(
                lambda: self.keyring.old_versions(store.data_keys_per_wrapping_key(), newest)
            )
            if old:
                under = ", ".join(f"{n} under {v}" for v, n in sorted(old.items()))
                raise FailedPrecondition(
                    f"{sum(old.values())} data keys of {self.region} are still under key versions "
                    f"older than {newest} ({under}): retiring would make them unreadable. "
                    "Rewrap first (`residency keys rewrap`), then retire; nothing was retired"
                )
            dropped = await self.db.write(store.delete_unused_wrapping_keys)
            await self.db.call(
                lambda: lifecycle.retire(
                    self.region, self.provider, self.dir, log_keys=self.log_keys, keep=newest
                )
            )
            await self._record(actor, "retired", f"old key versions retired; {dropped} wrapping keys deleted")
            return {"region": self.region, "version": newest, "wrapping_keys_deleted": dropped}

    async def shred(self, actor: str, key_id: str, reason: str) -> dict[str, Any]:
        """Destroys the region key `key_id` names (it must be the one the node holds) and the
        provider's key: every copy and record sealed for this region becomes unreadable."""
        try:  # logged after the key is gone: a reason the log cannot hold must not get that far
            reason.encode()
        except UnicodeEncodeError:
            raise InvalidRecord([("reason", "is not text (bytes that are not UTF-8)")]) from None
        async with self._lock:
            await self.events.apply()  # this folder behind the store's events: refused
            if why := lifecycle.shredded_reason(self.region, lifecycle.read_events(self.dir)):
                raise FailedPrecondition(
                    f"{why}; nothing more to shred (`residency keys rekey` makes a new key)"
                )
            held = self.region_key_id()
            if key_id != held:
                raise FailedPrecondition(
                    f"the region key of {self.region} is {held or '(none)'}, not "
                    f"{key_id or '(none given)'}: a shred names the key it destroys; nothing was destroyed"
                )
            await self.db.call(lifecycle.shred, self.region, self.provider, self.dir)
            await self._record(actor, "shredded", reason or "key compromised")
            return {"region": self.region, "key_id": key_id}

    async def rekey(self, actor: str) -> dict[str, Any]:
        """After a shred: a new region key pair; a region node drops the copies sealed to the
        shredded one, and its primary learns the new key and sends them again."""
        async with self._lock:
            await self.events.apply()  # this folder behind the store's events: refused
            if self.events.primary:
                raise FailedPrecondition(
                    "rekey is for a region node's key (copies are sealed to it); "
                    f"{self.region} is the primary's region"
                )
            key = await self.db.call(lifecycle.rekey, self.region, self.provider, self.dir, self.kem)
            await self._record(actor, "rekeyed", f"new region key {key.key_id} ({self.kem})")
            return {"region": self.region, "key_id": key.key_id, "kem": self.kem}
