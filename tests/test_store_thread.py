"""The store thread's drain: a batch whose COMMIT ran resolves for its callers, and a write
that comes after the drain began is refused whole, so acknowledged always means stored."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from residency.server.core.errors import Stopping
from residency.server.storage.sqlite import SqliteStore
from residency.server.storage.thread import StoreThread


def _put(store: SqliteStore, user: str) -> None:
    store.put_data_keys([(user, "wk", user.encode())])


async def test_drain_never_fails_a_committed_write_and_refuses_a_late_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = SqliteStore(tmp_path / "node.db")
    db = StoreThread(store)
    db.start()
    await db.write(lambda: store.put_wrapping_key("wk", b"wrapped"))
    # A slow commit: COMMIT has run, the batch has not returned to the loop yet.
    committed, release = threading.Event(), threading.Event()
    real = store.transaction

    @contextmanager
    def slow() -> Iterator[None]:
        with real():
            yield
        committed.set()
        assert release.wait(30)

    monkeypatch.setattr(store, "transaction", slow)
    first = asyncio.ensure_future(db.write(lambda: _put(store, "u-first")))
    assert await asyncio.to_thread(committed.wait, 30)
    drain = asyncio.ensure_future(db.drain())
    await asyncio.sleep(0)  # one turn of the event loop: the drain runs to its first wait
    late = asyncio.ensure_future(db.write(lambda: _put(store, "u-late")))
    await asyncio.sleep(0)  # and the late write reaches the store thread's queue, or is refused
    release.set()
    results = await asyncio.gather(first, late, return_exceptions=True)
    await drain
    store.close()

    held = SqliteStore(tmp_path / "node.db")
    try:
        stored = held.data_keys(["u-first", "u-late"])
    finally:
        held.close()
    assert results[0] is None and "u-first" in stored
    # Refused and not written; never "failed" yet stored.
    assert isinstance(results[1], Stopping) and "u-late" not in stored
    assert "stopping" in str(results[1]) and "nothing was written" in str(results[1])
