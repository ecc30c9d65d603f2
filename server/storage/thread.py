"""The async edge of the store: one thread owns the store, and concurrent writes that arrive
while a transaction is running are grouped into the next one (group commit), so callers
share the cost of a commit. Each write runs in its own savepoint, so one failing write
does not fail its neighbours. Writes made with `write_many` and the same function are
also merged into one call of it (one read of existing rows, one insert), and run one by
one only if the merged call fails.

A write may name a step to run before the batch's transaction, in a transaction of its own
(`before`: a new data key commits before the records sealed under it, see
`residency.server.storage.database`); the same step of several writes runs once, on all their
items. A write that finds it needed that step after all (`Unprepared`: a user erased earlier
in the same batch writes again) rolls back alone and runs again, right after the batch, with
its step first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from prometheus_client import Counter, Histogram

from residency.server.core.errors import Stopping, TransactionConflict
from residency.server.storage.database import UnitOfWork

T = TypeVar("T")
BATCH_WRITES = Histogram(
    "residency_group_commit_writes",
    "Writes committed together in one transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCH_SECONDS = Histogram(
    "residency_group_commit_seconds",
    "Time of one group transaction, from BEGIN to COMMIT",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
# A batch the database gave up for a concurrent transaction (distributed SQL under contention)
# runs again, up to this many times in all, before its writes fail UNAVAILABLE.
CONFLICT_ATTEMPTS = 3
CONFLICTS = Counter(
    "residency_store_conflicts_total",
    "Group transactions given up for a concurrent one (by the database, or after another "
    "process's key rotation), and that ran again",
)
# The store as the thread's holder sees it (a Protocol of `roles`); covariant, so the node's
# StoreThread[SqliteStore] is accepted where a StoreThread[WorkerStore] is expected.
S_co = TypeVar("S_co", bound=UnitOfWork, covariant=True)


class Unprepared(Exception):
    """Raised by a write whose `before` step did not cover it (it saw the store as it was
    before the batch): the write rolls back and runs again after the batch, its step first."""


@dataclass(slots=True)
class _Op:
    fn: Callable[..., Any]
    # With `many`: fn takes a list of items and returns one result per item.
    items: list[Any] | None
    weight: int
    future: asyncio.Future[Any]
    # Runs before the batch's transaction: with `items`, on the items of every write of the
    # batch that names it; else once, with no argument.
    before: Callable[..., None] | None = None


class StoreThread(Generic[S_co]):
    """Owns the store: every call on it runs on this one thread."""

    def __init__(self, store: S_co, max_batch: int = 2000):
        self._store = store
        self.max_batch = max_batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        # `None` in the queue is `drain`'s: the loop finishes what is before it, then ends.
        self._queue: asyncio.Queue[_Op | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._draining = False

    @property
    def store(self) -> S_co:
        """The store, to call on the store thread (in `call` or `write`) only."""
        return self._store

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="group-commit")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` on the store thread (a read, or a write that opens its own
        transaction)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def write(
        self, fn: Callable[[], T], weight: int = 1, before: Callable[[], None] | None = None
    ) -> T:
        """Runs `fn()` inside the next group transaction; resolves once it has committed.
        `before()` runs first, outside that transaction."""
        return cast(T, await self._enqueue(_Op(fn, None, weight, self._future(), before)))

    async def write_many(
        self,
        fn: Callable[[list[Any]], list[T]],
        items: list[Any],
        before: Callable[[list[Any]], None] | None = None,
    ) -> list[T]:
        """Runs `fn(items)` inside the next group transaction, merged with other callers'
        items for the same `fn`; resolves to this caller's results once committed.
        `before(items)` runs first, outside that transaction, once on every caller's items."""
        return cast(list[T], await self._enqueue(_Op(fn, items, len(items), self._future(), before)))

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, op: _Op) -> Any:
        assert self._queue is not None, "StoreThread.start() first"
        if self._draining:
            raise Stopping("the node is stopping: nothing was written; send it again to a running node")
        self._queue.put_nowait(op)
        return await op.future

    async def _loop(self) -> None:
        assert self._queue is not None
        last = False
        while not last:
            first = await self._queue.get()
            if first is None:
                return
            batch, weight = [first], first.weight
            while weight < self.max_batch and not self._queue.empty():
                op = self._queue.get_nowait()
                if op is None:  # drain: this batch is the last
                    last = True
                    break
                batch.append(op)
                weight += op.weight
            start = time.perf_counter()
            try:
                results = await self.call(self._run, batch)
            except BaseException as e:  # the transaction itself failed: every write in it did
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            BATCH_SECONDS.observe(time.perf_counter() - start)
            BATCH_WRITES.observe(weight)
            for op, (ok, value) in zip(batch, results, strict=True):
                if op.future.done():
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)

    def _run(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        results = self._attempts(batch)
        again = [i for i, (ok, e) in enumerate(results) if not ok and isinstance(e, Unprepared)]
        if again:  # their steps now see the batch committed; a second round needs no third
            for i, result in zip(again, self._attempts([batch[i] for i in again]), strict=True):
                results[i] = result
        return results

    def _attempts(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """A round, and again, steps included, if the database gave its transaction up for a
        concurrent one (nothing of it was written)."""
        attempt = 1
        while True:
            try:
                return self._round(batch)
            except TransactionConflict:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                attempt += 1
                CONFLICTS.inc()

    def _round(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """The batch's `before` steps, then its transaction. A write whose step failed fails
        with that error, without running."""
        failed: dict[int, BaseException] = {}
        steps: dict[Callable[..., None], list[int]] = {}
        for i, op in enumerate(batch):
            if op.before is not None:
                steps.setdefault(op.before, []).append(i)
        for step, ops in steps.items():
            try:
                if batch[ops[0]].items is None:
                    for _ in ops:
                        step()
                else:
                    step([item for i in ops for item in batch[i].items or ()])
            except Exception as e:
                failed.update((i, e) for i in ops)
        run = [op for i, op in enumerate(batch) if i not in failed]
        done = iter(self._transaction(run) if run else [])
        return [(False, failed[i]) if i in failed else next(done) for i in range(len(batch))]

    def _transaction(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        out: list[tuple[bool, Any]] = []
        with self._store.transaction():
            i = 0
            while i < len(batch):
                j = i + 1
                if batch[i].items is not None:
                    while j < len(batch) and batch[j].items is not None and batch[j].fn == batch[i].fn:
                        j += 1
                out += self._merged(batch[i:j]) if j - i > 1 else [self._one(batch[i])]
                i = j
        return out

    def _merged(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        merged = [item for op in ops for item in op.items or ()]
        ok, results = self._attempt(lambda: ops[0].fn(merged))
        if not ok:  # find the culprit: each caller's items on their own
            return [self._one(op) for op in ops]
        out, k = [], 0
        for op in ops:
            n = len(op.items or ())
            out.append((True, results[k : k + n]))
            k += n
        return out

    def _one(self, op: _Op) -> tuple[bool, Any]:
        return self._attempt(op.fn if op.items is None else lambda: op.fn(op.items))

    def _attempt(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        db = self._store
        db.savepoint()
        try:
            value = fn()
        except Exception as e:
            if not db.in_transaction():  # SQLite gave up the whole transaction: so does the group
                raise
            if isinstance(db.failure(e), TransactionConflict):
                # A statement the database gave up for a concurrent transaction (distributed
                # SQL): the transaction is lost, not the write, and the group runs again.
                raise
            db.rollback_savepoint()
            return False, e
        db.release_savepoint()
        return True, value

    async def drain(self) -> None:
        """Lets every write queued so far commit and resolve, then stops the loop and the
        thread; a write that arrives after this began is refused (`Stopping`). The loop is
        never cancelled: a batch whose COMMIT may have run must tell its callers so."""
        self._draining = True
        if self._queue is not None and self._task is not None:
            self._queue.put_nowait(None)  # behind every write queued before it
            await self._task
        self._pool.shutdown(wait=True)
