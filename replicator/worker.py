"""The replication worker: per destination region, reads the outbox after that region's
cursor, projects each record to the fields the rules allow there, seals them for that
region, ships the batch, then logs the transfers and advances the cursor in one
transaction. Each destination has its own loop and cursor, so a slow or down region never
holds back the others.

Failures: a transient one (unavailable, timeout, throttling, 5xx) is retried with
exponential backoff and jitter until it lands; a permanent one (the destination refuses
the copy) sends that user's copy to the dead-letter table with the reason, logs the
transfer as failed, and the batch goes on, so one refused copy never blocks other users.
A later version of the same user supersedes its dead letter once it lands (a copy carries
the user's whole projected state, so the newest version is all a destination needs);
`residency replication retry` re-drives the current version of each dead-lettered user.

Several workers (processes) may share one store: a worker ships to a destination only
while it holds that destination's lease (renewed every third of its life), and commits a
batch only if it still holds it, so a worker that dies or stalls is replaced once its
lease expires and can never move a cursor after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from residency.server.config.node import Affiliate, NodeConfig, ReplicatorConfig
from residency.server.core import codec, translog
from residency.server.core.errors import ConfigError
from residency.server.core.rules import Allowed, Permits, Plan, Withheld
from residency.server.keys.crypto import DataKey, KeyCache, RecipientKey, TransitKey, field_aad
from residency.server.storage.records import Row
from residency.server.storage.replication import OutboxItem
from residency.server.storage.roles import WorkerStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records
from residency.v1 import replica_pb2, replica_pb2_grpc

log = logging.getLogger("residency.replicator")


class Sink(Protocol):
    kind: str
    target: str

    async def apply(self, source_region: str, copies: list[replica_pb2.SealedCopy]) -> None: ...

    def permanent(self, e: BaseException) -> str | None:
        """Why `e` (raised by `apply`) will not go away on a retry, or None if it may."""
        ...

    async def close(self) -> None: ...


class ReplicaSink:
    """A region node, over gRPC `ReplicaService`."""

    kind = "replica"
    TRANSIENT = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.CANCELLED,
        }
    )

    def __init__(self, address: str, timeout: float = 5.0):
        self.target = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self._stub = replica_pb2_grpc.ReplicaServiceStub(self._channel)

    async def apply(self, source_region: str, copies: list[replica_pb2.SealedCopy]) -> None:
        await self._stub.ApplyCopies(
            replica_pb2.ApplyCopiesRequest(source_region=source_region, copies=copies),
            timeout=self.timeout,
        )

    def permanent(self, e: BaseException) -> str | None:
        if isinstance(e, grpc.aio.AioRpcError) and e.code() not in self.TRANSIENT:
            return f"{e.code().name}: {e.details()}"
        return None

    async def close(self) -> None:
        await self._channel.close()


class Refused(Exception):
    """The destination refused a copy for good."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StandDown(Exception):
    """This worker may not ship to the destination now: its lease is lost or expiring, or
    the destination is paused."""


@dataclass
class Destination:
    region: str
    key: RecipientKey
    sink: Sink
    cursor: int = 0
    copies_sent: int = 0
    last_error: str = ""
    # user id -> (DEK, DEK wrapped by `transit`, transit): one DEK per user while cached
    keys: KeyCache = field(default_factory=KeyCache)
    # the transit key for new DEKs, renewed when older than the cache's age
    transit: TransitKey | None = None
    held: bool = False
    paused: bool = False
    # monotonic time until which this worker's lease is surely valid
    lease_until: float = 0.0
    reread_cursor: bool = True
    # records/s at most (0: no limit), and the monotonic time before which the next batch
    # may not ship under that limit
    max_rate: float = 0.0
    not_before: float = 0.0


@dataclass(frozen=True, slots=True)
class Described:
    fields: list[dict[str, Any]]
    withheld: list[dict[str, Any]]
    recipients: str
    categories: dict[str, str]


@dataclass(slots=True)
class Prepared:
    copies: list[replica_pb2.SealedCopy]
    entries: list[dict[str, Any]]
    last_sequence: int


