"""A record and its data key live in two files (node.db, keys.db) and commit in two steps
(issue 15, point 1): a new key before the records sealed under it, an erased user's key after
the erasure. The primary is killed (SIGKILL, by itself: `RESIDENCY_CRASH_AFTER`) right after
each step of a put and of an erasure, and a region node after each step of applying copies;
after each restart every acknowledged record and copy opens, every erased user's key is gone
from keys.db's files, and the same users can be written again. Then, on a store alone: the
start-up reconciliation, an erased key destroyed after the commit, the store thread's
`before` steps (and a write run again after them), and a key service that is down."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from residency.server.config.rules import parse_rules
from residency.server.config.schema import load_schema
from residency.server.core import codec
from residency.server.core.errors import KeyUnavailable
from residency.server.deployment import AFFILIATES, EXAMPLE_RULES, EXAMPLE_SCHEMA, PRIMARY, free_ports
from residency.server.keys.keyring import Keyring
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.providers.openbao import OpenBaoProvider
from residency.server.storage.records import Row
from residency.server.storage.sqlite import SqliteStore
from residency.server.storage.thread import StoreThread, Unprepared
from residency.server.vault.new_keys import NewKeys
from residency.server.vault.records import Records, Write
from residency.v1 import records_pb2
from tests.conftest import Cluster, ctx, values
from tests.test_replication import FULL

pytestmark = pytest.mark.faults


def _file(cluster: Cluster, name: str, region: str = PRIMARY) -> Path:
    return cluster.data_dir(region) / name


def _query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Reads a store file as anyone with a copy of it would: sqlite3, read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def key_rows(cluster: Cluster, user: str, region: str = PRIMARY) -> int:
    keys = _file(cluster, "keys.db", region)
    return _query(keys, "SELECT count(*) FROM data_keys WHERE user_id = ?", user)[0][0]


def record_state(cluster: Cluster, user: str, region: str = PRIMARY) -> str:
    """'live', 'erased' (a tombstone) or 'none', as node.db holds it."""
    rows = _query(_file(cluster, "node.db", region), "SELECT deleted FROM records WHERE user_id = ?", user)
    return "none" if not rows else ("erased" if rows[0][0] else "live")


def orphans_destroyed(cluster: Cluster, region: str = PRIMARY) -> int:
    """The count the node logged at its last start."""
    found = re.findall(
        r"keyring: (\d+) data keys belonged to no record", _file(cluster, "node.log", region).read_text()
    )
    return int(found[-1])


async def start(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, crash_after: str = "", region: str = PRIMARY
) -> None:
    if crash_after:
        monkeypatch.setenv("RESIDENCY_CRASH_AFTER", crash_after)
    else:
        monkeypatch.delenv("RESIDENCY_CRASH_AFTER", raising=False)
    await cluster.start(region)


async def died(cluster: Cluster, region: str) -> None:
    """The node killed itself at its crash point (the test never kills it)."""
    assert await asyncio.to_thread(cluster.dep.procs[region].wait, 60) == -signal.SIGKILL
    cluster.stop(region)


async def killed_after(
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    write: Callable[[], Awaitable[Any]],
    region: str = PRIMARY,
) -> None:
    """Restarts `region`'s node armed to kill itself after `step`, sends `write` to the
    primary and waits for the node's death: by its own hand (a node that never reaches the
    step fails this). A killed primary never answers `write`."""
    if region in cluster.dep.procs:
        cluster.stop(region)
    await start(cluster, monkeypatch, step, region)
    if region != PRIMARY:
        await write()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await write()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    await died(cluster, region)


def put_many(cluster: Cluster, records: dict[str, dict[str, Any]]) -> Any:
    request = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    for user, fields in records.items():
        rec = request.records.add(user_id=user, source="registration")
        for name, value in fields.items():
            rec.fields[name].CopyFrom(codec.to_value(value))
    return cluster.records().PutRecords(request, timeout=30)


async def all_open(cluster: Cluster, acked: dict[str, dict[str, Any]], erased: set[str]) -> None:
    for user, fields in acked.items():
        assert values(await cluster.get(user)) == fields, user
    for user in erased:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cluster.get(user)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert key_rows(cluster, user) == 0, f"the key of erased user {user} is still in keys.db"


def fields(tag: str) -> dict[str, Any]:
    return {"name": f"Li Wei {tag}", "email": f"{tag}@example.cn"}


async def test_a_crash_after_any_step_loses_no_acknowledged_record_and_keeps_no_erased_key(
    idle_cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    c = idle_cluster
    acked = {u: fields(u) for u in ("u-a", "u-b", "u-c")}
    erased: set[str] = set()
    await start(c, monkeypatch)
    for user, f in acked.items():
        await c.put(user, f)
    c.stop(PRIMARY)  # for the copy below; `killed_after` starts it again
    # An old copy of node.db, as a thief or a backup has it, and the keys that open it today.
    backup = tmp_path / "node-before-erasures.db"
    with sqlite3.connect(backup) as copy:
        live = sqlite3.connect(f"file:{_file(c, 'node.db')}?mode=ro", uri=True)
        live.backup(copy)
        live.close()
    copy.close()
    wrapped = dict(_query(_file(c, "keys.db"), "SELECT user_id, wrapped FROM data_keys"))

    # 1. Killed once the new user's key committed, before the records: a key without a record.
    both = {"u-new1": fields("x"), "u-a": fields("a2")}
    await killed_after(c, monkeypatch, "keys", lambda: put_many(c, both))
    assert (record_state(c, "u-new1"), key_rows(c, "u-new1")) == ("none", 1)
    await start(c, monkeypatch)
    assert orphans_destroyed(c) == 1 and key_rows(c, "u-new1") == 0
    await all_open(c, acked, erased)  # u-a's unacknowledged update did not land either
    await c.put("u-new1", fields("new1"))
    acked["u-new1"] = fields("new1")

    # 2. Killed once the records committed under the new key: unacknowledged, yet it opens.
    await killed_after(c, monkeypatch, "records", lambda: put_many(c, {"u-new2": fields("new2")}))
    assert (record_state(c, "u-new2"), key_rows(c, "u-new2")) == ("live", 1)
    await start(c, monkeypatch)
    assert orphans_destroyed(c) == 0
    acked["u-new2"] = fields("new2")
    await all_open(c, acked, erased)

    # 3. Killed once the erasure committed, before its key was destroyed (the node destroys
    # it at start); 4. once the key was destroyed, before the caller heard of it.
    for step, user, key_left in (("records", "u-b", 1), ("shred", "u-c", 0)):
        await killed_after(c, monkeypatch, step, lambda user=user: c.delete(user))
        assert (record_state(c, user), key_rows(c, user)) == ("erased", key_left)
        await start(c, monkeypatch)
        assert orphans_destroyed(c) == key_left
        del acked[user]
        erased.add(user)
        await all_open(c, acked, erased)
        with pytest.raises(grpc.aio.AioRpcError) as again:  # erasing it again changes nothing
            await c.delete(user)
        assert again.value.code() == grpc.StatusCode.NOT_FOUND

    # The erased users' records are still live and sealed in the old copy of node.db, and
    # their keys are nowhere in keys.db's files (WAL included): the copy stays shut.
    assert {u for (u,) in _query(backup, "SELECT user_id FROM records WHERE deleted = 0")} >= erased
    disk = b"".join(p.read_bytes() for p in _file(c, "keys.db").parent.glob("keys.db*"))
    assert wrapped["u-a"] in disk
    assert all(wrapped[u] not in disk for u in erased)

    # Writes for the same users keep working, erased ones included (under new keys).
    for user in ("u-a", "u-b", "u-c", "u-new1", "u-new2"):
        acked[user] = fields(f"{user}-again")
        await c.put(user, acked[user])
    erased.clear()
    await all_open(c, acked, erased)


async def test_a_region_node_killed_between_a_copys_key_and_the_copy_opens_every_copy(
    idle_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
):
    """The same steps where a region node applies copies: keys first, then the copies (or
    tombstones), then the erased copies' keys. The primary sends again what was not
    acknowledged; each copy the region then holds opens, and no withdrawn copy's key stays."""
    c, sg = idle_cluster, AFFILIATES[0]
    await start(c, monkeypatch)
    await c.start(*AFFILIATES)
    users = ["u-r1", "u-r2", "u-r3"]
    await c.accept_cookies(users)
    await c.put("u-r1", FULL)
    await c.replicated()
    expected = values(await c.held("u-r1", sg))
    assert expected  # the rules send this region some of the fields

    async def killed_after_and_back(step: str, write: Callable[[], Awaitable[Any]]) -> None:
        await killed_after(c, monkeypatch, step, write, sg)
        await start(c, monkeypatch, region=sg)
        await c.replicated()

    # The new user's key committed, not its copy: the primary sends it again.
    updated = {**FULL, "language": "en-GB"}
    await killed_after_and_back("keys", lambda: put_many(c, {"u-r2": FULL, "u-r1": updated}))
    assert orphans_destroyed(c, sg) == 1
    await killed_after_and_back("records", lambda: put_many(c, {"u-r3": FULL}))
    assert orphans_destroyed(c, sg) == 0
    assert values(await c.held("u-r1", sg)) == {n: updated[n] for n in expected}
    for user in ("u-r2", "u-r3"):
        assert values(await c.held(user, sg)) == expected, user

    # An erasure's tombstone applied, its key not yet destroyed; then one destroyed.
    await killed_after_and_back("records", lambda: c.delete("u-r1"))
    assert orphans_destroyed(c, sg) == 1
    await killed_after_and_back("shred", lambda: c.delete("u-r2"))
    assert orphans_destroyed(c, sg) == 0
    for user in ("u-r1", "u-r2"):
        assert (record_state(c, user, sg), key_rows(c, user, sg)) == ("erased", 0)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await c.held(user, sg)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert values(await c.held("u-r3", sg)) == expected


