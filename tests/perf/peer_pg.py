"""The peer `bench_replication` measures ours against: PostgreSQL logical replication of the
bench's rows between two real PostgreSQL servers, through a publication with a column list.

What a user would set up instead of residency: a `users` table on a publisher (the home
region) with every field the bench writes, a publication of the columns the example rules
send to ap-southeast-1 (`CREATE PUBLICATION ... FOR TABLE users (user_id, ...)`), and a
subscriber (the affiliate) whose table holds only those columns, plus `applied_at`, stamped
by its own clock as the apply worker inserts the row (a column default: the peer does no
other work for it). `updated_at` is stamped by the publisher's clock in the writing
transaction, as the primary stamps a copy's: one host, one clock, so `applied_at -
updated_at` is each row's exact commit-to-applied lag, measured as the bench measures ours.
Both servers run PostgreSQL's defaults (`fsync=on`, `synchronous_commit=on` on the
publisher; the apply worker's `synchronous_commit=off`, which loses nothing: a subscriber
that crashes asks the publisher again from its last flushed position).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from residency.server.config.rules import rules_from_bytes
from residency.server.config.schema import load_schema
from residency.server.deployment import EXAMPLE_RULES, EXAMPLE_SCHEMA
from tests.perf.bench_put import pct, ten_fields
from tests.postgres import Postgres

DESTINATION = "ap-southeast-1"
FIELDS = list(ten_fields(0))
SAMPLE_S = 0.05  # the bench samples ReplicationStatus every 50 ms; the peer's lag alike


def published_fields() -> list[str]:
    """The fields of the bench's records that the example rules send to DESTINATION (the
    publication's column list, worked out by our own rule evaluation, not written by hand)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "schema.yaml").write_text(EXAMPLE_SCHEMA)
        schema = load_schema(Path(d) / "schema.yaml")
    rules = rules_from_bytes(EXAMPLE_RULES.encode(), schema, "the example rules")
    sent, _withheld = rules.plan(DESTINATION).project(dict.fromkeys(FIELDS))
    return list(sent)


def row(user_id: str, i: int) -> tuple[str, ...]:
    """The publisher's row of bench record `i`: the same values, so the same row sizes."""
    return (user_id, *(v.string_value for v in ten_fields(i).values()))


@contextlib.contextmanager
def servers() -> Iterator[tuple[Postgres, Postgres]]:
    """A publisher (`wal_level=logical`) and a subscriber, stopped and removed on the way out,
    whatever happened."""
    publisher, subscriber = Postgres(settings={"wal_level": "logical"}), Postgres()
    try:
        for pg in (publisher, subscriber):
            pg.start().wait_ready()
        yield publisher, subscriber
    finally:
        subscriber.stop()
        publisher.stop()


async def connect(pg: Postgres) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True)


async def until(
    conn: psycopg.AsyncConnection,
    sql: str,
    ok: Callable[[Any], bool],
    what: str,
    params: tuple[Any, ...] = (),
    deadline: float = 300,
) -> None:
    """Polls `sql` until `ok(first row)`, every 5 ms, for at most `deadline` seconds."""
    end = time.monotonic() + deadline
    while not ok(await (await conn.execute(sql, params)).fetchone()):
        if time.monotonic() > end:
            raise TimeoutError(f"the subscriber did not {what} within {deadline:.0f} s")
        await asyncio.sleep(0.005)


async def replicate(publisher: Postgres, subscriber: Postgres, columns: list[str]) -> None:
    """The table on both sides, the publication with its column list, the subscription; returns
    once the subscription's table is in sync (state `r`)."""
    published = ", ".join(["user_id", "version", "updated_at", *columns])
    async with await connect(publisher) as pub, await connect(subscriber) as sub:
        await pub.execute(
            "CREATE TABLE users (user_id text PRIMARY KEY, version bigint NOT NULL DEFAULT 1, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
            + ", ".join(f"{f} text" for f in FIELDS)
            + ")"
        )
        await pub.execute(f"CREATE PUBLICATION to_region FOR TABLE users ({published})")
        await sub.execute(
            "CREATE TABLE users (user_id text PRIMARY KEY, version bigint NOT NULL, "
            "updated_at timestamptz NOT NULL, "
            + "".join(f"{f} text, " for f in columns)
            + "applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        await sub.execute(
            f"CREATE SUBSCRIPTION from_home CONNECTION '{publisher.dsn()}' PUBLICATION to_region"
        )
        await until(
            sub,
            "SELECT count(*) FILTER (WHERE srsubstate = 'r'), count(*) FROM pg_subscription_rel",
            lambda r: r[0] == r[1] == 1,
            "sync the users table",
            deadline=60,
        )


