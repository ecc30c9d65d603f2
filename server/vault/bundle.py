"""Transfer-log bundles: what `residency log export` writes and `residency log verify` checks
offline, trusting nothing but the verifier key.

A bundle is a folder:
- `entries.jsonl`: every entry from leaf index 0 to the checkpoint's tree size, one
  canonical JSON line each, exactly the bytes hashed into the leaf (leaf index = line number
  - 1 = sequence - 1);
- `checkpoint`: the signed checkpoint (C2SP signed note) covering exactly those entries;
- `log.pub`: the verifier key the node stated. A reviewer pins the key they trust
  (`--key`) instead: anyone who can rewrite a bundle can also re-sign it with a new key of
  the same name and replace this file;
- `leaf-hashes`: the server's leaf hash per entry (hex, one a line). It is only a locator:
  verify first checks that it hashes to the signed root, and only then uses it to name the
  first entry that differs. Without it (or if it was altered too) verify still fails, but
  can name the index only from the entries' own sequence numbers;
- `window.json` (optional): the `--since/--until` window the export was asked for. The
  entries still start at index 0, because a root can be recomputed only from the whole tree;
- `context.json`: what reports need beside the entries (home region, recipients, sensitive
  fields), so that `residency log report --bundle` works offline. It is not covered by the
  signed root: reports say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from residency.server.core import merkle
from residency.server.core.checkpoint import Checkpoint, CheckpointError, open_note, parse_verifier_key
from residency.server.core.errors import ResidencyError

ENTRIES, CHECKPOINT, KEY = "entries.jsonl", "checkpoint", "log.pub"
LEAVES, WINDOW, CONTEXT = "leaf-hashes", "window.json", "context.json"


class BundleError(ResidencyError):
    """A bundle does not verify. `index` is the first bad leaf index, when one is known."""

    def __init__(self, message: str, index: int | None = None):
        self.index = index
        super().__init__(message if index is None else f"entry at index {index}: {message}")


@dataclass(frozen=True)
class Verified:
    checkpoint: Checkpoint
    signer: str
    entries: list[bytes]
    window: dict[str, Any] | None
    previous: Checkpoint | None = None
    key: str = ""  # the verifier key the checkpoint was checked with
    pinned: bool = False  # the reviewer gave that key; else it was the bundle's own log.pub
    context: dict[str, Any] | None = None


def write(
    directory: str | Path,
    entries: list[bytes],
    leaf_hashes: list[bytes],
    note: str,
    verifier_key: str,
    window: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ENTRIES, "wb") as f:
        for data in entries:
            f.write(data + b"\n")
    (d / LEAVES).write_text("".join(h.hex() + "\n" for h in leaf_hashes))
    (d / CHECKPOINT).write_text(note)
    (d / KEY).write_text(verifier_key.strip() + "\n")
    if window is not None:
        (d / WINDOW).write_text(json.dumps(window, indent=2) + "\n")
    if context is not None:
        (d / CONTEXT).write_text(json.dumps(context, indent=2, sort_keys=True) + "\n")


def read_entries(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data.split(b"\n")[:-1]


def _sequence(data: bytes) -> int | None:
    """The entry's own sequence number, without parsing the whole line: keys are sorted, and
    no key after "sequence" can hold a quote unescaped, so the last match is the key."""
    at = data.rfind(b'"sequence":')
    if at < 0:
        return None
    end = at + 11
    stop = end
    while stop < len(data) and data[stop : stop + 1].isdigit():
        stop += 1
    return int(data[end:stop]) if stop > end else None


def _first_misnumbered(entries: list[bytes]) -> int | None:
    for i, data in enumerate(entries):
        if _sequence(data) != i + 1:
            return i
    return None


def open_checkpoint(note: str, key: str, pinned: bool, origin: str | None) -> tuple[Checkpoint, str]:
    """(the checkpoint, its signer's name) once its signature checks with `key`; a key the
    reader pinned also fixes the log it must be of (`origin`, by default the key's name)."""
    signer = parse_verifier_key(key)[0]
    cp = open_note(note, key)
    if pinned and cp.origin != (origin or signer):
        raise CheckpointError(f"the checkpoint is of log {cp.origin!r}, not {(origin or signer)!r}")
    return cp, signer


def verify(
    directory: str | Path, previous: str | None = None, key: str | None = None, origin: str | None = None
) -> Verified:
    """Checks a bundle: checkpoint signature, every entry against the signed root, and, with
    `previous` (an earlier checkpoint's note), that the log only grew since. With `key` (the
    verifier key the reviewer trusts) the checkpoint must be signed by it and be of its log
    (`origin`, by default the key's name); without, the bundle's own log.pub is used and the
    result says so. Raises BundleError naming the first bad index, or CheckpointError for a
    bad checkpoint."""
    d = Path(directory)
    pinned = key is not None
    try:
        key = key if key is not None else (d / KEY).read_text()
        note = (d / CHECKPOINT).read_text()
        entries = read_entries(d / ENTRIES)
    except OSError as e:
        raise BundleError(f"{d} is not a complete bundle: {e.strerror}: {e.filename}") from e
    cp, signer = open_checkpoint(note, key, pinned, origin)
    leaves = [merkle.leaf_hash(e) for e in entries]
    locator = _locator(d / LEAVES, cp)
    if locator is not None and leaves != locator:
        bad = next((i for i, (a, b) in enumerate(zip(leaves, locator, strict=False)) if a != b), None)
        if bad is None:
            bad = min(len(leaves), len(locator))
        what = "missing" if bad >= len(leaves) else "does not match the signed tree"
        raise BundleError(f"{what} (changed, dropped, inserted or reordered)", bad)
    if len(entries) != cp.size:
        bad = _first_misnumbered(entries)
        raise BundleError(
            f"the checkpoint covers {cp.size} entries, the bundle holds {len(entries)}",
            bad if bad is not None else min(len(entries), cp.size),
        )
    # Equal to an authenticated locator means the root is already checked; else compute it.
    if locator is None and merkle.root(leaves) != cp.root:
        bad = _first_misnumbered(entries)
        raise BundleError("the entries do not hash to the checkpoint's root hash", bad)
    prev = None
    if previous is not None:
        prev = open_note(previous, key)
        if prev.size > cp.size:
            raise BundleError(f"the previous checkpoint covers {prev.size} entries, this one only {cp.size}")
        if prev.origin != cp.origin:
            raise BundleError(f"the previous checkpoint is of log {prev.origin!r}, not {cp.origin!r}")
        proof = merkle.Tree(leaves).consistency_proof(prev.size, cp.size)
        try:
            merkle.verify_consistency(prev.size, cp.size, prev.root, cp.root, proof)
        except merkle.ProofError as e:
            raise BundleError(f"not append-only since the previous checkpoint: {e}") from e
    window = json.loads((d / WINDOW).read_text()) if (d / WINDOW).is_file() else None
    context = json.loads((d / CONTEXT).read_text()) if (d / CONTEXT).is_file() else None
    return Verified(cp, signer, entries, window, prev, key.strip(), pinned, context)


def _locator(path: Path, cp: Checkpoint) -> list[bytes] | None:
    """The exported leaf hashes, if present and authenticated by the signed root."""
    try:
        hashes = [bytes.fromhex(line) for line in path.read_text().split()]
    except (OSError, ValueError):
        return None
    if len(hashes) != cp.size or merkle.root(hashes) != cp.root:
        return None
    return hashes


__all__ = ["BundleError", "CheckpointError", "Verified", "verify", "write"]
