"""The replication loop: per destination region, reads the outbox after that region's cursor,
builds each record's sealed copy for that region (`copies`), ships the batch through the
destination's sink, then logs the transfers and advances the cursor in one transaction. Each
destination has its own loop and cursor, so a slow or down region never holds back the
others; each ships only while this worker holds its lease (`lease`), and only copies made
under the rules in force (`batches.RulesMoved`).

Failures: a transient one (unavailable, timeout, throttling, 5xx) is retried with exponential
backoff and jitter until it lands; a permanent one (the destination refuses the copy) sends
that user's copy to the dead-letter table with the reason, logs the transfer as failed, and
the batch goes on. A later version of the same user supersedes its dead letter once it lands
(a copy carries the user's whole projected state); `residency replication retry` re-drives
the current version of each dead-lettered user."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import Histogram
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from residency.replicator.batches import Batches, Prepared, RulesMoved, rules_moved, take_rules
from residency.replicator.destinations import Destination, KeyHold, describe_error, learn_key, statement_key
from residency.replicator.lease import StandDown
from residency.replicator.spread import Spread
from residency.server.config.node import ReplicatorConfig
from residency.server.config.tls import TlsConfig
from residency.server.core.errors import CallerDenied
from residency.server.storage.replication import OutboxItem
from residency.server.storage.roles import WorkerStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records
from residency.v1 import replica_pb2

log = logging.getLogger("residency.replicator")
# Where a batch's time goes, per destination: `prepare` (reading, opening and sealing, on the store
# thread, overlapping the previous batch's shipping), `ship` (retries included) and `commit`.
STEPS = Histogram(
    "residency_replication_batch_seconds",
    "Time of one step of a replication batch (prepare, ship, commit), by destination",
    ["destination", "step"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
KeyState = tuple[str, bytes | None, str | None]  # (why shredded or "", key statement, resend at)


class Refused(Exception):
    """The destination refused a copy for good."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Replicator:
    """Ships the outbox to each destination whose lease this worker holds."""

    def __init__(
        self,
        records: Records,
        db: StoreThread[WorkerStore],
        destinations: list[Destination],
        config: ReplicatorConfig,
        owner: str = "",
        all_regions: list[str] | None = None,
        tls: TlsConfig | None = None,
    ):
        self.records = records
        # Takes the rules another process of a shared store applied (`SharedRules.follow`).
        self.follow_rules: Callable[[], Awaitable[None]] | None = None
        # The CA and trust domain a region's new key must be signed under (None: none is learned).
        self.tls = tls
        self.db = db
        self.destinations = {d.region: d for d in destinations}
        # Every destination of the outbox, including those other workers ship to: an entry
        # is trimmed only once all of them have applied it.
        self.all_regions = all_regions or list(self.destinations)
        self.config = config
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wake = {d.region: asyncio.Event() for d in destinations}
        self.spread = Spread(self.owner, list(self.destinations), config.lease_seconds)
        self.leases = self.spread.leases
        self._tasks: list[asyncio.Task] = []
        # Short tasks started from callbacks (a retry's error note): kept, and awaited at stop.
        self._background: set[asyncio.Task] = set()
        keep = 4 * config.batch_size * max(1, len(destinations))
        self.batches = Batches(records, lambda region: self.leases[region].epoch, keep)

    async def start(self) -> None:
        store = self.db.store  # a destination new to this store is first sent every live record
        await self.db.write(lambda: [store.adopt_destination(r) for r in self.all_regions])
        self._tasks.append(asyncio.create_task(self.spread.keep(self.db, self._wake), name="leases"))
        for d in self.destinations.values():
            self._tasks.append(asyncio.create_task(self._run(d), name=f"replicate-{d.region}"))

    def wake(self) -> None:
        for e in self._wake.values():
            e.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self.batches.forget()
        await self.spread.leave(self.db)
        for d in self.destinations.values():
            await d.sink.close()

    # ---- the loop ---------------------------------------------------------------------

    async def _run(self, d: Destination) -> None:
        wake = self._wake[d.region]
        while True:
            try:
                async with self.leases[d.region].shipping:  # a hand-over waits for the batch
                    shipped = await self._step(d, wake)
                if not shipped:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=self.config.poll_interval)
            except KeyHold as e:
                await self._hold(d, e.reason)
            except RulesMoved as e:  # taken, then prepared again; else wait, not spin
                if not await take_rules(self.follow_rules, self.records, str(e)):
                    await asyncio.sleep(self.config.retry_max)
            except StandDown as e:
                await self.leases[d.region].stood_down(self.db, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=self.config.lease_seconds / 3)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug or a failing store: say so, and try again later
                log.exception("replication to %s failed", d.region)
                await self._note_error(d, describe_error(e))
                await asyncio.sleep(self.config.retry_max)

    async def _step(self, d: Destination, wake: asyncio.Event) -> bool:
        """One batch (or a round of re-driven dead letters); False when there was nothing. The
        wake-up is cleared first, so a StandDown raised here waits for news (a write, a resume,
        a lease taken) instead of spinning on wake-ups that came before it."""
        wake.clear()
        lease = self.leases[d.region]
        # Paused or not is read from the store below: a resume takes effect at once, not at
        # the next lease renewal.
        lease.check(paused_too=False)
        if lease.reread_cursor:
            d.cursor = await self.db.call(self.db.store.cursor, d.region)
            lease.reread_cursor = False
        paused, (held, evidence, resend), redrive, items = await self.db.call(self._poll, d, d.cursor)
        lease.paused = paused
        if paused:  # an operator paused it
            raise StandDown(d.region)
        if evidence is not None and self._new_key(d, evidence):
            # learned by a worker before (this one, before a restart, or another)
            d.use_key(statement_key(d.region, evidence))
        if held:
            return await self._learn_key(d)
        if resend is not None:
            return await self._resend(d, resend)
        if redrive:
            again = await self.db.call(self._prepare_users, d, [u for u, *_ in redrive])
            await self._deliver_and_commit(d, again, advance=False)
            return True
        if not items:
            return False
        batch: Prepared | None = await self.db.call(self._prepare, d, items)
        while batch is not None:
            batch = await self._ship_preparing_next(d, batch)
        return True

    async def _ship_preparing_next(self, d: Destination, batch: Prepared) -> Prepared | None:
        """Ships and commits `batch` while the store thread prepares the next one, so that this
        worker's sealing and the destination's applying overlap. One batch is in flight at a
        time and batches commit in order. The next batch is returned only if it may ship as
        it is: prepared no longer ago than one attempt at shipping may take (`ship_timeout`:
        records, consents and rules as a batch not prepared ahead would see them; after a
        slow or failing destination it is prepared again), under the lease's current hold,
        and the destination, as `batch`'s commit read it, neither paused, nor with its key
        held or replaced, nor with dead letters to re-drive. Else None: `_step` makes a full
        round and prepares again from the cursor."""
        lease = self.leases[d.region]
        lease.check()
        ahead = asyncio.ensure_future(self.db.call(self._next_batch, d, batch.last_sequence))
        try:
            go_on = await self._deliver_and_commit(d, batch, advance=True)
        except BaseException:
            # Not shipped: its copies are dropped (the lease, the key or the cursor changed).
            ahead.add_done_callback(lambda f: f.cancelled() or f.exception())
            ahead.cancel()
            raise
        after = await ahead
        stale = after is not None and time.monotonic() - after.made > self.config.ship_timeout
        return None if stale or not go_on or lease.reread_cursor else after

    def _next_batch(self, d: Destination, after: int) -> Prepared | None:
        paused, (held, evidence, resend), redrive, items = self._poll(d, after)
        if paused or held or resend is not None or redrive or not items or self._new_key(d, evidence):
            return None
        return self._prepare(d, items)

    @staticmethod
    def _new_key(d: Destination, evidence: bytes | None) -> bool:
        """Whether the store names a key for the region other than the one `d` seals to."""
        return evidence is not None and d.keys.recipient.key_id != statement_key(d.region, evidence).key_id

    def _poll(self, d: Destination, after: int) -> tuple[bool, KeyState, list[tuple], list[OutboxItem]]:
        """On the store thread: paused?, the key's state, dead letters, outbox after `after`."""
        store = self.db.store
        keys = store.key_state(d.region)
        if store.is_paused(d.region):
            return True, keys, [], []
        if keys[0] or keys[2] is not None:
            return False, keys, [], []
        redrive = store.dead_letters(d.region, True, self.config.batch_size)
        if redrive:
            return False, keys, redrive, []
        return False, keys, [], store.outbox_after(after, self.config.batch_size)

    async def _hold(self, d: Destination, reason: str) -> None:
        log.warning("replication to %s held: %s", d.region, reason)
        await self.db.write(lambda: self.db.store.set_key_shredded(d.region, reason))
        await self._note_error(d, f"key shredded: {reason}")

    async def _learn_key(self, d: Destination) -> bool:
        try:
            learned = await learn_key(d, self.tls, self.records, self.db)
        except (grpc.aio.AioRpcError, CallerDenied) as e:
            await self._note_error(
                d, f"key shredded; asking {d.region} for its new key failed: {describe_error(e)}"
            )
            return False
        if learned:
            await self._note_error(d, "")
        return learned

    async def _resend(self, d: Destination, after: str) -> bool:
        """One page of every live record's copy, under the region's new key."""
        store = self.db.store
        records = self.records.store
        page = [u for u, _ in await self.db.call(records.live_blobs, after, self.config.batch_size)]
        if not page:
            await self.db.write(lambda: store.set_resend_after(d.region, None))
            return True
        batch = await self.db.call(self._prepare_users, d, page)
        await self._deliver_and_commit(d, batch, advance=False)
        await self.db.write(lambda: store.set_resend_after(d.region, page[-1]))
        return True

    async def _deliver_and_commit(self, d: Destination, batch: Prepared, advance: bool) -> bool:
        """Ships `batch` (projected under the rules in force), then commits it; whether a batch
        prepared meanwhile may follow (see `_commit`)."""
        if self.follow_rules is not None and (moved := await self.db.call(rules_moved, self.db.store, batch)):
            raise RulesMoved(moved)
        if d.max_rate and batch.copies:
            # Paced: each batch waits until the rate allows it, and books its own share.
            now = time.monotonic()
            if d.not_before > now:
                await asyncio.sleep(d.not_before - now)
                self.leases[d.region].check()
            d.not_before = max(d.not_before, now) + len(batch.copies) / d.max_rate
        refused: dict[int, str] = {}
        began = time.perf_counter()
        if batch.copies:
            refused = await self._deliver(d, batch)
            STEPS.labels(d.region, "ship").observe(time.perf_counter() - began)
        began = time.perf_counter()
        go_on = await self.db.write(lambda: self._commit(d, batch, refused, advance))
        STEPS.labels(d.region, "commit").observe(time.perf_counter() - began)
        if advance:
            d.cursor = batch.last_sequence
        # A refusal (say, copies the region cannot verify) stays in status as the reason until
        # a batch lands whole: the dead letters say who, this says why.
        error = f"refused: {next(iter(refused.values()))}" if refused else ""
        if error != d.last_error:
            await self._note_error(d, error)
        return go_on

    async def _deliver(self, d: Destination, batch: Prepared) -> dict[int, str]:
        """Ships the batch's copies; returns the refused ones (index to reason)."""
        copies, mark = batch.copies, batch.high_water
        try:
            await self._ship(d, copies, mark)
            return {}
        except Refused as e:
            if len(copies) == 1:
                return {0: e.reason}
        # Somebody in the batch is refused: find who, one copy at a time.
        refused = {}
        for i, c in enumerate(copies):
            try:
                await self._ship(d, [c], mark)
            except Refused as e:
                refused[i] = e.reason
        return refused

    async def _ship(
        self, d: Destination, copies: list[replica_pb2.SealedCopy], mark: replica_pb2.HighWater
    ) -> None:
        def note(state: RetryCallState) -> None:
            e = state.outcome.exception() if state.outcome else None
            error = describe_error(e)
            log.warning("replication to %s failed (%s); retrying", d.region, error)
            if error != d.last_error:
                d.last_error = error
                task = asyncio.get_running_loop().create_task(self._note_error(d, error))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(
                lambda e: isinstance(e, Exception) and not isinstance(e, Refused | StandDown | KeyHold)
            ),
            wait=wait_exponential_jitter(initial=self.config.retry_initial, max=self.config.retry_max),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                fence = self.leases[d.region].fence(mark.lease_epoch)
                try:
                    await d.sink.apply(self.records.region, copies, mark, fence)
                except Exception as e:
                    held = d.sink.key_shredded(e)
                    if held is not None:
                        raise KeyHold(held) from e
                    reason = d.sink.permanent(e)
                    if reason is not None:
                        raise Refused(reason) from e
                    raise

    async def _note_error(self, d: Destination, error: str) -> None:
        d.last_error = error
        with contextlib.suppress(Exception):
            await self.db.write(lambda: self.db.store.set_last_error(d.region, error))

    def _commit(self, d: Destination, batch: Prepared, refused: dict[int, str], advance: bool) -> bool:
        """In the batch's transaction: its log entries, dead letters and cursor, if the lease is
        still this worker's under the epoch the batch was made under. Returns whether the
        destination, as the store has it now, lets a batch prepared meanwhile follow (not
        paused, its key neither held nor replaced, no dead letters to re-drive)."""
        store = self.db.store
        now = store.now()
        self.leases[d.region].confirm(store, now, batch.high_water.lease_epoch)
        entries = batch.entries
        if refused:
            entries = list(entries)
            for i, reason in refused.items():
                entries[i] = {**entries[i], "outcome": "failed", "reason": f"{d.region} refused: {reason}"}
            store.dead_letter(
                d.region,
                [(batch.copies[i].user_id, batch.copies[i].version, r) for i, r in refused.items()],
                now,
            )
        if entries:
            store.log_append(entries)
        if store.dead_letters(d.region, limit=1):
            store.dead_letters_superseded(
                d.region, [(c.user_id, c.version) for i, c in enumerate(batch.copies) if i not in refused]
            )
        if advance:
            store.set_cursor(d.region, batch.last_sequence)
            store.outbox_trim_below(self.all_regions)
        store.add_copies_sent(d.region, len(batch.copies) - len(refused))
        shredded, evidence, resend = store.key_state(d.region)
        return not (
            store.is_paused(d.region)
            or shredded
            or resend is not None
            or self._new_key(d, evidence)
            or store.dead_letters(d.region, True, 1)
        )

    # ---- runs on the store thread -----------------------------------------------------

    def _prepare(self, d: Destination, items: list[OutboxItem]) -> Prepared:
        batch = self.batches.of_outbox(d, items)
        STEPS.labels(d.region, "prepare").observe(time.monotonic() - batch.made)
        return batch

    def _prepare_users(self, d: Destination, user_ids: list[str]) -> Prepared:
        batch, gone = self.batches.of_users(d, user_ids)
        STEPS.labels(d.region, "prepare").observe(time.monotonic() - batch.made)
        if gone:  # nothing left to send: the dead letter has nothing to re-drive
            self.db.store.dead_letters_superseded(d.region, [(u, 2**62) for u in gone])
        return batch

    def forget(self, user_id: str | None = None) -> None:
        """Drops opened (plaintext) records: one user's, on erasure (on the store thread, as also
        the user's copy keys: a user registered again is never sealed under the erased one's),
        or every one (a key shredded, the worker stopping)."""
        self.batches.forget(user_id)
        if user_id is not None:
            for d in self.destinations.values():
                d.keys.forget(user_id)