async def arrived(
    sub: psycopg.AsyncConnection, rows: list[tuple[str, ...]], columns: list[str]
) -> list[tuple[float, float]]:
    """(updated_at, applied_at) of `rows` on the subscriber, in seconds since the epoch, in
    stamp order; fails unless every row arrived with the publisher's values of the published
    columns (the peer is credited only with what it delivered)."""
    ids = [r[0] for r in rows]
    cur = await sub.execute(
        "SELECT extract(epoch FROM updated_at)::float8, extract(epoch FROM applied_at)::float8, "
        f"user_id, {', '.join(columns)} FROM users WHERE user_id = ANY(%s) ORDER BY updated_at",
        (ids,),
    )
    found = await cur.fetchall()
    got = {f[2]: f[3:] for f in found}
    at = [1 + FIELDS.index(c) for c in columns]
    wrong = sum(got.get(r[0]) != tuple(r[i] for i in at) for r in rows)
    if wrong or len(found) != len(rows):
        raise AssertionError(f"{wrong} of {len(rows)} rows missing or different on the subscriber")
    return [(f[0], f[1]) for f in found]


async def bulk(publisher: Postgres, subscriber: Postgres, n: int, columns: list[str]) -> dict:
    """`n` new rows in one COPY (one transaction); the time from its start until the last row
    is applied on the subscriber."""
    rows = [row(f"b-{i:08d}", i) for i in range(n)]
    async with await connect(publisher) as pub, await connect(subscriber) as sub:
        t0 = time.time()
        async with pub.cursor().copy(f"COPY users (user_id, {', '.join(FIELDS)}) FROM STDIN") as copy:
            for r in rows:
                await copy.write_row(r)
        committed = time.time()
        # One transaction: its last row visible on the subscriber means all of them are.
        last = "SELECT count(*) FROM users WHERE user_id = %s"
        await until(sub, last, lambda r: r[0] == 1, "apply the bulk", (rows[-1][0],))
        applied = max(a for _u, a in await arrived(sub, rows, columns))
    return {
        "rows": n,
        "rows_per_s": round(n / (applied - t0)),
        "insert_ms": round((committed - t0) * 1000, 1),
        "commit_to_applied_ms": round((applied - committed) * 1000, 1),
    }


async def steady(publisher: Postgres, subscriber: Postgres, n: int, rate: int, columns: list[str]) -> dict:
    """`n` single-row transactions (new users) paced at `rate`/s on 16 connections; then
    each row's exact commit-to-applied lag, how far behind the last one the subscriber
    finished, and the age of the oldest change not yet applied every 50 ms (as the bench
    samples ours), rebuilt from the stamps so that sampling takes nothing from the peer."""
    values = ", ".join(["%s"] * (len(FIELDS) + 1))
    insert = f"INSERT INTO users (user_id, {', '.join(FIELDS)}) VALUES ({values})"
    async with AsyncConnectionPool(
        publisher.dsn(), min_size=16, max_size=16, kwargs={"autocommit": True}, timeout=300, open=False
    ) as pool:
        await pool.open(wait=True)
        rows = [row(f"s-{i:08d}", 10_000_000 + i) for i in range(n)]

        async def one(r: tuple[str, ...]) -> None:
            async with pool.connection() as c:
                await c.execute(insert, r)

        start = time.perf_counter()
        calls = []
        for sent, r in enumerate(rows, 1):
            calls.append(asyncio.ensure_future(one(r)))
            await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
        await asyncio.gather(*calls)
        achieved = n / (time.perf_counter() - start)
    async with await connect(subscriber) as sub:
        caught_up = "SELECT count(*) FROM users WHERE user_id LIKE 's-%%'"
        await until(sub, caught_up, lambda r: r[0] == n, "catch up")
        stamps = await arrived(sub, rows, columns)
    lags = [a - u for u, a in stamps]
    sampled = oldest_unapplied(stamps, SAMPLE_S)
    return {
        "transactions": n,
        "transactions_per_s": round(achieved),
        "behind_last_ms": round((max(a for _u, a in stamps) - stamps[-1][0]) * 1000, 1),
        "applied_lag_ms": {"p50": pct(lags, 50), "p99": pct(lags, 99), "max": pct(lags, 100)},
        "lag_ms": {"p50": pct(sampled, 50), "p99": pct(sampled, 99), "max": pct(sampled, 100)},
    }


def oldest_unapplied(stamps: list[tuple[float, float]], every: float) -> list[float]:
    """At every `every` seconds from the first write to the last apply: the age of the oldest
    row written (stamped) but not yet applied, 0 if none (ReplicationStatus.lag_seconds'
    definition). `stamps` in stamp order; a row once applied stays applied, so one pass."""
    written = [u for u, _a in stamps]
    t, end = written[0], max(a for _u, a in stamps)
    oldest, out = 0, []
    while t <= end:
        seen = bisect.bisect_right(written, t)
        while oldest < seen and stamps[oldest][1] <= t:
            oldest += 1
        out.append(t - written[oldest] if oldest < seen else 0.0)
        t += every
    return out


async def measure(backlog: int, transactions: int, rate: int) -> dict:
    """Both phases on a fresh pair of servers: steady first, then bulk, as the bench orders
    ours."""
    columns = published_fields()
    with servers() as (publisher, subscriber):
        await replicate(publisher, subscriber, columns)
        out: dict[str, Any] = {"columns": ["user_id", "version", "updated_at", *columns]}
        out["steady"] = await steady(publisher, subscriber, transactions, rate, columns)
        out["bulk"] = await bulk(publisher, subscriber, backlog, columns)
    return out
