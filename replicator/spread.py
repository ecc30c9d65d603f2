"""Workers share destinations evenly: each announces itself in the store (table `workers`,
renewed with its leases), and takes a free lease only while it holds less than its fair
share, ceil(destinations / live workers), or while no other live worker that could take it
is under its own share; one holding more than its share, while another is under, hands one
lease over per round. `fair_share`, `may_take` and `hand_over_one` decide; `Spread` runs
the rounds. A lease never stays unheld: only a live worker under its share (which takes
what is free) holds the others back, and a dead worker stops counting once its presence
expires, a lease later at most."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from residency.replicator.lease import Lease
from residency.server.storage.roles import WorkerStore
from residency.server.storage.thread import StoreThread

log = logging.getLogger("residency.replicator")


@dataclass(frozen=True, slots=True)
class Worker:
    """A live worker as the store names it: the destinations it ships to, the leases it holds."""

    owner: str
    regions: frozenset[str]
    held: int


def fair_share(w: Worker, live: int) -> int:
    return -(-len(w.regions) // max(live, 1))


def may_take(me: Worker, region: str, others: list[Worker]) -> bool:
    """Whether `me` may take the free lease on `region`."""
    live = len(others) + 1
    if me.held < fair_share(me, live):
        return True
    return not any(region in w.regions and w.held < fair_share(w, live) for w in others)


def hand_over_one(me: Worker, mine: list[str], others: list[Worker]) -> str | None:
    """The lease (of `mine`, those `me` holds) that `me` hands over this round, if any: one
    that a worker under its share can take."""
    live = len(others) + 1
    if len(mine) <= fair_share(me, live):
        return None
    for region in sorted(mine, reverse=True):
        if any(region in w.regions and w.held < fair_share(w, live) for w in others):
            return region
    return None


class Spread:
    """One worker's leases, taken, renewed and handed over together, every third of a lease."""

    def __init__(self, owner: str, regions: list[str], seconds: float):
        self.owner, self.seconds = owner, seconds
        self.leases = {r: Lease(r, owner, seconds) for r in regions}
        # The lease being handed over (it waits for a batch under way), and the task doing it.
        self._handing: tuple[str, asyncio.Task] | None = None

    async def keep(self, db: StoreThread[WorkerStore], wakes: dict[str, asyncio.Event]) -> None:
        while True:
            await self.round(db, wakes)
            await asyncio.sleep(self.seconds / 3)

    async def round(self, db: StoreThread[WorkerStore], wakes: dict[str, asyncio.Event]) -> None:
        others = await self._announce(db)
        busy = self._handing[0] if self._handing else None
        held = [lease for lease in self.leases.values() if lease.held]
        # Renewal is as before, every held lease at once.
        await asyncio.gather(*(lease.renew(db, wakes[lease.region]) for lease in held))
        for r, lease in sorted(self.leases.items()):
            # One at a time: a lease taken counts towards this worker's share for the next.
            if not lease.held and r != busy and (others is None or may_take(self._me(), r, others)):
                await lease.renew(db, wakes[r])
        mine = [r for r, lease in self.leases.items() if lease.held]
        if others is None or self._handing is not None:
            return
        region = hand_over_one(self._me(), mine, others)
        if region is not None:
            share = fair_share(self._me(), len(others) + 1)
            log.info("%s hands %s over (holds %d, fair share %d)", self.owner, region, len(mine), share)
            self._handing = region, asyncio.create_task(self._hand_over(db, self.leases[region]))

    def _me(self) -> Worker:
        return Worker(self.owner, frozenset(self.leases), sum(lease.held for lease in self.leases.values()))

    async def _announce(self, db: StoreThread[WorkerStore]) -> list[Worker] | None:
        """Renews this worker's presence; the other live workers, or None if the store failed
        (then free leases are taken as if this worker were alone: never one left unheld)."""
        store, regions, ttl = db.store, list(self.leases), self.seconds

        def announce() -> list[tuple[str, list[str], int]]:
            now = store.now()
            store.worker_present(self.owner, regions, now, ttl)
            # Twice a lease ahead: room for clocks a little apart, not for rows nobody renews.
            return store.live_workers(now, now + 2 * ttl)

        try:
            rows = await db.write(announce)
        except Exception as e:
            log.warning("worker presence not renewed: %r", e)
            return None
        return [Worker(o, frozenset(r), n) for o, r, n in rows if o != self.owner]

    async def _hand_over(self, db: StoreThread[WorkerStore], lease: Lease) -> None:
        try:
            await lease.hand_over(db)
        finally:
            self._handing = None

    async def leave(self, db: StoreThread[WorkerStore]) -> None:
        """The worker stops (its replication loops already have): its leases are released and
        its presence ends, so the others take its share at once. Every lease of this owner is
        released, whatever this worker last heard: a take the store committed may have had its
        answer cut off by the stop."""
        if self._handing is not None:  # ends at once: no batch is under way any more
            with contextlib.suppress(Exception):
                await self._handing[1]
        store, regions = db.store, list(self.leases)
        for lease in self.leases.values():
            lease.held, lease.until = False, 0.0

        def leave() -> None:
            for region in regions:
                store.lease_release(region, self.owner)
            store.worker_leave(self.owner)

        with contextlib.suppress(Exception):
            await db.write(leave)
