"""The transfer log's rows: hash-chained entries and their Merkle tree as tlog-tiles, signed
checkpoints and how far the log is archived. Appends join the caller's transaction and stamp
each entry's sequence and time there, and write the tiles their leaves change in it too; the
in-memory right edge and chain head follow its commit or rollback.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections import OrderedDict, defaultdict
from typing import Any, Protocol

from residency.server.core import merkle, translog
from residency.server.storage.database import Database

log = logging.getLogger("residency.storage")
# Entries hashed per transaction while a store without tiles gets them (at its first start).
BUILD_CHUNK = 1 << 16


class LogWriter(Protocol):
    """What a write that records a cross-location access uses."""

    def log_append(self, entries: list[dict[str, Any]]) -> list[int]: ...


class LogStore(Protocol):
    """What the transfer log service uses: entries, the tree, checkpoints, the archive mark."""

    def log_after(self, sequence: int, limit: int) -> list[tuple[int, bytes, bytes]]: ...
    def log_count(self) -> int: ...
    def log_tree(self) -> merkle.Tree: ...
    def checkpoint_save(self, size: int, note: str) -> None: ...
    def checkpoint_latest(self) -> tuple[int, str] | None: ...
    def checkpoint_signed_at(self) -> tuple[int, float]: ...
    def archived_size(self) -> int: ...
    def archive_mark(self, size: int) -> None: ...


class TransferLogRows(Database):
    """The `translog`, `log_tiles`, `checkpoints` and `archived` tables, and the tree over
    `translog` (its right edge in memory, its full tiles in `log_tiles`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        # The sequence, chain head and time of the last committed entry, and of the last one
        # the open transaction appended (None: nothing yet).
        self._log_seq, self._log_head, self._log_time = 0, translog.GENESIS, 0.0
        self._pending_log: tuple[int, bytes, float] | None = None
        self._savepoint_log: tuple[int, bytes, float] | None = None
        # The tree's right edge as committed, and as the open transaction (and its savepoint)
        # left it; full tiles are in `log_tiles`, recently read ones in the shared LRU.
        self._edge = merkle.TileEdge()
        self._pending_edge: merkle.TileEdge | None = None
        self._savepoint_edge: merkle.TileEdge | None = None
        self._tile_cache: defaultdict[int, OrderedDict[int, merkle.Tree]] = defaultdict(OrderedDict)
        super().__init__(*args, **kwargs)
        self._open_tiles()
        # Leaf index = sequence - 1: sequences start at 1, RFC 6962 leaf indexes at 0.
        self._catch_up()

    def _committed(self) -> None:
        super()._committed()
        if self._pending_log is not None:
            self._log_seq, self._log_head, self._log_time = self._pending_log
            self._pending_log = None
        if self._pending_edge is not None:
            self._edge, self._pending_edge = self._pending_edge, None

    def _rolled_back(self) -> None:
        super()._rolled_back()
        self._pending_log = None
        self._pending_edge = None

    def _savepoint_taken(self) -> None:
        super()._savepoint_taken()
        self._savepoint_log = self._pending_log
        self._savepoint_edge = None if self._pending_edge is None else self._pending_edge.copy()

    def _savepoint_rolled_back(self) -> None:
        super()._savepoint_rolled_back()
        self._pending_log = self._savepoint_log
        self._pending_edge = self._savepoint_edge

    def _add_leaves(self, leaves: list[bytes]) -> None:
        """The tiles the leaves change, written in the open transaction: a crash keeps both
        the entries and their tiles, or neither."""
        if self._pending_edge is None:
            self._pending_edge = self._edge.copy()
        rows = self._pending_edge.extend(leaves)
        self._db.executemany(
            "INSERT INTO log_tiles (level, idx, hashes) VALUES (?,?,?) "
            "ON CONFLICT (level, idx) DO UPDATE SET hashes=excluded.hashes",
            rows,
        )

    def log_append(self, entries: list[dict[str, Any]]) -> list[int]:
        """Appends entries (inside the caller's transaction) and returns their sequences.
        Each is stamped with its sequence and the time now: an entry prepared earlier (a copy
        shipped before its entry commits) is not dated before entries committed meanwhile."""
        if self._pending_log is None:
            # Another process (a standalone replicator) may have appended since: the write
            # lock is held here, so the head read now is the one to chain onto.
            self._catch_up()
        seq, head, last = self._pending_log or (self._log_seq, self._log_head, self._log_time)
        now = translog.append_time(last, time.time())
        rows, out = [], []
        for e in entries:
            seq += 1
            data = translog.canonical({**e, "time": now, "sequence": seq})
            head = translog.chain_hash(head, data)
            rows.append((seq, data, head))
            out.append(seq)
        self._db.executemany("INSERT INTO translog (sequence, entry, chain) VALUES (?,?,?)", rows)
        self._add_leaves([merkle.leaf_hash(data) for _, data, _ in rows])
        self._pending_log = (seq, head, now)
        return out

    def log_recover(self, entries: list[bytes]) -> None:
        """Appends entries exactly as another copy of this log holds them (a restore rolling
        forward from the archive): their bytes already carry their sequence and time, and the
        chain and leaves follow from them as when they were first appended."""
        if self._pending_log is None:
            self._catch_up()
        seq, head, last = self._pending_log or (self._log_seq, self._log_head, self._log_time)
        rows = []
        for data in entries:
            seq += 1
            stamped = json.loads(data)
            if stamped.get("sequence") != seq:
                raise ValueError(f"a recovered entry holds sequence {stamped.get('sequence')}, not {seq}")
            head = translog.chain_hash(head, data)
            last = float(stamped.get("time", last))
            rows.append((seq, data, head))
        self._db.executemany("INSERT INTO translog (sequence, entry, chain) VALUES (?,?,?)", rows)
        self._add_leaves([merkle.leaf_hash(data) for _, data, _ in rows])
        self._pending_log = (seq, head, last)

    def log_after(self, sequence: int, limit: int) -> list[tuple[int, bytes, bytes]]:
        return list(
            self._db.execute(
                "SELECT sequence, entry, chain FROM translog WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (sequence, limit),
            )
        )

    def log_count(self) -> int:
        row = self._db.execute("SELECT max(sequence) FROM translog").fetchone()
        return row[0] or 0

    def log_tree(self) -> merkle.Tree:
        """The Merkle tree of committed entries (leaf index = sequence - 1), backed by the
        stored tiles: a copy of the right edge, which the caller may extend without touching
        the store. Read it on the store thread only."""
        if self._pending_log is None:
            self._catch_up()
        return merkle.TileTree(self._edge.copy(), self._full_tile, self._tile_cache)

    def _catch_up(self) -> None:
        """Takes in entries committed since this store last looked (at open, or by another
        process: a standalone replicator): the chain head and time to append after, and the
        right edge of their tiles, which that process wrote with them."""
        last = self._db.execute(
            "SELECT sequence, chain, entry FROM translog ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        if last is None or last[0] == self._log_seq:
            return
        self._log_seq, self._log_head = last[0], last[1]
        self._log_time = float(json.loads(last[2]).get("time", 0.0))
        if self._edge.size != last[0]:
            self._edge = merkle.TileEdge.at(last[0], self._tile_prefix)

    def _full_tile(self, level: int, index: int) -> bytes:
        return self._tile_prefix(level, index, merkle.TILE_WIDTH)

    def _tile_prefix(self, level: int, index: int, width: int) -> bytes:
        """The first `width` hashes of a stored tile. Tiles only grow (full ones never change),
        so this is the tile as every tree that reaches into it sees it."""
        row = self._db.execute(
            "SELECT substr(hashes, 1, ?) FROM log_tiles WHERE level = ? AND idx = ?",
            (width * 32, level, index),
        ).fetchone()
        if row is None or len(row[0]) != width * 32:
            raise merkle.TileMismatch(
                f"the transfer log's {merkle.tile_path(level, index, width)} is missing or short: "
                "its tiles do not cover its entries; restore the store from a backup"
            )
        return bytes(row[0])

    def _open_tiles(self) -> None:
        """At open: tiles built, once, for entries that have none (a store from before tiles);
        otherwise the tiles the next signed root depends on checked against what vouches for
        them, without reading the whole log: those up to the latest checkpoint against its
        root, those after it against their entries. The check reads one snapshot of the store:
        another process appending meanwhile (a front end, a worker) would otherwise change the
        last, partial tile between two of its reads (and it is not held up)."""
        with self.snapshot():
            size = self.log_count()
            built = self._tiled_size()
            if built > size:
                raise merkle.TileMismatch(
                    f"the transfer log has tiles for {built} entries but holds {size}: "
                    f"{merkle.tile_path(0, size // merkle.TILE_WIDTH)} and after were altered; "
                    "restore the store from a backup"
                )
            if built == size:
                self._check_open_tiles(size)
                return
        self._build_tiles(size)

    def _check_open_tiles(self, size: int) -> None:
        latest = self.checkpoint_latest()
        signed = min(latest[0], size) if latest else 0
        if latest and (root := _signed_root(latest[1])) is not None:
            edge = merkle.TileEdge.at(size, self._tile_prefix)
            if merkle.TileTree(edge, self._full_tile, self._tile_cache).root(signed) != root:
                self._compare_tiles(0, size)
                log.error(
                    "the transfer log's entries do not match its checkpoint at tree size %d "
                    "(its tiles match its entries): the entries were altered",
                    signed,
                )
        self._compare_tiles(signed, size)

    def _tiled_size(self) -> int:
        row = self._db.execute(
            "SELECT idx, length(hashes) FROM log_tiles WHERE level = 0 ORDER BY idx DESC LIMIT 1"
        ).fetchone()
        return 0 if row is None else int(row[0]) * merkle.TILE_WIDTH + int(row[1]) // 32

    def _leaves(self, after: int, upto: int) -> list[bytes]:
        rows = self._db.execute(
            "SELECT entry FROM translog WHERE sequence > ? AND sequence <= ? ORDER BY sequence",
            (after, upto),
        )
        return [merkle.leaf_hash(data) for (data,) in rows]

    def _build_tiles(self, size: int) -> None:
        """Tiles for the entries up to `size`, a chunk per transaction: an interrupted build
        goes on where it stopped, and another process opening the store meanwhile waits for
        each chunk and then finds it done."""
        log.info("transfer log: building the tiles of its %d entries (once)", size)
        while True:
            with self.transaction():
                built = self._tiled_size()
                if built >= size:
                    return
                upto = min(built + BUILD_CHUNK, size)
                self._pending_edge = merkle.TileEdge.at(built, self._tile_prefix)
                self._add_leaves(self._leaves(built, upto))
            log.info("transfer log: tiles built for %d of %d entries", upto, size)

    def _compare_tiles(self, start: int, size: int) -> None:
        """Rebuilds the tiles of entries `start + 1` to `size` from the entries, and refuses
        the first stored tile that differs, naming it."""
        edge = merkle.TileEdge.at(start, self._tile_prefix)
        for after in range(start, size, BUILD_CHUNK):
            for level, index, data in edge.extend(self._leaves(after, min(after + BUILD_CHUNK, size))):
                if len(data) == merkle.TILE_BYTES:
                    self._check_tile(level, index, data)
        for level, index, data in edge.tiles():
            self._check_tile(level, index, data)

    def _check_tile(self, level: int, index: int, data: bytes) -> None:
        stored = self._db.execute(
            "SELECT hashes FROM log_tiles WHERE level = ? AND idx = ?", (level, index)
        ).fetchone()
        if stored is None or bytes(stored[0]) != data:
            raise merkle.TileMismatch(
                f"the transfer log's {merkle.tile_path(level, index, len(data) // 32)} does not "
                "match the entries it covers: its tiles were altered; restore the store from a backup"
            )

    def checkpoint_save(self, size: int, note: str) -> None:
        self._db.execute(
            "INSERT INTO checkpoints (tree_size, note, created_at) VALUES (?,?,?) ON CONFLICT DO NOTHING",
            (size, note, time.time()),
        )

    def checkpoint_latest(self) -> tuple[int, str] | None:
        row = self._db.execute(
            "SELECT tree_size, note FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
        ).fetchone()
        return (row[0], row[1]) if row else None

    def checkpoint_signed_at(self) -> tuple[int, float]:
        """(tree size, time) of the latest checkpoint; (0, 0.0) before the first."""
        row = self._db.execute(
            "SELECT tree_size, created_at FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
        ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    def archived_size(self) -> int:
        """The tree size up to which sealed segments are in the archive bucket."""
        return int(self._db.execute("SELECT coalesce(max(tree_size), 0) FROM archived").fetchone()[0])

    def archive_mark(self, size: int) -> None:
        self._db.execute(
            "INSERT INTO archived (tree_size, uploaded_at) VALUES (?,?) ON CONFLICT DO NOTHING",
            (size, time.time()),
        )


def _signed_root(note: str) -> bytes | None:
    """The root hash a checkpoint's body (origin, size, root: C2SP tlog-checkpoint) commits
    to; its signature is the log key's to check, which the store does not hold."""
    try:
        root = base64.b64decode(note.split("\n")[2], validate=True)
    except (IndexError, binascii.Error):
        return None
    return root if len(root) == 32 else None
