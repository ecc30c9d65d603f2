"""The transfer log's rows: hash-chained entries and their Merkle tree, signed checkpoints and
how far the log is archived. Appends join the caller's transaction and stamp each entry's
sequence and time there; the tree and the chain head follow its commit or rollback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from residency.server.core import merkle, translog
from residency.server.storage.database import Database


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
    """The `translog`, `checkpoints` and `archived` tables, and the tree over `translog`."""

    def __init__(
        self,
        path: str | Path,
        durability: str = "full",
        keyring: str | Path | None = None,
        crash_after: str = "",
    ):
        # The sequence, chain head and time of the last committed entry, and of the last one
        # the open transaction appended (None: nothing yet).
        self._log_seq, self._log_head, self._log_time = 0, translog.GENESIS, 0.0
        self._pending_log: tuple[int, bytes, float] | None = None
        self._savepoint_log: tuple[int, bytes, float] | None = None
        # Leaf hashes of entries appended in the open transaction; the tree gets them at commit.
        self._pending_leaves: list[bytes] = []
        self._savepoint_leaves = 0
        self._tree = merkle.Tree()
        super().__init__(path, durability, keyring, crash_after)
        # Leaf index = sequence - 1: sequences start at 1, RFC 6962 leaf indexes at 0.
        self._catch_up()

    def _committed(self) -> None:
        super()._committed()
        if self._pending_log is not None:
            self._log_seq, self._log_head, self._log_time = self._pending_log
            self._pending_log = None
            self._tree.extend(self._pending_leaves)
            self._pending_leaves = []

    def _rolled_back(self) -> None:
        super()._rolled_back()
        self._pending_log = None
        self._pending_leaves = []

    def _savepoint_taken(self) -> None:
        super()._savepoint_taken()
        self._savepoint_log = self._pending_log
        self._savepoint_leaves = len(self._pending_leaves)

    def _savepoint_rolled_back(self) -> None:
        super()._savepoint_rolled_back()
        self._pending_log = self._savepoint_log
        del self._pending_leaves[self._savepoint_leaves :]

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
            self._pending_leaves.append(merkle.leaf_hash(data))
        self._db.executemany("INSERT INTO translog (sequence, entry, chain) VALUES (?,?,?)", rows)
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
            self._pending_leaves.append(merkle.leaf_hash(data))
        self._db.executemany("INSERT INTO translog (sequence, entry, chain) VALUES (?,?,?)", rows)
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
        """The Merkle tree of committed entries (leaf index = sequence - 1). Read it on the
        store thread only: commits extend it there."""
        if self._pending_log is None:
            self._catch_up()
        return self._tree

    def _catch_up(self) -> None:
        """Takes in entries committed since this store last looked (at open, or by another
        process: a standalone replicator): the chain head and time to append after, and their
        leaves in the tree."""
        last = self._db.execute(
            "SELECT sequence, chain, entry FROM translog ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        if last is None or last[0] == self._log_seq:
            return
        self._log_seq, self._log_head = last[0], last[1]
        self._log_time = float(json.loads(last[2]).get("time", 0.0))
        if self._tree.size < last[0]:
            rows = self._db.execute(
                "SELECT entry FROM translog WHERE sequence > ? ORDER BY sequence", (self._tree.size,)
            )
            self._tree.extend(merkle.leaf_hash(data) for (data,) in rows)

    def checkpoint_save(self, size: int, note: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO checkpoints (tree_size, note, created_at) VALUES (?,?,?)",
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
            "INSERT OR IGNORE INTO archived (tree_size, uploaded_at) VALUES (?,?)", (size, time.time())
        )
