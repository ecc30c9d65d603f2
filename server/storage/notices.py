"""What front ends and workers sharing a PostgreSQL store tell each other: after a commit that
changes what they keep in memory (the rules in force, the region's key events), the writer
notifies (`PostgresDatabase.notify`, PostgreSQL's NOTIFY, sent at COMMIT) and every other
process listening acts on it within milliseconds. Records, consents and grants need none of
it: every call reads them from the store. A notice may carry a detail (an erasure: the users
erased); a handler given none ("") acts on everything, as after a notice it may have missed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from residency.server.config.store import StoreConfig
from residency.server.core.errors import KeysBehind, ResidencyError
from residency.server.storage.postgres import CHANNEL

log = logging.getLogger("residency.storage")
Handlers = Mapping[str, Callable[[str], Awaitable[None]]]  # called with the notice's detail
# A server gone without a reset (a partition) ends the wait for notices within about 5 s
# (keepalive probes after 2 s idle, 3 unanswered a second apart), the node not ready from then
# (`Hearing`), and the loop listens again, catching up on what it missed.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    # A connection that is never idle (polled) ends when what it sent goes unacknowledged 5 s.
    "tcp_user_timeout": 5000,
}
# The connection's name in the server's `pg_stat_activity`.
APPLICATION = "residency-notices"
# The longest a read of `store_notices` may take before the connection is given up (a hung or
# partitioned server): the process is then not ready, and connects again.
READ_TIMEOUT = 2.0
# How often a process that LISTENs also reads `store_notices`: a writer that sends no NOTIFY (one
# with `notices: poll`) is heard within it.
LISTEN_READ_EVERY = 0.5


class Hearing:
    """Whether this process hears the others now: listening, and every handler caught up. While
    it does not, what another front end changes (an erasure, the rules, a shred) may not hold
    here, so the node is not ready (`problems`, read by its readiness check)."""

    def __init__(self, grace: float = 1.0) -> None:
        self.grace = grace
        self.used = False  # a node on SQLite hears nobody, and need not
        self.listening = False
        self.ever = False  # listened and caught up once since start
        self.down_since: float | None = time.monotonic()
        self.down_at = ""  # when it stopped hearing, UTC, for the reason (steady while down)
        # Why a handler cannot act on what it heard, by kind (this process's keys folder lagging
        # the store's key events: `KeysBehind`), while it cannot.
        self.why: dict[str, str] = {}

    def use(self) -> Hearing:
        self.used = True
        return self

    def settle(self, failed: set[str]) -> None:
        """After a (re)connection, a notice or a retry: up if listening with no handler failed."""
        if self.listening and not failed:
            self.ever, self.down_since = True, None
        elif self.down_since is None:
            self.down_since, self.down_at = time.monotonic(), time.strftime("%H:%M:%S", time.gmtime())

    def problems(self) -> list[str]:
        if not self.used or self.down_since is None:
            return []
        if self.why:  # at once: what this process holds is known to be behind
            return [f"another front end's change cannot be acted on here: {w}" for w in self.why.values()]
        if not self.ever:
            return ["store notifications: not listening yet (other front ends' changes)"]
        if time.monotonic() - self.down_since <= self.grace:
            return []
        return [f"store notifications: not heard since {self.down_at} UTC (other front ends' changes)"]


# How often a process with `store.notices: poll` reads the notices (issue 17.3: another front
# end's erasure, rules change or key shred holds here within 1 s).
POLL_EVERY = 0.25


def hear(store: StoreConfig, own_token: str, handlers: Handlers, hearing: Hearing | None = None) -> Any:
    """`listen` as the node config's `store.notices` says: LISTEN/NOTIFY, or polling."""
    poll = POLL_EVERY if store.notices == "poll" else None
    return listen(store.dsn, own_token, handlers, hearing=hearing, poll=poll)


async def listen(
    dsn: str,
    own_token: str,
    handlers: Handlers,
    retry: float = 1.0,
    hearing: Hearing | None = None,
    poll: float | None = None,
) -> None:
    """Runs each handler when another process notifies its kind. A notification sent while
    this process was not listening is lost, so after every (re)connection each handler runs
    once: it reads the store's state and acts only on a difference. A handler that fails
    (the store busy a moment) runs again every `retry` seconds until it succeeds, without
    waiting for another notice. With `poll` (seconds), the notices are read from the rows of
    `store_notices` every `poll` seconds, without LISTEN (a database without NOTIFY)."""
    failed: set[str] = set()
    hearing = hearing or Hearing()
    again = asyncio.create_task(_retry_failed(handlers, failed, retry, hearing), name="store-notices-retry")
    try:
        while True:
            try:
                conninfo = make_conninfo(dsn, application_name=APPLICATION, **KEEPALIVES)
                connect = psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                async with await connect as conn:
                    source = _Polled(conn, poll) if poll else _Notified(conn, LISTEN_READ_EVERY)
                    await source.start()  # before catching up: nothing said after is missed
                    for kind, handler in handlers.items():
                        await _run(kind, handler, "", failed, hearing)
                    # Hearing only once every handler caught up (a retry meanwhile is not enough).
                    hearing.listening = True
                    hearing.settle(failed)
                    async for kind, token, detail in source.notices():
                        if not kind:  # notices this process could not read: everything
                            for k, handler in handlers.items():
                                await _run(k, handler, "", failed, hearing)
                        elif token != own_token and kind in handlers:
                            # After a failed run, everything: this notice's detail would not
                            # cover what the failed one was about.
                            said = "" if kind in failed else detail
                            await _run(kind, handlers[kind], said, failed, hearing)
                        hearing.settle(failed)
            except (psycopg.Error, OSError) as e:
                log.warning("store notifications: %s; listening again in %.0f s", e.__class__.__name__, retry)
            hearing.listening = False
            hearing.settle(failed)
            await asyncio.sleep(retry)
    finally:
        again.cancel()


