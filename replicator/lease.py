"""Leases: several workers (processes) may share one store, and a worker ships to a
destination only while it holds that destination's lease (renewed every third of its life)
and commits a batch only if it still holds it, so a worker that dies or stalls is replaced
once its lease expires and can never move a cursor after that.

A lease alone does not fence a stalled worker's requests already under way, so each hold has
an epoch (raised in the store whenever the lease passes on) that every batch carries, and each
attempt at shipping a batch is bounded by a `Fence`: an overall deadline a quarter of a lease
before the lease can pass, checked before every request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from residency.server.storage.replication import LeaseStore
from residency.server.storage.roles import WorkerStore
from residency.server.storage.thread import StoreThread

log = logging.getLogger("residency.replicator")


class StandDown(Exception):
    """This worker may not ship to the destination now: its lease is lost or expiring, the
    destination is paused, or it has taken a batch under a higher lease epoch (`seen`)."""

    def __init__(self, where: str, seen: int = 0):
        super().__init__(where)
        self.seen = seen


class Lease:
    """This worker's hold on one destination's lease, as last taken or renewed."""

    def __init__(self, region: str, owner: str, seconds: float):
        self.region, self.owner, self.seconds = region, owner, seconds
        self.held = False
        self.paused = False
        # The store's epoch of this worker's current hold (0 before the first).
        self.epoch = 0
        # monotonic time until which this worker's lease is surely valid
        self.until = 0.0
        # Another worker may have moved the cursor while this one did not hold the lease: it
        # is read again after taking the lease or standing down.
        self.reread_cursor = True
        # Held by the replication loop for the whole of a batch (prepare, ship, commit), so
        # that `hand_over` releases the lease only between batches.
        self.shipping = asyncio.Lock()

    async def renew(self, db: StoreThread[WorkerStore], wake: asyncio.Event) -> None:
        """Takes or renews the lease (`Spread` calls it every third of its life, and for a free
        lease only while this worker may take it); sets `wake` if the destination may be
        shipped to."""
        store = db.store
        began = time.monotonic()
        try:
            new_hold = self.epoch == 0  # this process has not held it yet
            held, paused, epoch = await db.write(
                lambda: store.lease_take(self.region, self.owner, store.now(), self.seconds, new_hold)
            )
        except Exception as e:  # the store is busy or failing: not holding is the safe view
            log.warning("lease on %s not renewed: %r", self.region, e)
            held, paused, epoch = False, self.paused, self.epoch
        if held and (not self.held or epoch != self.epoch):
            log.info("%s took the lease on %s (epoch %d)", self.owner, self.region, epoch)
            self.reread_cursor = True
            self.epoch = epoch
        self.held, self.paused = held, paused
        self.until = began + self.seconds if held else 0.0
        if held and not paused:
            wake.set()

    def check(self, paused_too: bool = True) -> None:
        """Ship only with at least half a lease left: a shipping call (at most
        `ship_timeout`, half a lease) then ends before anyone else may take over."""
        if (paused_too and self.paused) or not self.held:
            raise StandDown(self.region)
        if time.monotonic() > self.until - self.seconds / 2:
            raise StandDown(self.region)

    def fence(self, epoch: int) -> Fence:
        """The bound of one attempt at shipping a batch prepared under `epoch`."""
        self.check()
        if epoch != self.epoch:  # the lease was lost and taken again since the batch was made
            raise StandDown(self.region)
        return Fence(self, epoch, self.until - self.seconds / 4)

    async def stood_down(self, db: StoreThread[WorkerStore], e: StandDown) -> None:
        """After a StandDown: the cursor is read again before the next batch. If the
        destination has taken batches under an epoch above this hold's while the store still
        names this worker as holder under it, the store's epochs went back (a store restored
        from a backup): no worker of this store could ship there again, so the hold's epoch
        moves above the destination's (a stale worker's move fails: it holds nothing)."""
        self.reread_cursor = True
        if not (self.held and self.epoch < e.seen < 2**63 - 1):
            return
        store, epoch = db.store, self.epoch
        raised = await db.write(
            lambda: store.lease_epoch_above(self.region, self.owner, epoch, e.seen, store.now())
        )
        if raised:
            log.warning(
                "%s has taken batches under lease epoch %d, above this store's %d (restored from a "
                "backup?): this worker's lease moves to epoch %d",
                self.region,
                e.seen,
                epoch,
                raised,
            )
            self.epoch = raised

    def confirm(self, store: LeaseStore, now: float, epoch: int | None = None) -> None:
        """In the transaction that commits a batch: the lease is still this worker's, under
        the epoch the batch was made and shipped under (default: the current hold's)."""
        if not store.lease_held(self.region, self.owner, now, self.epoch if epoch is None else epoch):
            raise StandDown(self.region)  # another worker owns the cursor now; it ships again

    async def hand_over(self, db: StoreThread[WorkerStore]) -> None:
        """Releases a held lease at once rather than after expiry, for a worker under its fair
        share to take (`spread`), never in the middle of a batch: from here `check` and every
        `Fence` refuse, so a batch under way ends at its next request (StandDown, not
        committed) or commits what already landed (`confirm` passes: the store names this
        worker until the release); only then is the lease released. The next holder takes it
        under a higher epoch and reads the cursor again: nothing is lost, and what it sends
        again applies idempotently. The fence alone would not do: it bounds a batch by the
        lease's expiry, which a release moves ahead."""
        held, self.held, self.until = self.held, False, 0.0
        async with self.shipping:
            if held:
                with contextlib.suppress(Exception):
                    await db.write(lambda: db.store.lease_release(self.region, self.owner))


@dataclass(frozen=True, slots=True)
class Fence:
    """What one attempt at shipping a batch may do: its lease epoch, and the monotonic time by
    which its last request must have ended. The deadline is a quarter of a lease before the
    lease can pass to another worker (`Lease.check` leaves at least half when shipping
    starts), so whatever this worker sends lands before the next holder's first request."""

    lease: Lease
    epoch: int
    deadline: float

    def remaining(self) -> float:
        """Seconds left, checked just before each request; StandDown once the deadline has
        passed (a worker that was stopped, say by SIGSTOP, finds out here when it resumes) or
        the lease, as last renewed, is no longer held under this epoch."""
        left = self.deadline - time.monotonic()
        if left <= 0 or not self.lease.held or self.lease.epoch != self.epoch:
            raise StandDown(self.lease.region)
        return left
