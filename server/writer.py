"""The async edge of the store: one thread owns the store, and concurrent writes that arrive
while a transaction is running are grouped into the next one (group commit), so callers
share the cost of a commit. Each write runs in its own savepoint, so one failing write
does not fail its neighbours."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from server.store import Store

T = TypeVar("T")


class StoreThread:
    def __init__(self, store: Store, max_batch: int = 2000):
        self.store = store
        self.max_batch = max_batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._queue: asyncio.Queue[tuple[Callable[[], Any], int, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self.committed = asyncio.Event()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="group-commit")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` on the store thread (a read, or a write that opens its own
        transaction)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def write(self, fn: Callable[[], T], weight: int = 1) -> T:
        """Runs `fn` inside the next group transaction; resolves once it has committed."""
        assert self._queue is not None, "StoreThread.start() first"
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((fn, weight, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            batch, weight = [first], first[1]
            while weight < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                weight += item[1]
            try:
                results = await self.call(self._run, [fn for fn, _, _ in batch])
            except BaseException as e:  # the transaction itself failed: every write in it did
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, _, fut), (ok, value) in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            self.committed.set()

    def _run(self, fns: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        out: list[tuple[bool, Any]] = []
        db = self.store
        with db.transaction():
            for fn in fns:
                db.savepoint()
                try:
                    out.append((True, fn()))
                except Exception as e:
                    db.rollback_savepoint()
                    out.append((False, e))
                else:
                    db.release_savepoint()
        return out

    async def drain(self) -> None:
        """Waits for queued writes to commit, then stops the loop and the thread."""
        if self._queue is not None:
            while not self._queue.empty():
                await asyncio.sleep(0.01)
        if self._task is not None:
            # The loop is idle on queue.get() once the queue is empty and the last batch ran.
            await self.call(lambda: None)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)
