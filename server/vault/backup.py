"""A node's backup (its store, and apart from it its keyring, from one snapshot, with a
manifest of what it holds) and the checks and staging of a restore from one: a restore takes
only a backup whose files match their digests, of this node's region and role."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from residency.server.core.checkpoint import CheckpointError, open_note
from residency.server.core.errors import FailedPrecondition
from residency.server.storage.backup import (
    Progress,
    backed_up_log,
    copy_file,
    copy_store,
    move_in_place,
    sha256,
)
from residency.server.storage.database import MIGRATIONS

MANIFEST = "manifest.json"
FORMAT = 1


def refuse(why: str) -> FailedPrecondition:
    return FailedPrecondition(f"{why}; nothing was changed")


def take_backup(
    data_dir: Path, out: Path, keys_out: Path | None, region: str, role: str, progress: Progress
) -> dict[str, Any]:
    """Backs up a node's store into `out` (and its keyring into `keys_out`, a folder apart),
    both from one snapshot, and writes the manifests. Refused unless both folders are empty."""
    for d in (out, keys_out):
        if d is not None and d.exists() and any(d.iterdir()):
            raise refuse(f"{d} is not empty: a backup goes into a new or empty folder")
    if keys_out is not None and out.resolve() in (keys_out.resolve(), *keys_out.resolve().parents):
        raise refuse(f"--keys-out {keys_out} is inside --out {out}: keys are backed up apart from the store")
    if not (data_dir / "node.db").exists():
        raise refuse(f"{data_dir} holds no node.db: nothing to back up")
    for d in (out, keys_out):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
    taken_at = time.time()
    figures = copy_store(data_dir, out, keys_out, progress)
    digests = figures.pop("sha256")
    backup_id = uuid.uuid4().hex
    manifest = {
        "format": FORMAT,
        "backup_id": backup_id,
        "region": region,
        "role": role,
        "taken_at": taken_at,
        **figures,
        "keys_backed_up": keys_out is not None,
        "sha256": {"node.db": digests["node.db"]},
    }
    _write_json(out / MANIFEST, manifest)
    if keys_out is not None:
        keys = {
            "format": FORMAT,
            "backup_id": backup_id,
            "region": region,
            "taken_at": taken_at,
            "sha256": {"keys.db": digests["keys.db"]},
        }
        _write_json(keys_out / MANIFEST, keys)
    return manifest


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def stage_backup(data_dir: Path, backup: Path, keys_from: Path | None) -> tuple[Path, Path]:
    """Copies the backup's node.db (and, with `keys_from`, its keys.db) beside the stopped
    node's files as `*.restoring`; the restore works on them, then `move_in_place` puts them
    in place, so that one cut short leaves the node's files as they were. Returns (store,
    keyring) to work on. Without `keys_from` the live keys.db is the keyring: it no longer
    holds the keys of users erased since the backup, so their records stay unreadable."""
    if keys_from is None and not (data_dir / "keys.db").exists():
        raise refuse(
            f"{data_dir / 'keys.db'} is gone: the store's records cannot be opened without a "
            "keyring; give the keys backup taken with it (--keys-from KEYDIR)"
        )
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = discard_staged(data_dir)
    copy_file(backup / "node.db", staged[0])
    if keys_from is None:
        return staged[0], data_dir / "keys.db"
    copy_file(keys_from / "keys.db", staged[1])
    return staged


def discard_staged(data_dir: Path) -> tuple[Path, Path]:
    """Removes what a restore staged (one cut short, or refused); returns the staged paths."""
    staged = (data_dir / "node.db.restoring", data_dir / "keys.db.restoring")
    for path in staged:
        for suffix in ("", "-wal", "-shm", ".lock"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    return staged


def put_restored(data_dir: Path, store: Path, keyring: Path) -> None:
    """Puts the staged files in place of the node's (the keyring first: a crash between
    leaves keys without records, which the node destroys at start; run the restore again)."""
    for staged, live in ((keyring, data_dir / "keys.db"), (store, data_dir / "node.db")):
        staged.with_name(staged.name + ".lock").unlink(missing_ok=True)
        if staged != live:
            move_in_place(staged, live)


def read_manifest(backup: Path, region: str, role: str, keys_from: Path | None) -> dict[str, Any]:
    """The backup's manifest, once every file it names has the digest it states and the
    backup is of this node's region and role (and, with `keys_from`, the keys backup is the
    one taken with it)."""
    try:
        m = json.loads((backup / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise refuse(f"{backup / MANIFEST} cannot be read ({type(e).__name__}): is {backup} a backup?") from e
    if m.get("format") != FORMAT:
        raise refuse(f"{backup / MANIFEST} is of format {m.get('format')!r}; this version reads {FORMAT}")
    if (m.get("region"), m.get("role")) != (region, role):
        raise refuse(
            f"the backup is of the {m.get('role')} of {m.get('region')}; this node is the {role} of {region}"
        )
    if role != "primary":
        raise refuse("restore is for a primary: a region node's copies come back from its primary")
    if int(m.get("schema_version", 0)) > len(MIGRATIONS):
        raise refuse(f"the backup's store is of schema {m['schema_version']}, newer than this version's")
    _check_digest(backup / "node.db", m["sha256"]["node.db"])
    if keys_from is not None:
        try:
            k = json.loads((keys_from / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise refuse(f"{keys_from / MANIFEST} cannot be read ({type(e).__name__})") from e
        if k.get("backup_id") != m.get("backup_id"):
            raise refuse(f"the keys in {keys_from} were not backed up with the store in {backup}")
        _check_digest(keys_from / "keys.db", k["sha256"]["keys.db"])
    return dict(m)


def check_log(backup: Path, manifest: dict[str, Any], origin: str, verifier_key: str) -> None:
    """Refuses a backup whose store is not the one its manifest describes (its log's size), or
    whose log is not this node's: its latest checkpoint must verify with the node's own
    `log.pub` and commit to its entries (a manifest edited to name this region does not make
    another node's store this one's)."""
    tree, latest = backed_up_log(backup / "node.db")
    if tree.size != manifest["tree_size"]:
        raise refuse(f"the backup's log holds {tree.size} entries; its manifest says {manifest['tree_size']}")
    if latest is None:
        return
    size, note = latest
    try:
        cp = open_note(note, verifier_key)
    except CheckpointError as e:
        raise refuse(
            f"the backup's log is not this node's: its checkpoint does not verify with log.pub ({e})"
        ) from e
    if cp.origin != origin or cp.size != size or size > tree.size or cp.root != tree.root(size):
        raise refuse("the backup's log is not this node's: its checkpoint does not commit to its entries")


def _check_digest(path: Path, expected: str) -> None:
    try:
        found = sha256(path)
    except OSError as e:
        raise refuse(f"{path} cannot be read ({type(e).__name__})") from e
    if found != expected:
        raise refuse(f"{path} does not match its digest in the manifest: it was changed or damaged")