Notice = tuple[str, str, str]  # (kind, the notifier's token, detail); kind "": some were missed


class _Rows:
    """The rows of `store_notices` after the last one read. They are numbered in commit order
    without a gap (the writers' lock), so a number skipped was pruned before this process read
    it (`NOTICES_KEPT`): it then acts on everything."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], every: float):
        self.conn, self.every, self.seen = conn, every, 0
        self.delivered: set[int] = set()  # numbers already acted on as a NOTIFY (`_Notified`)

    async def _bounded(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of `sql`, or TimeoutError (an OSError: the loop connects again) after
        `READ_TIMEOUT`, the connection closed at once: psycopg's own cancellation of a query
        asks the server first, which a hung or unreachable one leaves waiting for many seconds."""

        async def run() -> list[tuple[Any, ...]]:
            cur = await self.conn.execute(sql, params)
            return await cur.fetchall()

        task = asyncio.ensure_future(run())
        done, _ = await asyncio.wait({task}, timeout=READ_TIMEOUT)
        if not done:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self.conn.pgconn.finish()
            task.cancel()
            raise TimeoutError(f"store_notices: no answer within {READ_TIMEOUT:.0f} s")
        return task.result()

    async def start(self) -> None:
        rows = await self._bounded("SELECT coalesce(max(seq), 0) FROM store_notices")
        self.seen = int(rows[0][0]) if rows else 0

    async def read(self) -> list[Notice]:
        rows = await self._bounded(
            "SELECT seq, token, kind, detail FROM store_notices WHERE seq > %s ORDER BY seq LIMIT 1000",
            (self.seen,),
        )
        out: list[Notice] = []
        for seq, token, kind, detail in rows:
            if seq != self.seen + 1:
                out.append(("", "", ""))
            self.seen = seq
            if seq in self.delivered:
                self.delivered.discard(seq)
            else:
                out.append((kind, token, detail))
        self.delivered = {n for n in self.delivered if n > self.seen}
        return out


class _Polled(_Rows):
    """Notices read every `every` seconds (a database without NOTIFY)."""

    async def notices(self) -> AsyncIterator[Notice]:
        while True:
            await asyncio.sleep(self.every)
            for n in await self.read():
                yield n


class _Notified(_Rows):
    """Notices as PostgreSQL delivers them (LISTEN/NOTIFY), at the notifier's COMMIT; and the
    rows, read every `every` seconds, for writers that send no NOTIFY (`notices: poll`). A
    NOTIFY names its row (`TOKEN#SEQ`), which the read then skips: each is acted on once."""

    async def start(self) -> None:
        await self.conn.execute(f"LISTEN {CHANNEL}")
        await super().start()

    async def notices(self) -> AsyncIterator[Notice]:
        while True:
            async for n in self.conn.notifies(timeout=self.every):
                kind, _, rest = n.payload.partition(" ")
                named, _, detail = rest.partition(" ")
                token, _, seq = named.partition("#")
                if seq.isdigit():
                    if int(seq) <= self.seen:
                        continue  # read as a row already
                    self.delivered.add(int(seq))
                yield kind, token, detail
            for notice in await self.read():
                yield notice


async def _retry_failed(handlers: Handlers, failed: set[str], every: float, hearing: Hearing) -> None:
    while True:
        await asyncio.sleep(every)
        for kind in sorted(failed):
            await _run(kind, handlers[kind], "", failed, hearing)  # what the failed notice said: unknown now
            hearing.settle(failed)


async def _run(
    kind: str, handler: Callable[[str], Awaitable[None]], detail: str, failed: set[str], hearing: Hearing
) -> None:
    try:
        await handler(detail)
    except KeysBehind as e:  # a state the handler names (it said so in the log itself)
        hearing.why[kind] = str(e)
        failed.add(kind)
    except ResidencyError as e:  # a state it explains (the store busy a moment): no traceback
        log.warning("acting on another process's %s change failed (%s); trying again", kind, e)
        failed.add(kind)
    except Exception:
        log.exception("acting on another process's %s change failed; trying again", kind)
        failed.add(kind)
    else:
        hearing.why.pop(kind, None)
        failed.discard(kind)
