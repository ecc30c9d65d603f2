"""The transfer log's tree as C2SP tlog-tiles: the same roots and proofs as the in-memory tree,
tiles written with their entries, a restart that reads only the right edge, and a tampered
tile refused by name."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from residency.server.core import merkle
from residency.server.core.checkpoint import Checkpoint, LogSigner
from residency.server.deployment import PRIMARY
from residency.server.storage.sqlite import SqliteStore
from tests.conftest import replication_entry

N = 3 * 256 * 256 + 1000  # three full level-1 tiles, so that level 2 holds hashes
LEAVES = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(N)]
FULL = merkle.Tree(LEAVES)


def tiled(leaves: list[bytes], chunks: list[int]) -> tuple[merkle.TileTree, dict[tuple[int, int], bytes]]:
    """A TileTree fed in chunks of the given sizes, its tiles kept in a dict as a store would."""
    stored: dict[tuple[int, int], bytes] = {}
    edge, done = merkle.TileEdge(), 0
    for n in [*chunks, len(leaves)]:
        for level, index, data in edge.extend(leaves[done : done + n]):
            stored[level, index] = data
        done = min(done + n, len(leaves))
    return merkle.TileTree(edge, lambda level, index: stored[level, index]), stored


TREE, TILES = tiled(LEAVES, [1, 255, 300, 65_536, 7])


def test_tile_paths_follow_c2sp_tlog_tiles():
    assert merkle.tile_path(0, 0) == "tile/0/000"
    assert merkle.tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert merkle.tile_path(2, 1000, 17) == "tile/2/x001/000.p/17"
    assert merkle.tile_path(1, 999, 255) == "tile/1/999.p/255"


def test_tiles_hold_the_leaves_and_the_roots_of_the_subtrees_below():
    assert TILES[0, 5] == b"".join(LEAVES[5 * 256 : 6 * 256])
    assert TILES[1, 0][32 * 5 : 32 * 6] == FULL.subtree(5 * 256, 6 * 256)
    assert TILES[2, 0] == b"".join(FULL.subtree(i << 16, (i + 1) << 16) for i in range(3))
    # The right edge: partial tiles, as wide as the tree needs (1000 = 3 * 256 + 232).
    assert len(TILES[0, N // 256]) == 32 * (N % 256) and len(TILES[1, 3]) == 32 * 3


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_roots_and_proofs_from_tiles_equal_the_in_memory_trees(data):
    size = data.draw(st.integers(1, N))
    index = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(0, size))
    assert TREE.root(size) == FULL.root(size)
    assert TREE.inclusion_proof(index, size) == FULL.inclusion_proof(index, size)
    assert TREE.consistency_proof(old, size) == FULL.consistency_proof(old, size)
    assert TREE.leaf(index) == LEAVES[index]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 700), max_size=6), st.integers(1, 2000))
def test_any_chunking_writes_the_same_tiles(chunks, size):
    tree, tiles = tiled(LEAVES[:size], chunks)
    _, whole = tiled(LEAVES[:size], [])
    assert tiles == whole and tree.root() == FULL.root(size)


def test_extending_a_copy_leaves_the_original_as_it_was():
    copy = TREE.copy()
    copy.extend(LEAVES[:600])
    assert copy.root() == merkle.root(LEAVES + LEAVES[:600]) and TREE.root() == FULL.root()


def test_an_altered_tile_is_refused_when_read_naming_it():
    tiles = dict(TILES)
    tiles[0, 7] = tiles[0, 7][:-1] + bytes([tiles[0, 7][-1] ^ 1])
    edge = merkle.TileEdge.at(N, lambda level, index, width: tiles[level, index][: width * 32])
    tree = merkle.TileTree(edge, lambda level, index: tiles[level, index])
    assert tree.root() == FULL.root()  # the root does not read inner tiles
    with pytest.raises(merkle.TileMismatch, match="tile/0/007 does not match"):
        tree.inclusion_proof(7 * 256, N)
    # A short (partial-size) tile where a full one belongs is refused too.
    tiles[0, 9] = tiles[0, 9][:64]
    with pytest.raises(merkle.TileMismatch, match="tile/0/009"):
        tree.leaf(9 * 256)


# ---- the store: tiles written with their entries, start-up from the right edge ----------


def fill(path, n: int, checkpoint: bool = True) -> bytes:
    """A store with `n` entries, and a checkpoint over them; returns the root."""
    s = SqliteStore(path)
    for i in range(0, n, 500):
        with s.transaction():
            s.log_append([replication_entry(j) for j in range(i, min(i + 500, n))])
    root = s.log_tree().root()
    if checkpoint:
        note = LogSigner.new("residency/test").sign(Checkpoint("residency/test", n, root))
        s.checkpoint_save(n, note)
    s.close()
    return root


def entries_root(path) -> bytes:
    db = sqlite3.connect(path)
    rows = db.execute("SELECT entry FROM translog ORDER BY sequence").fetchall()
    db.close()
    return merkle.root([merkle.leaf_hash(e) for (e,) in rows])


def execute(path, sql: str, *args) -> list[tuple]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


@pytest.fixture
def hashed(monkeypatch) -> list[int]:
    """Counts leaf hashes (each is one entry read and hashed)."""
    count = [0]
    leaf_hash = merkle.leaf_hash

    def counted(data: bytes) -> bytes:
        count[0] += 1
        return leaf_hash(data)

    monkeypatch.setattr(merkle, "leaf_hash", counted)
    return count


def test_a_restart_reads_the_right_edge_and_hashes_no_entry(tmp_path, hashed):
    root = fill(tmp_path / "node.db", 70_000)
    assert root == entries_root(tmp_path / "node.db")
    hashed[0] = 0
    s = SqliteStore(tmp_path / "node.db")
    assert hashed[0] == 0
    tree = s.log_tree()
    assert tree.size == 70_000 and tree.root() == root
    proof = tree.inclusion_proof(12_345, 70_000)
    merkle.verify_inclusion(12_345, 70_000, tree.leaf(12_345), proof, root)
    assert hashed[0] == 0
    # After a crash, only the entries the latest checkpoint does not cover are hashed again.
    with s.transaction():
        s.log_append([replication_entry(i) for i in range(300)])
    s.close()
    hashed[0] = 0
    SqliteStore(tmp_path / "node.db").close()
    assert hashed[0] == 300


def test_a_store_without_tiles_gets_them_once(tmp_path, hashed, caplog):
    root = fill(tmp_path / "node.db", 5_000)
    execute(tmp_path / "node.db", "DELETE FROM log_tiles")  # as a store from before tiles
    hashed[0] = 0
    with caplog.at_level("INFO", logger="residency.storage"):
        s = SqliteStore(tmp_path / "node.db")
    assert hashed[0] == 5_000 and s.log_tree().root() == root
    assert "building the tiles of its 5000 entries" in caplog.text
    s.close()
    hashed[0] = 0
    SqliteStore(tmp_path / "node.db").close()
    assert hashed[0] == 0


def test_tiles_follow_commits_and_rollbacks(tmp_path):
    s = SqliteStore(tmp_path / "node.db")
    with s.transaction():
        s.savepoint()
        s.log_append([replication_entry(i) for i in range(250)])
        s.release_savepoint()
        s.savepoint()
        s.log_append([replication_entry(i) for i in range(10)])  # completes tile 0 ...
        s.rollback_savepoint()  # ... and is rolled back
    with pytest.raises(RuntimeError), s.transaction():
        s.log_append([replication_entry(i) for i in range(600)])
        raise RuntimeError("the write these entries recorded failed")
    with s.transaction():
        s.log_append([replication_entry(i) for i in range(20)])
    s.close()
    path = tmp_path / "node.db"
    assert execute(path, "SELECT level, idx, length(hashes) FROM log_tiles ORDER BY level, idx") == [
        (0, 0, 256 * 32),
        (0, 1, 14 * 32),
        (1, 0, 32),
    ]
    s = SqliteStore(path)
    assert s.log_tree().root() == entries_root(path)
    s.close()


def flip(path, level: int, index: int, at: int = 0) -> None:
    (data,) = execute(path, "SELECT hashes FROM log_tiles WHERE level = ? AND idx = ?", level, index)[0]
    data = bytearray(data)
    data[at] ^= 1
    execute(path, "UPDATE log_tiles SET hashes = ? WHERE level = ? AND idx = ?", bytes(data), level, index)


def test_a_tampered_tile_after_the_checkpoint_refuses_the_store_naming_it(tmp_path):
    path = tmp_path / "node.db"
    fill(path, 3_000)
    s = SqliteStore(path)
    with s.transaction():
        s.log_append([replication_entry(i) for i in range(100)])  # entries 3001-3100, unsigned
    s.close()
    flip(path, 0, 12, at=32 * 3)
    with pytest.raises(merkle.TileMismatch, match=r"tile/0/012\.p/28 does not match the entries"):
        SqliteStore(path)


def test_a_tampered_tile_the_checkpoint_covers_refuses_the_store_naming_it(tmp_path):
    """The liar rewrites a tile and the parent hash above it, so that the parent vouches for
    it: the root then differs from the signed one, and the tile is found from the entries."""
    path = tmp_path / "node.db"
    fill(path, 3_000)
    flip(path, 0, 3)
    (tile,) = execute(path, "SELECT hashes FROM log_tiles WHERE level = 0 AND idx = 3")[0]
    (parent,) = execute(path, "SELECT hashes FROM log_tiles WHERE level = 1 AND idx = 0")[0]
    parent = parent[: 3 * 32] + merkle.root(merkle.tile_hashes(tile)) + parent[4 * 32 :]
    execute(path, "UPDATE log_tiles SET hashes = ? WHERE level = 1 AND idx = 0", parent)
    with pytest.raises(merkle.TileMismatch, match="tile/0/003 does not match the entries"):
        SqliteStore(path)


def test_a_tampered_inner_tile_is_refused_when_a_proof_reads_it(tmp_path):
    path = tmp_path / "node.db"
    root = fill(path, 3_000)
    flip(path, 0, 4)  # its parent still holds the true hash
    s = SqliteStore(path)  # the start-up check reads the right edge only
    tree = s.log_tree()
    assert tree.root() == root
    merkle.verify_inclusion(2_000, 3_000, tree.leaf(2_000), tree.inclusion_proof(2_000, 3_000), root)
    with pytest.raises(merkle.TileMismatch, match="tile/0/004 does not match the hash its parent"):
        tree.inclusion_proof(4 * 256 + 1, 3_000)
    s.close()


def test_tiles_for_entries_the_store_does_not_hold_refuse_it(tmp_path):
    path = tmp_path / "node.db"
    fill(path, 1_000, checkpoint=False)
    execute(path, "DELETE FROM translog WHERE sequence > 900")
    with pytest.raises(merkle.TileMismatch, match="tiles for 1000 entries but holds 900"):
        SqliteStore(path)


async def test_a_node_with_a_tampered_tile_does_not_start_and_says_which(idle_cluster):
    c = idle_cluster
    await c.start(PRIMARY)
    c.stop(PRIMARY)  # a clean stop signs a checkpoint over every entry
    path = c.data_dir(PRIMARY) / "node.db"
    s = SqliteStore(path)
    with s.transaction():
        s.log_append([replication_entry(i) for i in range(10)])
    s.close()
    (level, index) = execute(path, "SELECT level, max(idx) FROM log_tiles WHERE level = 0")[0]
    flip(path, level, index)
    with pytest.raises(RuntimeError, match=rf"tile/0/{index:03d}\.p/\d+ does not match the entries"):
        await c.start(PRIMARY)
