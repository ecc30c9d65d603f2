"""Rotating a region's blind-index key (issue 18): a new key version, the index rebuilt under
it in the background page by page while writes index under both versions and finds use the
old one, then the switch, which drops the old rows. Logged (kind `key_event`) at the start and
the end, with a progress line in the node's log every `PAGE` records."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from residency.server.core.errors import FailedPrecondition
from residency.server.storage.thread import StoreThread
from residency.server.vault.lookup import BlindIndex

log = logging.getLogger("residency.keys")
PAGE = 200
# How long a rebuild waits after a failure (the key service unreachable, the disk full).
RETRY_SECONDS = 5.0
# Records a key event: (actor, event, detail), as `KeyLifecycle` does for its acts.
Record = Callable[[str, str, str], Awaitable[None]]


class IndexRebuild:
    """The node's index-key rotation, at most one at a time, and how far its rebuild got."""

    def __init__(
        self,
        index: BlindIndex,
        db: StoreThread[Any],
        record: Record,
        current: Callable[[], Awaitable[None]] | None = None,
    ):
        self.index, self.db, self.record = index, db, record
        # Before a rotation: other processes' key events applied (`KeyLifecycle._current`).
        self.current = current
        self.region = index.records.keyring.region
        # The version being built (0: none), and records indexed of those to index.
        self.version = self.done = self.total = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def _keys(self) -> Any:
        return self.index.records.keyring.index_keys

    async def active_version(self) -> int:
        """The active index key version (0: none yet, the region's key was shredded, or this
        process's keys folder is behind the store's key events)."""
        keyring = self.index.records.keyring
        if keyring.shredded or keyring.suspended:
            return 0
        return (await self.db.call(self._keys.versions))[0]

    async def rotate(self, actor: str, from_version: int) -> dict[str, Any]:
        if not self.index.fields:
            raise FailedPrecondition("the schema has no lookup field: there is no index to rotate the key of")
        if self.current is not None:
            await self.current()

        def turn() -> tuple[int, int]:
            active, building = self._keys.versions()
            if building:
                raise FailedPrecondition(
                    f"the index key of {self.region} is being rotated to version {building}; wait "
                    "until its rebuild completes (`residency status` shows its progress)"
                )
            if from_version != active:
                raise FailedPrecondition(
                    f"the index key of {self.region} is at version {active}, not {from_version}: it "
                    f"was rotated since, or the version was mistyped; nothing was rotated"
                )
            return self._keys.start_rotation(), self.index.records.store.counts()[0]

        # On the store thread: every write after the new version is indexed under it too.
        version, total = await self.db.call(turn)
        await self.record(actor, "index_rotated", f"new index key version {version}; rebuilding")
        self._start(actor, version, total)
        return {"region": self.region, "version": version, "records_to_index": total}

    async def resume(self) -> None:
        """At start: drops the rows of versions no longer in `index.key` (a crash between a
        switch and its clean-up), and goes on with a rebuild a stop cut short. Rows of a key
        the file does not hold (`BlindIndex.unknown_rows`) are all dropped and a rebuild
        starts: they would never match."""
        if not self.index.fields or self.index.records.keyring.shredded:
            return  # a shredded region's index keys went with its key; a rekey starts anew
        active, building = await self.db.call(self._keys.versions)
        store = self.index.records.store
        if active:
            await self.db.write(lambda: store.index_keep_versions([v for v in (active, building) if v]))
        if await self.db.call(self.index.unknown_rows):

            def anew() -> int:
                store.index_drop_all()
                return building or self._keys.start_rotation()

            building = await self.db.write(anew)
            log.warning("index rows of an unknown key dropped; rebuilding under index key %d", building)
        if building:
            total = (await self.db.call(self.index.records.store.counts))[0]
            self._start("node", building, total)

    def _start(self, actor: str, version: int, total: int) -> None:
        self.version, self.done, self.total = version, 0, total
        self._task = asyncio.create_task(self._run(actor, version), name="index-rebuild")

    async def _run(self, actor: str, version: int) -> None:
        after = ""
        while True:
            try:

                def page(after: str = after) -> tuple[str, int]:
                    return self.index.rebuild_page(version, after, PAGE)

                after, n = await self.db.write(page, weight=PAGE)
            except Exception as e:  # logged by kind only (a message could quote data); retried later
                log.warning("index key %d: rebuild paused (%s); retrying", version, type(e).__name__)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if n:
                self.done += n
                self.total = max(self.total, self.done)
                log.info("index key %d: %d of %d records indexed", version, self.done, self.total)
            if not after:
                break
        dropped = await self.db.write(self.index.switch)
        self.version = 0
        await self.record(
            actor, "index_rebuilt", f"index key version {version} active; {dropped} old rows dropped"
        )
        log.info(
            "index key %d active: %d records indexed, the old version's rows dropped", version, self.done
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