# ---- the reconciliation and the two steps on a store alone ---------------------------------


def _row(user: str, deleted: bool = False) -> Row:
    return Row(user, 1, deleted, b"sealed-" + user.encode(), 0.0)


def test_start_destroys_exactly_the_keys_no_live_record_or_copy_uses(tmp_path: Path):
    store = SqliteStore(tmp_path / "node.db")
    keys = {
        "u-live": "wk-1",  # a primary's record
        "u-erased": "wk-1",  # erasure committed, key not yet destroyed (crash)
        "u-unwritten": "wk-1",  # key committed, records not (crash)
        "u-copy": "hpke:k1",  # a region node's copy, its key wrapped to the region key
        "u-copy-transit": "transit:k1:t1",
        "u-copy-withdrawn": "transit:k1:t1",  # a tombstone for the copy
    }
    store.add_data_keys({"wk-1": b"w"}, [(u, wk, b"wrapped-key-of-" + u.encode()) for u, wk in keys.items()])
    with store.transaction():
        store.upsert(
            [
                _row("u-live"),
                _row("u-erased", deleted=True),
                _row("u-copy"),
                _row("u-copy-transit"),
                _row("u-copy-withdrawn", deleted=True),
                _row("u-no-key"),  # a live record never loses a key it does not have either
            ]
        )
    assert store.drop_orphan_keys() == 3
    assert set(store.data_keys(list(keys))) == {"u-live", "u-copy", "u-copy-transit"}
    assert store.drop_orphan_keys() == 0  # nothing more on a second start
    store.close()
    # Overwritten in the file and gone from the WAL, not only unlinked.
    disk = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    for gone in ("u-erased", "u-unwritten", "u-copy-withdrawn"):
        assert b"wrapped-key-of-" + gone.encode() not in disk
    assert b"wrapped-key-of-u-live" in disk


