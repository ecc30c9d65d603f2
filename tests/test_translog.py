"""The transfer log's hash chain and its storage."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from residency.server.core import merkle, translog
from residency.server.core.errors import StorageFull
from residency.server.storage.database import MIGRATIONS
from residency.server.storage.sqlite import SqliteStore
from tests.conftest import BACKENDS, replication_entry


def entry(i: int) -> dict:
    return replication_entry(i)


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """The log's storage tests run on SQLite and on PostgreSQL (those about SQLite's own
    files, PRAGMAs and errors name `SqliteStore`)."""
    return str(request.param)


@pytest.fixture
def store(open_store):
    return open_store()


def chain_of(store) -> list[tuple[bytes, bytes]]:
    return [(data, chain) for _, data, chain in store.log_after(0, 1000)]


def test_canonical_json_is_sorted_and_compact():
    assert translog.canonical({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_the_chain_detects_changed_dropped_and_reordered_entries(store):
    with store.transaction():
        store.log_append([entry(i) for i in range(10)])
    good = chain_of(store)
    assert translog.verify_chain(good) is None
    changed = list(good)
    changed[4] = (changed[4][0].replace(b"u-4", b"u-X"), changed[4][1])
    assert translog.verify_chain(changed) == 4
    assert translog.verify_chain(good[:3] + good[4:]) == 3
    assert translog.verify_chain(good[:5] + [good[6], good[5]] + good[7:]) == 5


def test_sequences_continue_across_reopen_and_a_rolled_back_append_leaves_no_gap(open_store):
    s = open_store()
    with s.transaction():
        assert s.log_append([entry(0), entry(1)]) == [1, 2]
    with pytest.raises(RuntimeError), s.transaction():
        s.log_append([entry(2)])
        raise RuntimeError("the write this entry recorded failed")
    with s.transaction():
        assert s.log_append([entry(3)]) == [3]
    s.close()
    s = open_store()
    with s.transaction():
        assert s.log_append([entry(4)]) == [4]
    assert translog.verify_chain(chain_of(s)) is None
    s.close()


def test_a_failed_write_in_a_group_rolls_back_alone(store):
    with store.transaction():
        store.savepoint()
        store.log_append([entry(0)])
        store.release_savepoint()
        store.savepoint()
        store.log_append([entry(1)])
        store.rollback_savepoint()
        store.savepoint()
        assert store.log_append([entry(2)]) == [2]
        store.release_savepoint()
    assert [seq for seq, _, _ in store.log_after(0, 10)] == [1, 2]
    assert translog.verify_chain(chain_of(store)) is None
    # The Merkle tree holds exactly the committed entries, at leaf index = sequence - 1.
    committed = [merkle.leaf_hash(data) for _, data, _ in store.log_after(0, 10)]
    assert store.log_tree().size == 2 and store.log_tree().root() == merkle.root(committed)


def test_entries_are_dated_at_append_and_never_earlier_than_the_one_before(open_store, monkeypatch):
    """The store stamps each entry's time when it appends it, whoever prepared it and when;
    a clock stepped back, or another process appending to the same log (a standalone
    replicator), never makes a later entry look older."""
    from residency.server.storage import transferlog

    clock = iter([100.0, 90.0, 95.0, 200.0, 150.0])
    monkeypatch.setattr(transferlog.time, "time", lambda: next(clock))
    node, replicator = open_store(), open_store()
    prepared = entry(0)
    assert "time" not in prepared  # nothing dates an entry before the store appends it
    for s in (node, replicator, node, replicator, node):
        with s.transaction():
            s.log_append([prepared, entry(1)])
    times = [json.loads(data)["time"] for _, data, _ in node.log_after(0, 100)]
    assert times == [100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 200.0, 200.0, 200.0, 200.0]
    assert translog.verify_chain(chain_of(node)) is None
    node.close()
    replicator.close()


def test_migrations_are_versioned(tmp_path):
    store = SqliteStore(tmp_path / "node.db")
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _schema(path) -> list[tuple]:
    db = sqlite3.connect(path)
    db.execute("ATTACH DATABASE ? AS keyring", (str(path.with_name("keys.db")),))
    found = [
        (schema, *row)
        for schema in ("main", "keyring")
        for row in db.execute(f"SELECT type, name, sql FROM {schema}.sqlite_master ORDER BY name")
    ]
    db.close()
    return found


@pytest.mark.parametrize("applied", range(len(MIGRATIONS)))
def test_a_database_left_at_an_earlier_version_migrates_to_the_same_schema(tmp_path, applied):
    """`user_version` counts the migrations applied: a store opened on a database an older
    release made applies only the files after it, and ends as a new one does."""
    old = tmp_path / "old" / "node.db"
    old.parent.mkdir()
    db = sqlite3.connect(old, isolation_level=None)
    db.execute("ATTACH DATABASE ? AS keyring", (str(old.with_name("keys.db")),))
    for migration in MIGRATIONS[:applied]:
        for statement in migration.statements():
            db.execute(statement)
    db.execute(f"PRAGMA user_version={applied}")
    db.close()
    SqliteStore(old).close()
    SqliteStore(tmp_path / "new" / "node.db").close()
    assert _schema(old) == _schema(tmp_path / "new" / "node.db")
    # Released migrations keep their numbers: a database's version says which of them it has.
    released = [
        "records_outbox_cursors_translog",
        "consents_grants_sweeps",
        "checkpoints_archive",
        "keyring",
        "replication_control",
    ]
    assert [(m.version, m.name) for m in MIGRATIONS[:5]] == list(enumerate(released, 1))


def test_the_tree_and_checkpoints_survive_a_reopen_and_rolled_back_entries_never_join(open_store):
    s = open_store()
    with s.transaction():
        s.log_append([entry(i) for i in range(5)])
    with pytest.raises(RuntimeError), s.transaction():
        s.log_append([entry(5)])
        raise RuntimeError("the event this entry recorded failed")
    assert s.log_tree().size == 5
    root = s.log_tree().root()
    s.checkpoint_save(5, "note")
    s.close()
    s = open_store()
    assert s.log_tree().size == 5 and s.log_tree().root() == root
    assert s.checkpoint_latest() == (5, "note")
    s.close()


def _consistent(s: SqliteStore) -> None:
    """What is stored, what the tree holds and what a new append chains onto agree: an export
    of the log verifies against a root signed from this tree."""
    stored = [data for _, data, _ in s.log_after(0, 10_000)]
    assert [json.loads(d)["sequence"] for d in stored] == list(range(1, len(stored) + 1))
    assert translog.verify_chain(chain_of(s)) is None
    assert s.log_tree().size == len(stored)
    assert s.log_tree().root() == merkle.root([merkle.leaf_hash(d) for d in stored])


def test_a_commit_that_fails_leaves_no_trace_in_the_logs_memory(tmp_path):
    """COMMIT itself can fail (disk full, an I/O error, a deferred constraint): the entries it
    would have added must not linger in the sequence, the chain head or the tree."""
    s = SqliteStore(tmp_path / "node.db")
    s._db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    s._db.execute("CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    with s.transaction():
        s.log_append([entry(i) for i in range(3)])
    with pytest.raises(sqlite3.IntegrityError), s.transaction():
        s.log_append([entry(3), entry(4)])
        s._db.execute("INSERT INTO child VALUES (42)")  # checked only at COMMIT, which fails
    with s.transaction():
        assert s.log_append([entry(5)]) == [4]
    _consistent(s)
    s.close()


def test_a_full_disk_fails_the_write_cleanly_and_the_log_goes_on_when_space_returns(tmp_path):
    s = SqliteStore(tmp_path / "node.db")
    with s.transaction():
        s.log_append([entry(i) for i in range(3)])
    used = s._db.execute("PRAGMA page_count").fetchone()[0]
    s._db.execute(f"PRAGMA max_page_count={used}")  # the database file cannot grow any more
    with pytest.raises(StorageFull, match="disk is full.*nothing was written"), s.transaction():
        s.log_append([replication_entry(i) | {"reason": "x" * 50_000} for i in range(3, 8)])
    _consistent(s)
    s._db.execute("PRAGMA max_page_count=1073741823")  # space returns
    with s.transaction():
        assert s.log_append([entry(9)]) == [4]
    _consistent(s)
    s.close()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


_described = st.lists(st.dictionaries(st.text(), _json, max_size=4), max_size=4)


@given(st.dictionaries(st.text(), _json, max_size=8), st.dictionaries(st.text(), _described, max_size=3))
def test_canonical_bytes_are_sorted_compact_json_whether_or_not_lists_are_shared(plain, lists):
    entry = {**plain, **{k: translog.Shared(v) for k, v in lists.items()}}
    expected = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert translog.canonical(entry) == expected
