"""RFC 6962 / RFC 9162 Merkle tree math for the transfer log (pure: no I/O, no keys).

Each function is one step of RFC 9162 section 2.1 and is named after it: the leaf and node
hashes (2.1.1), the tree head `root` (MTH), inclusion proofs (`inclusion_proof`, PATH, 2.1.3)
and consistency proofs (`consistency_proof`, PROOF/SUBPROOF, 2.1.4), and their verification
algorithms (2.1.3.2, 2.1.4.2). Proofs are plain lists of 32-byte hashes.

`Tree` keeps every complete subtree hash of an append-only log in memory, so a root or a
proof over a million leaves costs O(log n) hash lookups instead of rehashing the leaves.

`TileEdge` and `TileTree` hold the same hashes as C2SP tlog-tiles lays them out
(https://c2sp.org/tlog-tiles, as transparency-dev/tessera and sigsum write them): tiles of
height 8, a level-L tile holding 256 hashes of subtrees of height 8L, a partial tile (`.p/W`)
on the right edge. The edge stays in memory, full tiles live in the store; both are pure:
tiles come in and go out as bytes, the caller reads and writes them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence

from residency.server.core.errors import FailedPrecondition

EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A proof does not verify: what was proved is not what the root commits to."""


class TileMismatch(FailedPrecondition):
    """A stored tile disagrees with the hashes it must hold (its entries, or its parent): the
    tiles were altered or lost, and nothing signed or proved from them can be trusted."""


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1): where MTH splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes, bottom-up (the same tree as the recursive definition:
    a lone last node is carried up a level unchanged)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) (RFC 6962 2.1.1) over leaf hashes."""
    return Tree(leaves).inclusion_proof(index, len(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]) (RFC 6962 2.1.2) over leaf hashes."""
    return Tree(leaves).consistency_proof(old_size, len(leaves))


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 2.1.3.2 steps 1-4: the root that `proof` places `leaf` under."""
    if index >= size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes) -> None:
    """RFC 9162 2.1.3.2: raises ProofError unless `leaf` is at `index` in the tree `root_hash`."""
    if root_from_inclusion_proof(index, size, leaf, proof) != root_hash:
        raise ProofError(f"leaf {index} is not in the tree of size {size} with that root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 2.1.4.2: raises ProofError unless the tree `new_root` extends `old_root`."""
    if old_size > new_size:
        raise ProofError(f"a tree cannot shrink from {old_size} to {new_size} entries")
    if old_size == new_size:
        if proof or old_root != new_root:
            raise ProofError("two heads of the same size must have the same root and an empty proof")
        return
    if old_size == 0:
        if proof:
            raise ProofError("the empty tree is consistent with every tree; its proof is empty")
        return
    if not proof:
        raise ProofError("a consistency proof between different sizes cannot be empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # step 2: a power of two is itself a subtree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise ProofError(f"the tree of size {new_size} does not extend the tree of size {old_size}")


class Tree:
    """An append-only tree: `levels[h]` holds, 32 bytes each, the hashes of the complete
    subtrees over leaves [i * 2**h, (i + 1) * 2**h). Packed into bytearrays: about 64 bytes
    per leaf in all, instead of two Python objects per node. Pure in-memory data; the store
    feeds it from the entries it persists."""

    __slots__ = ("levels",)

    def __init__(self, leaves: Iterable[bytes] = ()):
        self.levels: list[bytearray] = [bytearray()]
        self.extend(leaves)

    @property
    def size(self) -> int:
        return len(self.levels[0]) // 32

    def copy(self) -> Tree:
        out = Tree()
        out.levels = [bytearray(level) for level in self.levels]
        return out

    def _node(self, height: int, i: int) -> bytes:
        return bytes(self.levels[height][i * 32 : i * 32 + 32])

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self._node(0, index)

    def extend(self, leaves: Iterable[bytes]) -> None:
        levels = self.levels
        for h in leaves:
            if len(h) != 32:
                raise ValueError("a leaf hash is 32 bytes")
            levels[0] += h
            level = 0
            # Every time a level gets an even count, its last two nodes complete a parent.
            while (len(levels[level]) // 32) % 2 == 0:
                lower = levels[level]
                if level + 1 == len(levels):
                    levels.append(bytearray())
                levels[level + 1] += _sha256(b"\x01" + lower[-64:]).digest()
                level += 1

    def subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]); `start` is aligned as RFC 6962's recursion always leaves it."""
        n = end - start
        if n <= 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            h = n.bit_length() - 1
            return self._node(h, start >> h)
        k = _split(n)
        return node_hash(self.subtree(start, start + k), self.subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check(size)
        return self.subtree(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[size]), listed from the leaf upwards."""
        self._check(size)
        if not 0 <= index < size:
            raise ProofError(f"leaf index {index} is outside a tree of size {size}")
        out: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                out.append(self.subtree(start + k, end))
                end = start + k
            else:
                out.append(self.subtree(start, start + k))
                start += k
        out.reverse()
        return out

    def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        """PROOF(old_size, D[size]) = SUBPROOF(old_size, D[size], true)."""
        self._check(size)
        if not 0 <= old_size <= size:
            raise ProofError(f"no consistency proof from size {old_size} to size {size}")
        if old_size in (0, size):
            return []
        out: list[bytes] = []
        start, end, m, complete = 0, size, old_size, True
        while m != end - start:
            k = _split(end - start)
            if m <= k:
                out.append(self.subtree(start + k, end))
                end = start + k
            else:
                out.append(self.subtree(start, start + k))
                start, m, complete = start + k, m - k, False
        if not complete:
            out.append(self.subtree(start, end))
        out.reverse()
        return out

    def _check(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ProofError(f"the log has {self.size} entries; there is no tree of size {size}")


TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
TILE_BYTES = TILE_WIDTH * 32


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """`tile/<L>/<N>[.p/<W>]` (C2SP tlog-tiles): N in zero-padded groups of three digits, all
    but the last prefixed with `x` (1234067 -> x001/x234/067); `.p/W` for a partial tile."""
    groups = [f"{index % 1000:03d}"]
    while index >= 1000:
        index //= 1000
        groups.append(f"x{index % 1000:03d}")
    suffix = "" if width == TILE_WIDTH else f".p/{width}"
    return f"tile/{level}/{'/'.join(reversed(groups))}{suffix}"


def tile_hashes(data: bytes) -> list[bytes]:
    """A tile's bytes as its hashes, left to right."""
    return [data[i : i + 32] for i in range(0, len(data), 32)]


def tile_count(size: int, level: int) -> int:
    """How many hashes (roots of complete subtrees of height 8L) level L has at `size` leaves."""
    return size >> (TILE_HEIGHT * level)


class TileEdge:
    """The right edge of a tiled tree of `size` leaves: per level, the partial tile (fewer than
    256 hashes) as a small `Tree`, so its inner nodes are at hand. O(log n) memory."""

    __slots__ = ("levels", "size")

    def __init__(self, size: int = 0, partials: Sequence[bytes] = ()):
        self.size = size
        self.levels = [Tree(tile_hashes(p)) for p in partials]

    @classmethod
    def at(cls, size: int, read: Callable[[int, int, int], bytes]) -> TileEdge:
        """The edge of the tree of `size` leaves, reading `read(level, index, width)`: the
        first `width` hashes of a tile, which are the same whatever its width now."""
        partials, level = [], 0
        while count := tile_count(size, level):
            width = count % TILE_WIDTH
            partials.append(read(level, count // TILE_WIDTH, width) if width else b"")
            level += 1
        return cls(size, partials)

    def index(self, level: int) -> int:
        """The index of the partial tile at `level`."""
        return tile_count(self.size, level) // TILE_WIDTH

    def copy(self) -> TileEdge:
        out = TileEdge(self.size)
        out.levels = [t.copy() for t in self.levels]
        return out

    def tiles(self) -> list[tuple[int, int, bytes]]:
        """(level, index, hashes) of every non-empty partial tile."""
        return [(lv, self.index(lv), bytes(t.levels[0])) for lv, t in enumerate(self.levels) if t.size]

    def extend(self, leaves: Iterable[bytes]) -> list[tuple[int, int, bytes]]:
        """Appends leaf hashes; returns (level, index, hashes) of every tile they changed:
        tiles they completed, then the partial tiles they grew, to be stored."""
        done: list[tuple[int, int, bytes]] = []
        touched = {0}
        new, i = list(leaves), 0
        if not self.levels:
            self.levels.append(Tree())
        while i < len(new):
            # Leaves in runs up to the end of the level-0 tile: one `Tree.extend` per run.
            k = min(TILE_WIDTH - self.levels[0].size, len(new) - i)
            self.levels[0].extend(new[i : i + k])
            self.size, i, level = self.size + k, i + k, 0
            while self.levels[level].size == TILE_WIDTH:
                tile = self.levels[level]
                done.append((level, self.index(level) - 1, bytes(tile.levels[0])))
                self.levels[level] = Tree()
                if level + 1 == len(self.levels):
                    self.levels.append(Tree())
                self.levels[level + 1].extend((bytes(tile.levels[TILE_HEIGHT]),))
                level += 1
                touched.add(level)
        return done + [row for row in self.tiles() if row[0] in touched]


class TileTree(Tree):
    """A tree whose full tiles live in the store: the right edge in memory, other tiles read
    through `read(level, index)` when a root or proof needs them, checked against the parent's
    hash on the way in (trusted as far as the edge vouches), kept in an LRU per level shared
    between copies. Answers as `Tree` does; `extend` grows this copy only."""

    __slots__ = ("_cache", "_extra", "_read", "edge")
    CACHED_PER_LEVEL = 256  # 4 MiB a level: at 16M leaves, every level-1 tile stays cached

    def __init__(
        self,
        edge: TileEdge,
        read: Callable[[int, int], bytes],
        cache: defaultdict[int, OrderedDict[int, Tree]] | None = None,
    ):
        self.edge = edge
        self._read = read
        self._cache = defaultdict(OrderedDict) if cache is None else cache
        self._extra: dict[tuple[int, int], Tree] = {}  # tiles `extend` completed here only

    @property
    def size(self) -> int:
        return self.edge.size

    def copy(self) -> TileTree:
        out = TileTree(self.edge.copy(), self._read, self._cache)
        out._extra = dict(self._extra)
        return out

    def extend(self, leaves: Iterable[bytes]) -> None:
        for level, index, data in self.edge.extend(leaves):
            if len(data) == TILE_BYTES:
                self._extra[level, index] = _full_tile(data)

    def _node(self, height: int, i: int) -> bytes:
        level, r = divmod(height, TILE_HEIGHT)
        index, offset = divmod(i << r, TILE_WIDTH)
        return self._tile(level, index)._node(r, offset >> r)

    def _tile(self, level: int, index: int) -> Tree:
        if index == self.edge.index(level):
            return self.edge.levels[level]
        if (tile := self._extra.get((level, index))) is not None:
            return tile
        cache = self._cache[level]
        if (tile := cache.get(index)) is not None:
            cache.move_to_end(index)
            return tile
        data = self._read(level, index)
        tile = _full_tile(data) if len(data) == TILE_BYTES else Tree()
        if not tile.size or tile._node(TILE_HEIGHT, 0) != self._node(TILE_HEIGHT * (level + 1), index):
            raise TileMismatch(
                f"the transfer log's {tile_path(level, index)} does not match the hash its parent "
                f"tile holds for it: the log's tiles were altered; restore the store from a backup"
            )
        cache[index] = tile
        if len(cache) > self.CACHED_PER_LEVEL:
            cache.popitem(last=False)
        return tile


def _full_tile(data: bytes) -> Tree:
    """A full tile's tree a level at a time (a proof that reads one pays its 255 inner hashes)."""
    tree, level = Tree(), data
    tree.levels = [bytearray(data)]
    while len(level) > 32:
        level = b"".join(_sha256(b"\x01" + level[i : i + 64]).digest() for i in range(0, len(level), 64))
        tree.levels.append(bytearray(level))
    return tree