def test_an_erased_key_goes_after_the_commit_unless_the_user_is_live_again(tmp_path: Path):
    store = SqliteStore(tmp_path / "node.db")
    users = ["u-erased", "u-rewritten", "u-rolled-back"]
    store.add_data_keys({}, [(u, "wk", b"k") for u in users])
    with store.transaction():
        store.upsert([_row(u) for u in users])
    with store.transaction():
        store.upsert([_row("u-erased", deleted=True), _row("u-rewritten", deleted=True)])
        store.delete_data_keys(["u-erased", "u-rewritten"])
        assert set(store.data_keys(users)) == set(users)  # not before the erasure commits
        store.upsert([_row("u-rewritten")])  # written again in the same transaction
    assert set(store.data_keys(users)) == {"u-rewritten", "u-rolled-back"}
    with pytest.raises(RuntimeError), store.transaction():  # an erasure that never commits
        store.upsert([_row("u-rolled-back", deleted=True)])
        store.delete_data_keys(["u-rolled-back"])
        raise RuntimeError("the write failed")
    with store.transaction():  # and a later commit does not destroy its key either
        store.upsert([_row("u-other")])
    assert set(store.data_keys(users)) == {"u-rewritten", "u-rolled-back"}
    store.close()


async def test_before_steps_run_once_per_batch_and_an_unprepared_write_runs_again(tmp_path: Path):
    store = SqliteStore(tmp_path / "node.db")
    db = StoreThread(store)
    db.start()
    seen: list[list[str]] = []
    prepared: set[str] = set()

    def before(items: list[str]) -> None:
        seen.append(list(items))
        prepared.update(items)

    def write(items: list[str]) -> list[str]:
        if "late" in items and "late" not in prepared:
            raise Unprepared("late was not prepared")
        return [f"wrote {i}" for i in items]

    def broken_before() -> None:
        raise OSError("the keyring's disk")

    # One batch: queued before the store thread takes any of them.
    results = await asyncio.gather(
        db.write_many(write, ["a", "b"], before),
        db.write_many(write, ["c"], before),
        db.write(lambda: "no step"),
        db.write(lambda: "never runs", before=broken_before),
        return_exceptions=True,
    )
    assert results[:3] == [["wrote a", "wrote b"], ["wrote c"], "no step"]
    assert isinstance(results[3], OSError)
    assert seen == [["a", "b", "c"]]  # one step for the batch's three items

    # A write the step did not cover (it saw the store before the batch) runs again after it.
    prepared.clear()
    seen.clear()

    def skip_late(items: list[str]) -> None:
        seen.append(list(items))
        if len(seen) > 1:
            prepared.update(items)

    assert await db.write_many(write, ["late"], skip_late) == ["wrote late"]
    assert seen == [["late"], ["late"]]
    await db.drain()
    store.close()


