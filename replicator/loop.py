"""The replication loop: per destination region, reads the outbox after that region's
cursor, builds each record's sealed copy for that region (`copies`), ships the batch
through the destination's sink, then logs the transfers and advances the cursor in one
transaction. Each destination has its own loop and cursor, so a slow or down region never
holds back the others; each ships only while this worker holds its lease (`lease`).

Failures: a transient one (unavailable, timeout, throttling, 5xx) is retried with
exponential backoff and jitter until it lands; a permanent one (the destination refuses
the copy) sends that user's copy to the dead-letter table with the reason, logs the
transfer as failed, and the batch goes on, so one refused copy never blocks other users.
A later version of the same user supersedes its dead letter once it lands (a copy carries
the user's whole projected state, so the newest version is all a destination needs);
`residency replication retry` re-drives the current version of each dead-lettered user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from residency.replicator.copies import build_copy, erased_copy
from residency.replicator.destinations import Destination, KeyHold, describe_error, learn_key, statement_key
from residency.replicator.lease import StandDown
from residency.replicator.spread import Spread
from residency.server.config.node import ReplicatorConfig
from residency.server.config.tls import TlsConfig
from residency.server.core.errors import CallerDenied
from residency.server.core.rules import Permits
from residency.server.storage.records import Row
from residency.server.storage.replication import OutboxItem
from residency.server.storage.roles import WorkerStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Opened, Records
from residency.v1 import replica_pb2

log = logging.getLogger("residency.replicator")
# (why the region's key is shredded or "", its learned key statement, where re-sending is at)
KeyState = tuple[str, bytes | None, str | None]


class Refused(Exception):
    """The destination refused a copy for good."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Prepared:
    copies: list[replica_pb2.SealedCopy]
    entries: list[dict[str, Any]]
    last_sequence: int
    # The home's signed statement of the highest version it had issued (none in the batch is above).
    high_water: replica_pb2.HighWater


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
        # Opened records, kept for the other destinations' batches of the same changes: one open each.
        self._opened: dict[tuple[str, int], Opened] = {}
        # The store's highest record version when last read: read again for a batch with one above it.
        self._high_water = 0

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
        self._opened.clear()
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
        """One batch (or a round of re-driven dead letters); False when there was nothing.

        The wake-up is cleared first, so a StandDown raised here waits for news (a write, a
        resume, a lease taken) instead of spinning on wake-ups that came before it."""
        wake.clear()
        lease = self.leases[d.region]
        # Paused or not is read from the store below: a resume takes effect at once, not at
        # the next lease renewal.
        lease.check(paused_too=False)
        if lease.reread_cursor:
            d.cursor = await self.db.call(self.db.store.cursor, d.region)
            lease.reread_cursor = False
        paused, (held, evidence, resend), redrive, items = await self.db.call(self._poll, d)
        lease.paused = paused
        if paused:  # an operator paused it
            raise StandDown(d.region)
        if (
            evidence is not None
            and d.keys.recipient.key_id != (key := statement_key(d.region, evidence)).key_id
        ):
            d.use_key(key)  # learned by a worker before (this one, before a restart, or another)
        if held:
            return await self._learn_key(d)
        if resend is not None:
            return await self._resend(d, resend)
        if redrive:
            batch = await self.db.call(self._prepare_users, d, [u for u, *_ in redrive])
            await self._deliver_and_commit(d, batch, advance=False)
            return True
        if not items:
            return False
        batch = await self.db.call(self._prepare, d, items)
        await self._deliver_and_commit(d, batch, advance=True)
        return True

    def _poll(self, d: Destination) -> tuple[bool, KeyState, list[tuple], list[OutboxItem]]:
        """On the store thread: paused?, the region key's state, dead letters to re-drive,
        the next outbox entries."""
        store = self.db.store
        keys = store.key_state(d.region)
        if store.is_paused(d.region):
            return True, keys, [], []
        if keys[0] or keys[2] is not None:
            return False, keys, [], []
        redrive = store.dead_letters(d.region, True, self.config.batch_size)
        if redrive:
            return False, keys, redrive, []
        return False, keys, [], store.outbox_after(d.cursor, self.config.batch_size)

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

    async def _deliver_and_commit(self, d: Destination, batch: Prepared, advance: bool) -> None:
        if d.max_rate and batch.copies:
            # Paced: each batch waits until the rate allows it, and books its own share.
            now = time.monotonic()
            if d.not_before > now:
                await asyncio.sleep(d.not_before - now)
                self.leases[d.region].check()
            d.not_before = max(d.not_before, now) + len(batch.copies) / d.max_rate
        refused = await self._deliver(d, batch) if batch.copies else {}
        await self.db.write(lambda: self._commit(d, batch, refused, advance))
        if advance:
            d.cursor = batch.last_sequence
        # A refusal (say, copies the region cannot verify) stays in status as the reason until
        # a batch lands whole: the dead letters say who, this says why.
        error = f"refused: {next(iter(refused.values()))}" if refused else ""
        if error != d.last_error:
            await self._note_error(d, error)

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

    def _commit(self, d: Destination, batch: Prepared, refused: dict[int, str], advance: bool) -> None:
        store = self.db.store
        now = time.time()
        self.leases[d.region].confirm(store, now)
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

    # ---- runs on the store thread -----------------------------------------------------

    def _prepare(self, d: Destination, items: list[OutboxItem]) -> Prepared:
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
            copy, entry = self._copy_for(d, row, permits[row.user_id])
            copies.append(copy)
            entries.append(entry)
        return Prepared(copies, entries, items[-1].sequence, self._mark(d, copies))

    def _prepare_users(self, d: Destination, user_ids: list[str]) -> Prepared:
        """Copies of the current version of each user (re-driving dead letters)."""
        rows = self.records.store.rows(user_ids)
        permits = self.records.permits_for(user_ids)
        copies, entries = [], []
        gone = []
        for u in user_ids:
            row = rows.get(u)
            if row is None:
                gone.append((u, 2**62))
                continue
            copy, entry = self._copy_for(d, row, permits[u])
            copies.append(copy)
            entries.append(entry)
        if gone:  # nothing left to send: the dead letter has nothing to re-drive
            self.db.store.dead_letters_superseded(d.region, gone)
        return Prepared(copies, entries, 0, self._mark(d, copies))

    def _mark(self, d: Destination, copies: list[replica_pb2.SealedCopy]) -> replica_pb2.HighWater:
        """The batch's signed high-water mark: the highest version the store holds (read from
        the store, not the batch), the lease epoch, the hashes of the unsigned copies."""
        if max((c.version for c in copies), default=0) > self._high_water:
            self._high_water = self.records.store.max_version()
        return d.mark(self._high_water, self.leases[d.region].epoch, copies)

    def _copy_for(
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
        shredded, the worker stopping)."""
        if user_id is None:
            self._opened.clear()
            return
        for key in [k for k in self._opened if k[0] == user_id]:
            del self._opened[key]

    def _open(self, row: Row) -> Opened:
        key = (row.user_id, row.version)
        opened = self._opened.get(key)
        if opened is None:
            opened = self.records.open_row(row)
            if len(self._opened) >= 4 * self.config.batch_size * max(1, len(self.destinations)):
                del self._opened[next(iter(self._opened))]  # the oldest
            self._opened[key] = opened
        return opened
