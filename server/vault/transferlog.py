"""A node's transfer log as reviewers see it: signed checkpoints, proofs and queries over the
store's entries and Merkle tree.

Every method runs on the store thread (`StoreThread.call`), which is what makes reading the
tree safe: only commits on that thread extend it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from residency.server.core import merkle, translog
from residency.server.core.checkpoint import Checkpoint, LogSigner
from residency.server.core.errors import OutOfRange
from residency.server.storage.transferlog import LogStore


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: str


@dataclass(frozen=True, slots=True)
class LogEntry:
    sequence: int
    data: bytes  # canonical JSON, exactly the bytes hashed into the leaf

    @property
    def leaf_index(self) -> int:
        return translog.leaf_index(self.sequence)

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.data)


class TransferLog:
    PAGE = 2000

    def __init__(self, store: LogStore, signer: LogSigner, origin: str):
        self.store = store
        self.signer = signer
        self.origin = origin

    @property
    def verifier_key(self) -> str:
        return self.signer.verifier_key

    def checkpoint(self, refresh: bool = False) -> SignedCheckpoint:
        """The latest signed checkpoint; with `refresh`, first signs one covering every
        committed entry if the log grew since the last one (or none exists yet)."""
        latest = self.store.checkpoint_latest()
        tree = self.store.log_tree()
        if latest is None or (refresh and latest[0] < tree.size):
            root = tree.root()
            note = self.signer.sign(Checkpoint(self.origin, tree.size, root))
            self.store.checkpoint_save(tree.size, note)
            return SignedCheckpoint(tree.size, root, note)
        size, note = latest
        return SignedCheckpoint(size, tree.root(size), note)

    def grew_since_checkpoint(self) -> bool:
        latest = self.store.checkpoint_latest()
        return latest is None or latest[0] < self.store.log_tree().size

    def _size(self, size: int) -> int:
        tree = self.store.log_tree()
        if not 0 < size <= tree.size:
            raise OutOfRange(f"tree_size {size}: the log holds {tree.size} entries (sizes 1 to {tree.size})")
        return size

    def prove_inclusion(self, index: int, size: int) -> tuple[list[bytes], bytes]:
        """(audit path, leaf hash) for leaf `index` in the tree of `size` entries."""
        tree = self.store.log_tree()
        self._size(size)
        if not 0 <= index < size:
            raise OutOfRange(f"leaf_index {index}: a tree of size {size} has leaves 0 to {size - 1}")
        return tree.inclusion_proof(index, size), tree.leaf(index)

    def prove_consistency(self, old_size: int, size: int) -> list[bytes]:
        tree = self.store.log_tree()
        self._size(size)
        if not 0 <= old_size <= size:
            raise OutOfRange(f"from_size {old_size}: must be from 0 to tree_size {size}")
        return tree.consistency_proof(old_size, size)

    def entries(self, after: int = 0, upto: int | None = None) -> Iterator[LogEntry]:
        """Committed entries with sequence > `after` (and <= `upto`), in log order."""
        while page := self.store.log_after(after, self.PAGE):
            for seq, data, _chain in page:
                if upto is not None and seq > upto:
                    return
                yield LogEntry(seq, data)
            after = page[-1][0]

    def query(
        self, f: translog.Filter, after: int, limit: int, max_scan: int | None = None
    ) -> tuple[list[LogEntry], int, bool]:
        """Up to `limit` matching entries after sequence `after`, looking at no more than
        `max_scan` entries (so a selective query does not hold the store thread, and with it
        every write, for long): (entries, the sequence to resume after, whether the log has
        more to scan)."""
        out: list[LogEntry] = []
        scanned = 0
        while page := self.store.log_after(after, self.PAGE):
            for seq, data, _chain in page:
                after = seq
                scanned += 1
                if f.matches(json.loads(data)):
                    out.append(LogEntry(seq, data))
                if len(out) == limit or (max_scan is not None and scanned >= max_scan):
                    return out, after, seq < self.store.log_count()
        return out, after, False