def make_sink(config: NodeConfig, a: Affiliate) -> Sink:
    r = config.replicator
    if a.sink == "s3":
        from residency.replicator.sinks.s3 import S3Sink

        return S3Sink(
            home_region=config.region,
            region=a.region,
            key_id=RecipientKey.load(a.region, a.public_key).key_id,
            bucket=a.bucket,
            prefix=a.prefix,
            endpoint_url=a.endpoint_url,
            s3_region=a.s3_region,
            timeout=r.ship_timeout,
            concurrency=r.s3_concurrency,
        )
    return ReplicaSink(a.address, timeout=r.ship_timeout)


def destinations_for(config: NodeConfig, regions: list[str] | None = None) -> list[Destination]:
    """The config's destinations (only `regions`, if given)."""
    unknown = sorted(set(regions or ()) - {a.region for a in config.affiliates})
    if unknown:
        raise ConfigError(f"{config.path}: no destination {unknown} in 'affiliates'")
    return [
        Destination(
            a.region,
            RecipientKey.load(a.region, a.public_key),
            make_sink(config, a),
            keys=KeyCache(config.keys.cache_entries, config.keys.cache_seconds),
            max_rate=a.max_rate,
        )
        for a in config.affiliates
        if not regions or a.region in regions
    ]


class Replicator:
    def __init__(
        self,
        records: Records,
        db: StoreThread[WorkerStore],
        destinations: list[Destination],
        config: ReplicatorConfig,
        owner: str = "",
        all_regions: list[str] | None = None,
    ):
        self.records = records
        self.db = db
        self.destinations = {d.region: d for d in destinations}
        # Every destination of the outbox, including those other workers ship to: an entry
        # is trimmed only once all of them have applied it.
        self.all_regions = all_regions or list(self.destinations)
        self.config = config
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wake = {d.region: asyncio.Event() for d in destinations}
        self._tasks: list[asyncio.Task] = []
        # Records opened for one destination's batch, kept for the others' batches of the same
        # changes (they run close together on the same store thread): one open per change.
        self._opened: dict[tuple[str, int], Any] = {}

    async def start(self) -> None:
        for d in self.destinations.values():
            self._tasks.append(asyncio.create_task(self._keep_lease(d), name=f"lease-{d.region}"))
            self._tasks.append(asyncio.create_task(self._run(d), name=f"replicate-{d.region}"))

    def wake(self) -> None:
        for e in self._wake.values():
            e.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        store = self.db.store
        for d in self.destinations.values():
            if d.held:  # hand over at once rather than after expiry
                with contextlib.suppress(Exception):
                    await self.db.write(lambda r=d.region: store.lease_release(r, self.owner))
            await d.sink.close()

    # ---- leases -----------------------------------------------------------------------

    async def _keep_lease(self, d: Destination) -> None:
        ttl = self.config.lease_seconds
        store = self.db.store
        while True:
            began = time.monotonic()
            try:
                held, paused = await self.db.write(
                    lambda: store.lease_take(d.region, self.owner, time.time(), ttl)
                )
            except Exception as e:  # the store is busy or failing: not holding is the safe view
                log.warning("lease on %s not renewed: %r", d.region, e)
                held, paused = False, d.paused
            if held and not d.held:
                log.info("%s took the lease on %s", self.owner, d.region)
                d.reread_cursor = True
            d.held, d.paused = held, paused
            d.lease_until = began + ttl if held else 0.0
            if held and not paused:
                self._wake[d.region].set()
            await asyncio.sleep(ttl / 3)

    def _check(self, d: Destination, paused_too: bool = True) -> None:
        """Ship only with at least half a lease left: a shipping call (at most
        `ship_timeout`, half a lease) then ends before anyone else may take over."""
        if (paused_too and d.paused) or not d.held:
            raise StandDown(d.region)
        if time.monotonic() > d.lease_until - self.config.lease_seconds / 2:
            raise StandDown(d.region)

    # ---- the loop ---------------------------------------------------------------------

    async def _run(self, d: Destination) -> None:
        wake = self._wake[d.region]
        while True:
            try:
                if not await self._step(d, wake):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=self.config.poll_interval)
            except StandDown:
                d.reread_cursor = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=self.config.lease_seconds / 3)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug or a failing store: say so, and try again later
                log.exception("replication to %s failed", d.region)
                await self._note_error(d, _describe(e))
                await asyncio.sleep(self.config.retry_max)

    async def _step(self, d: Destination, wake: asyncio.Event) -> bool:
        """One batch (or a round of re-driven dead letters); False when there was nothing.

        The wake-up is cleared first, so a StandDown raised here waits for news (a write, a
        resume, a lease taken) instead of spinning on wake-ups that came before it."""
        wake.clear()
        # Paused or not is read from the store below: a resume takes effect at once, not at
        # the next lease renewal.
        self._check(d, paused_too=False)
        store = self.db.store
        if d.reread_cursor:
            d.cursor = await self.db.call(store.cursor, d.region)
            d.reread_cursor = False
        paused, redrive, items = await self.db.call(self._poll, d)
        d.paused = paused
        if paused:  # an operator paused it
            raise StandDown(d.region)
        if redrive:
            batch = await self.db.call(self._prepare_users, d, [u for u, *_ in redrive])
            await self._deliver_and_commit(d, batch, advance=False)
            return True
        if not items:
            return False
        batch = await self.db.call(self._prepare, d, items)
        await self._deliver_and_commit(d, batch, advance=True)
        return True

    def _poll(self, d: Destination) -> tuple[bool, list[tuple], list[OutboxItem]]:
        """On the store thread: paused?, dead letters to re-drive, the next outbox entries."""
        store = self.db.store
        if store.is_paused(d.region):
            return True, [], []
        redrive = store.dead_letters(d.region, True, self.config.batch_size)
        if redrive:
            return False, redrive, []
        return False, [], store.outbox_after(d.cursor, self.config.batch_size)

    async def _deliver_and_commit(self, d: Destination, batch: Prepared, advance: bool) -> None:
        if d.max_rate and batch.copies:
            # Paced: each batch waits until the rate allows it, and books its own share.
            now = time.monotonic()
            if d.not_before > now:
                await asyncio.sleep(d.not_before - now)
                self._check(d)
            d.not_before = max(d.not_before, now) + len(batch.copies) / d.max_rate
        refused = await self._deliver(d, batch.copies) if batch.copies else {}
        await self.db.write(lambda: self._commit(d, batch, refused, advance))
        if advance:
            d.cursor = batch.last_sequence
        d.copies_sent += len(batch.copies) - len(refused)
        if d.last_error:
            await self._note_error(d, "")

    async def _deliver(self, d: Destination, copies: list[replica_pb2.SealedCopy]) -> dict[int, str]:
        """Ships `copies`; returns the refused ones (index to reason)."""
        try:
            await self._ship(d, copies)
            return {}
        except Refused as e:
            if len(copies) == 1:
                return {0: e.reason}
        # Somebody in the batch is refused: find who, one copy at a time.
        refused = {}
        for i, c in enumerate(copies):
            try:
                await self._ship(d, [c])
            except Refused as e:
                refused[i] = e.reason
        return refused

    async def _ship(self, d: Destination, copies: list[replica_pb2.SealedCopy]) -> None:
        def note(state: RetryCallState) -> None:
            e = state.outcome.exception() if state.outcome else None
            error = _describe(e)
            log.warning("replication to %s failed (%s); retrying", d.region, error)
            if error != d.last_error:
                d.last_error = error
                asyncio.get_running_loop().create_task(self._note_error(d, error))

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(
                lambda e: isinstance(e, Exception) and not isinstance(e, Refused | StandDown)
            ),
            wait=wait_exponential_jitter(initial=self.config.retry_initial, max=self.config.retry_max),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                self._check(d)
                try:
                    await d.sink.apply(self.records.region, copies)
                except Exception as e:
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
        if not store.lease_held(d.region, self.owner, now):
            raise StandDown(d.region)  # another worker owns the cursor now; it ships again
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
        return Prepared(copies, entries, items[-1].sequence)

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
        return Prepared(copies, entries, 0)

    def _copy_for(self, d: Destination, row: Row, permits: Permits) -> tuple[replica_pb2.SealedCopy, dict]:
        r = self.records
        now = time.time()
        common = dict(
            time=now,
            subject=row.user_id,
            source_region=r.region,
            destination_region=d.region,
            actor="replicator",
            rules_version=r.rules.version,
            version=row.version,
        )
        if row.deleted:
            d.keys.drop(row.user_id)
            tomb = replica_pb2.SealedCopy(
                user_id=row.user_id, version=row.version, deleted=True, reason="erasure", home_region=r.region
            )
            return tomb, translog.entry(
                "erasure", outcome="allowed", reason="the user's record was erased", **common
            )
        opened = self._open(row)
        plan = r.rules.plan(d.region, None, permits)
        sent, withheld = r.project(plan, opened.fields, opened.updated_at)
        what = self._described(plan, sent, withheld)
        if not sent:
            # Nothing may be there: make sure nothing is (a copy sent under older rules goes).
            tomb = replica_pb2.SealedCopy(
                user_id=row.user_id,
                version=row.version,
                deleted=True,
                reason="withdrawn",
                home_region=r.region,
            )
            # Logged as an erasure: what consent, grants, retention or rules allowed before goes.
            return tomb, translog.entry(
                "erasure",
                outcome="allowed",
                withheld=what.withheld,
                reason=f"withdrawn: no field of this record may be held in {d.region} now",
                **common,
            )
        dek = self._data_key(d, row.user_id)
        kid, version = d.key.key_id, row.version
        copy = replica_pb2.SealedCopy(
            user_id=row.user_id,
            version=version,
            key_id=kid,
            wrapped_data_key=dek[1],
            transit_key_id=dek[2].id,
            wrapped_transit_key=dek[2].wrapped,
            sealed_fields={
                n: dek[0].seal(v.SerializeToString(), field_aad(row.user_id, n, d.region, version, kid))
                for n, v in sent.items()
            },
            categories=what.categories,
            source=opened.source,
            home_region=r.region,
            created_at=codec.timestamp(opened.created_at),
            updated_at=codec.timestamp(opened.updated_at),
            rules_version=r.rules.version,
        )
        return copy, translog.entry(
            "replication",
            outcome="allowed",
            recipient=what.recipients,
            fields=what.fields,
            withheld=what.withheld,
            **common,
        )

    def _described(self, plan: Plan, sent: dict[str, Any], withheld: dict[str, Withheld]) -> Described:
        """What a copy holds and withholds, as the log and the copy state it: the same for
        every record with the same fields under one plan, so worked out once per such set
        (the lists are shared between entries and never changed)."""
        key = (frozenset(sent), frozenset(withheld.items()))
        memo = plan.memo.get(key)
        if memo is None:
            r, ds = self.records, plan.decisions
            memo = Described(
                fields=translog.Shared(r.describe(ds, sent)),
                withheld=translog.Shared(r.describe_withheld(withheld)),
                recipients=",".join(sorted({ds[n].recipient.id for n in sent if isinstance(ds[n], Allowed)})),
                categories={n: r.schema.fields[n].category for n in sent},
            )
            if len(plan.memo) >= 1000:  # field sets vary little; bound it anyway
                plan.memo.clear()
            plan.memo[key] = memo
        return memo

    def _open(self, row: Row) -> Any:
        key = (row.user_id, row.version)
        opened = self._opened.get(key)
        if opened is None:
            opened = self.records.open_row(row)
            if len(self._opened) >= 4 * self.config.batch_size * max(1, len(self.destinations)):
                del self._opened[next(iter(self._opened))]  # the oldest
            self._opened[key] = opened
        return opened

    def _data_key(self, d: Destination, user_id: str) -> tuple[DataKey, bytes, TransitKey]:
        hit = d.keys.get(user_id)
        if hit is None:
            tk = d.transit
            if tk is None or time.monotonic() - tk.born > d.keys.max_age:
                tk = d.transit = d.key.new_transit_key()  # the one HPKE operation
            hit = (*tk.new_data_key(user_id), tk)
            d.keys.put(user_id, hit)
        return hit


def _describe(e: BaseException | None) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return repr(e) if e else ""
