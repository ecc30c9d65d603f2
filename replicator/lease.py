"""Leases: several workers (processes) may share one store, and a worker ships to a
destination only while it holds that destination's lease (renewed every third of its life)
and commits a batch only if it still holds it, so a worker that dies or stalls is replaced
once its lease expires and can never move a cursor after that."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from residency.server.storage.replication import LeaseStore
from residency.server.storage.roles import WorkerStore
from residency.server.storage.thread import StoreThread

log = logging.getLogger("residency.replicator")


class StandDown(Exception):
    """This worker may not ship to the destination now: its lease is lost or expiring, or
    the destination is paused."""


class Lease:
    """This worker's hold on one destination's lease, as last taken or renewed."""

    def __init__(self, region: str, owner: str, seconds: float):
        self.region, self.owner, self.seconds = region, owner, seconds
        self.held = False
        self.paused = False
        # monotonic time until which this worker's lease is surely valid
        self.until = 0.0
        # Another worker may have moved the cursor while this one did not hold the lease: it
        # is read again after taking the lease or standing down.
        self.reread_cursor = True

    async def keep(self, db: StoreThread[WorkerStore], wake: asyncio.Event) -> None:
        """Takes or renews the lease every third of its life, for as long as it runs; sets
        `wake` whenever the destination may be shipped to."""
        store = db.store
        while True:
            began = time.monotonic()
            try:
                held, paused = await db.write(
                    lambda: store.lease_take(self.region, self.owner, time.time(), self.seconds)
                )
            except Exception as e:  # the store is busy or failing: not holding is the safe view
                log.warning("lease on %s not renewed: %r", self.region, e)
                held, paused = False, self.paused
            if held and not self.held:
                log.info("%s took the lease on %s", self.owner, self.region)
                self.reread_cursor = True
            self.held, self.paused = held, paused
            self.until = began + self.seconds if held else 0.0
            if held and not paused:
                wake.set()
            await asyncio.sleep(self.seconds / 3)

    def check(self, paused_too: bool = True) -> None:
        """Ship only with at least half a lease left: a shipping call (at most
        `ship_timeout`, half a lease) then ends before anyone else may take over."""
        if (paused_too and self.paused) or not self.held:
            raise StandDown(self.region)
        if time.monotonic() > self.until - self.seconds / 2:
            raise StandDown(self.region)

    def confirm(self, store: LeaseStore, now: float) -> None:
        """In the transaction that commits a batch: the lease is still this worker's."""
        if not store.lease_held(self.region, self.owner, now):
            raise StandDown(self.region)  # another worker owns the cursor now; it ships again

    async def hand_over(self, db: StoreThread[WorkerStore]) -> None:
        """Releases a held lease at once rather than after expiry."""
        if self.held:
            with contextlib.suppress(Exception):
                await db.write(lambda: db.store.lease_release(self.region, self.owner))
