"""The replication worker: per destination region, reads the outbox after that region's
cursor, projects each record to the fields the rules allow there, seals them for that
region, ships the batch, then logs the transfers and advances the cursor in one
transaction. Each destination has its own loop and cursor, so a slow or down region never
holds back the others; a batch that fails is retried with backoff until it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from residency.v1 import replica_pb2, replica_pb2_grpc
from server import codec, translog
from server.config import ReplicatorConfig
from server.crypto import DataKey, KeyCache, RecipientKey, field_aad
from server.records import Records
from server.rules import Allowed, Permits
from server.store import OutboxItem, Row
from server.writer import StoreThread

log = logging.getLogger("residency.replicator")


class Sink(Protocol):
    async def apply(self, source_region: str, copies: list[replica_pb2.SealedCopy]) -> None: ...
    async def close(self) -> None: ...


class ReplicaSink:
    """A region node, over gRPC `ReplicaService`."""

    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = replica_pb2_grpc.ReplicaServiceStub(self._channel)

    async def apply(self, source_region: str, copies: list[replica_pb2.SealedCopy]) -> None:
        await self._stub.ApplyCopies(
            replica_pb2.ApplyCopiesRequest(source_region=source_region, copies=copies),
            timeout=self.timeout,
        )

    async def close(self) -> None:
        await self._channel.close()


@dataclass
class Destination:
    region: str
    address: str
    key: RecipientKey
    sink: Sink
    cursor: int = 0
    copies_sent: int = 0
    last_error: str = ""
    keys: KeyCache = field(default_factory=KeyCache)


@dataclass(slots=True)
class Prepared:
    copies: list[replica_pb2.SealedCopy]
    entries: list[dict[str, Any]]
    last_sequence: int


class Replicator:
    def __init__(
        self, records: Records, db: StoreThread, destinations: list[Destination], config: ReplicatorConfig
    ):
        self.records = records
        self.db = db
        self.destinations = {d.region: d for d in destinations}
        self.config = config
        self._wake = {d.region: asyncio.Event() for d in destinations}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for d in self.destinations.values():
            d.cursor = await self.db.call(self.db.store.cursor, d.region)
            self._tasks.append(asyncio.create_task(self._run(d), name=f"replicate-{d.region}"))

    def wake(self) -> None:
        for e in self._wake.values():
            e.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for d in self.destinations.values():
            await d.sink.close()

    async def _run(self, d: Destination) -> None:
        wake = self._wake[d.region]
        while True:
            wake.clear()
            items = await self.db.call(self.db.store.outbox_after, d.cursor, self.config.batch_size)
            if not items:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=1.0)
                continue
            batch = await self.db.call(self._prepare, d, items)
            if batch.copies:
                await self._ship(d, batch)
            await self.db.write(lambda b=batch: self._commit(d, b))
            d.cursor = batch.last_sequence
            d.copies_sent += len(batch.copies)

    async def _ship(self, d: Destination, batch: Prepared) -> None:
        def note(state: RetryCallState) -> None:
            e = state.outcome.exception() if state.outcome else None
            d.last_error = _describe(e)
            log.warning("replication to %s failed (%s); retrying", d.region, d.last_error)

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda e: not isinstance(e, asyncio.CancelledError)),
            wait=wait_exponential_jitter(initial=self.config.retry_initial, max=self.config.retry_max),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                await d.sink.apply(self.records.region, batch.copies)
        d.last_error = ""

    def _commit(self, d: Destination, batch: Prepared) -> None:
        store = self.db.store
        if batch.entries:
            store.log_append(batch.entries)
        store.set_cursor(d.region, batch.last_sequence)
        others = [o.cursor for o in self.destinations.values() if o is not d]
        store.outbox_trim(min([batch.last_sequence, *others]))

    # ---- runs on the store thread -----------------------------------------------------

    def _prepare(self, d: Destination, items: list[OutboxItem]) -> Prepared:
        users = list({i.user_id for i in items})
        rows = self.records.store.rows(users)
        permits = self.records.permits_for(users)
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
        opened = r.open_row(row)
        plan = r.rules.plan(d.region, None, permits)
        sent, withheld = r.project(plan, opened.fields, opened.updated_at)
        described = r.describe_withheld(withheld)
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
                withheld=described,
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
            sealed_fields={
                n: dek[0].seal(v.SerializeToString(), field_aad(row.user_id, n, d.region, version, kid))
                for n, v in sent.items()
            },
            categories={n: r.schema.fields[n].category for n in sent},
            source=opened.source,
            home_region=r.region,
            created_at=codec.timestamp(opened.created_at),
            updated_at=codec.timestamp(opened.updated_at),
            rules_version=r.rules.version,
        )
        recipients = sorted(
            {plan.decisions[n].recipient.id for n in sent if isinstance(plan.decisions[n], Allowed)}
        )
        return copy, translog.entry(
            "replication",
            outcome="allowed",
            recipient=",".join(recipients),
            fields=r.describe(plan.decisions, sent),
            withheld=described,
            **common,
        )

    def _data_key(self, d: Destination, user_id: str) -> tuple[DataKey, bytes]:
        hit = d.keys.get(user_id)
        if hit is None:
            hit = d.key.new_data_key(user_id)
            d.keys.put(user_id, hit)
        return hit

    # ---- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Runs on the store thread: per destination, cursor, pending entries and lag."""
        store = self.records.store
        now = time.time()
        out = {"head": store.outbox_head(), "destinations": []}
        for d in self.destinations.values():
            oldest = store.outbox_oldest_after(d.cursor)
            out["destinations"].append(
                {
                    "region": d.region,
                    "address": d.address,
                    "applied_sequence": d.cursor,
                    "pending": store.outbox_count_after(d.cursor),
                    "lag_seconds": max(0.0, now - oldest) if oldest else 0.0,
                    "last_error": d.last_error,
                    "copies_sent": d.copies_sent,
                }
            )
        return out


def _describe(e: BaseException | None) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return repr(e) if e else ""