async def test_a_user_erased_and_written_again_in_one_batch_is_written_under_a_new_key(tmp_path: Path):
    """The batch's key step ran while the user was live; the write after the erasure in the
    same batch runs again after it, under a key of its own, and the erased key is gone."""
    (tmp_path / "schema.yaml").write_text(EXAMPLE_SCHEMA)
    schema = load_schema(tmp_path / "schema.yaml")
    rules = parse_rules(yaml.safe_load(EXAMPLE_RULES), schema, "rules.yaml", "v1")
    store = SqliteStore(tmp_path / "node.db")
    keyring = Keyring(PRIMARY, LocalProvider.create(tmp_path / "k", b"test passphrase"), tmp_path / "k")
    records = Records(PRIMARY, True, schema, rules, keyring, store, outbox=False)
    db = StoreThread(store)
    db.start()

    def write(email: str) -> list[Write]:
        body = records_pb2.Record()
        body.fields["email"].CopyFrom(codec.to_value(email))
        return [Write("u-1", "registration", body.SerializeToString())]

    assert await db.write_many(records.put, write("old@example.cn"), records.prepare_keys) == [1]
    old = store.data_keys(["u-1"])["u-1"]
    steps: list[str] = []

    def prepare(writes: list[Write]) -> None:
        steps.append("live" if store.live_users(["u-1"]) else "erased")
        records.prepare_keys(writes)

    erased, written = await asyncio.gather(  # queued together: one batch
        db.write(lambda: records.delete("u-1", "spiffe://residency/operator/cn-north/test")),
        db.write_many(records.put, write("new@example.cn"), prepare),
    )
    assert (erased, written) == (2, [3])
    assert steps == ["live", "erased"]  # the key step ran again once the erasure committed
    new = store.data_keys(["u-1"])["u-1"]
    assert new[2] != old[2]  # not the erased user's key again
    keyring.data_keys.drop("u-1")  # opened from keys.db, not from memory
    opened = records.open_row(store.rows(["u-1"])["u-1"])
    assert codec.from_value(opened.fields["email"]) == "new@example.cn"
    await db.drain()
    store.close()


def test_a_new_users_write_fails_closed_while_the_key_service_is_down(tmp_path: Path):
    """No key from the provider (OpenBao, nothing listening): the new user's write is told
    KeyUnavailable, and nothing reaches the keyring."""
    store = SqliteStore(tmp_path / "node.db")
    (port,) = free_ports(1)
    down = OpenBaoProvider(f"http://127.0.0.1:{port}", "token", "residency", timeout=2.0)
    new_keys = NewKeys(Keyring(PRIMARY, down, tmp_path / "k"), store)
    new_keys.prepare(["u-new", "u-new"])
    with pytest.raises(KeyUnavailable):
        new_keys.take("u-new")
    assert store.data_keys(["u-new"]) == {}
    # A user with a live record needs no new key: the step asks the provider nothing.
    with store.transaction():
        store.upsert([_row("u-live")])
    new_keys.prepare(["u-live"])
    with pytest.raises(Unprepared):  # and has none to give, if asked anyway
        new_keys.take("u-live")
    down.close()
    store.close()
