"""Backing up a node and restoring a stopped primary from a backup: the manifest and its checks,
the transfer log rolled forward from the archive, and what the lost store did after the backup
(erasures, consent changes, copies sent with newer versions) made good under a new restore
epoch, with one log entry saying what was restored.

Why each step (docs/operators.md, "Backup and restore"): the archive's entries are the only
record of what left after the backup; versions issued from now on must be above any the lost
store sent (`restores`, `RecordRows.version_floor`); and the live keyring is kept unless lost,
since it no longer holds the keys of users erased after the backup.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from residency.server.core import merkle, translog
from residency.server.core.checkpoint import CheckpointError, open_note
from residency.server.core.errors import FailedPrecondition
from residency.server.core.policy.erasure import removed_on_withdrawal
from residency.server.core.recovered import Recovered, read_recovered, to_reversion
from residency.server.storage.backup import Progress, copy_file, copy_store, move_in_place, sha256
from residency.server.storage.consents import ConsentStore
from residency.server.storage.database import MIGRATIONS, UnitOfWork
from residency.server.storage.records import VERSION_EPOCH_BITS, RecordStore
from residency.server.storage.replication import ReplicationStore
from residency.server.storage.restores import RestoreStore
from residency.server.storage.transferlog import LogStore, LogWriter
from residency.server.vault.records import Records

MANIFEST = "manifest.json"
FORMAT = 1
# Who the restore's log entry names.
ACTOR = "residency restore"


class Archive(Protocol):
    """The archive bucket as a restore reads it (`archive.S3Bucket`)."""

    def keys(self, prefix: str) -> list[str]: ...
    def get(self, key: str) -> bytes: ...


class RestoreTarget(
    UnitOfWork, RecordStore, ReplicationStore, ConsentStore, LogStore, LogWriter, RestoreStore, Protocol
):
    """The restored store, as the restore uses it."""

    def log_recover(self, entries: list[bytes]) -> None: ...


def refuse(why: str) -> FailedPrecondition:
    return FailedPrecondition(f"{why}; nothing was changed")


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


def _check_digest(path: Path, expected: str) -> None:
    try:
        found = sha256(path)
    except OSError as e:
        raise refuse(f"{path} cannot be read ({type(e).__name__})") from e
    if found != expected:
        raise refuse(f"{path} does not match its digest in the manifest: it was changed or damaged")


@dataclass(slots=True)
class RolledForward:
    """What the archive gave back: entries after the backup's tree size, each segment checked
    against its signed checkpoint, up to `size`."""

    size: int
    entries: list[bytes] = field(default_factory=list)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    # Why the roll-forward stopped before the archive's end ("" : it did not).
    stopped: str = ""
    # The largest checkpoint the archive holds (entries beyond `size` it covers are lost).
    archived_to: int = 0


_SEGMENT = re.compile(r"(\d{12})-(\d{12})\.jsonl")


def roll_forward(
    tree: merkle.Tree, archive: Archive, prefix: str, origin: str, verifier_key: str
) -> RolledForward:
    """Reads the archived segments after `tree`'s size in order, each verified (its entries'
    sequences, the entries it shares with `tree`, and the Merkle root at its end against its
    checkpoint, signed with `verifier_key`: the node's own `log.pub`, not the bucket's), and
    extends `tree` with them. Stops at the first segment that is missing or does not verify."""
    start = tree.size
    out = RolledForward(start)
    base = f"{prefix}/{origin}"
    segments = sorted(
        (int(m[1]), int(m[2]), k)
        for k in archive.keys(f"{base}/segments/")
        if (m := _SEGMENT.fullmatch(k.rsplit("/", 1)[1]))
    )
    checkpoints = {int(k.rsplit("/", 1)[1]) for k in archive.keys(f"{base}/checkpoints/") if k[-1].isdigit()}
    out.archived_to = max(checkpoints, default=0)
    for first, end, key in segments:
        if end <= tree.size:
            continue
        if first > tree.size:
            out.stopped = f"no archived segment holds entries {tree.size + 1} to {first}"
            break
        lines = archive.get(key).splitlines()
        why = _check_segment(tree, first, end, lines)
        if not why:
            if end not in checkpoints:
                why = f"segment {first}-{end} has no checkpoint beside it"
            else:
                note = archive.get(f"{base}/checkpoints/{end:012d}").decode()
                why = _check_checkpoint(tree, lines[tree.size - first :], end, note, origin, verifier_key)
        if why:
            out.stopped = why
            break
        new = lines[tree.size - first :]
        tree.extend(merkle.leaf_hash(d) for d in new)
        out.entries += new
        out.checkpoints.append((end, archive.get(f"{base}/checkpoints/{end:012d}").decode()))
        out.size = end
    return out


def _check_segment(tree: merkle.Tree, first: int, end: int, lines: list[bytes]) -> str:
    if len(lines) != end - first:
        return f"segment {first}-{end} holds {len(lines)} entries, not {end - first}"
    for i, data in enumerate(lines, start=first):
        try:
            seq = json.loads(data).get("sequence")
        except ValueError:
            return f"entry {i + 1} of segment {first}-{end} is not JSON"
        if seq != i + 1 or (i < tree.size and merkle.leaf_hash(data) != tree.leaf(i)):
            return f"entry {i + 1} of segment {first}-{end} is not this log's entry {i + 1}"
    return ""


def _check_checkpoint(
    tree: merkle.Tree, new: list[bytes], end: int, note: str, origin: str, verifier_key: str
) -> str:
    try:
        cp = open_note(note, verifier_key)
    except CheckpointError as e:
        return f"the checkpoint at {end} does not verify with this node's log.pub ({e})"
    extended = merkle.Tree()
    extended.levels = [bytearray(level) for level in tree.levels]
    extended.extend(merkle.leaf_hash(d) for d in new)
    if cp.origin != origin or cp.size != end or cp.root != extended.root(end):
        return f"the checkpoint at {end} does not commit to the archived entries before it"
    return ""


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


def stage_backup(data_dir: Path, backup: Path, keys_from: Path | None) -> Path:
    """Copies the backup's node.db beside the stopped node's, as `node.db.restoring` (the
    restore works on it, then `move_in_place` puts it in place), and, with `keys_from`, puts
    its keys.db in place. The live keys.db is kept otherwise: it no longer holds the keys of
    users erased since the backup, so their records in it stay unreadable."""
    if keys_from is None and not (data_dir / "keys.db").exists():
        raise refuse(
            f"{data_dir / 'keys.db'} is gone: the store's records cannot be opened without a "
            "keyring; give the keys backup taken with it (--keys-from KEYDIR)"
        )
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = data_dir / "node.db.restoring"
    for suffix in ("", "-wal", "-shm", ".lock"):
        staged.with_name(staged.name + suffix).unlink(missing_ok=True)
    copy_file(backup / "node.db", staged)
    if keys_from is not None:
        copy_file(keys_from / "keys.db", data_dir / "keys.db.restoring")
        move_in_place(data_dir / "keys.db.restoring", data_dir / "keys.db")
    return staged


def apply_restore(
    records: Records,
    store: RestoreTarget,
    manifest: dict[str, Any],
    rolled: RolledForward | None,
    destinations: list[str],
) -> dict[str, Any]:
    """On the store thread, in the caller's transaction: the recovered entries appended, the
    restore epoch raised, erasures and consent changes since the backup made again, the users
    whose copies may be ahead re-versioned, and one log entry saying so. Returns the summary."""
    region = records.region
    recovered = Recovered()
    if rolled is not None:
        store.log_recover(rolled.entries)
        for size, note in rolled.checkpoints:
            store.checkpoint_save(size, note)
        if rolled.checkpoints:
            store.archive_mark(rolled.size)
        recovered = read_recovered((json.loads(d) for d in rolled.entries), region)
    epoch = store.add_restore()
    backlog = store.backlog_users(destinations)
    live = store.live_versions()
    erased = [u for u in dict.fromkeys([*recovered.erased, *store.keyless_users()]) if u in live]
    for u in erased:
        records.delete(u)
        del live[u]
    now, touched, cookies = time.time(), [], {}
    for c in recovered.consents:
        evidence = f"re-applied at a restore from transfer-log entry {c.sequence}"
        changed = store.consent_set(
            c.user_id, c.purpose, c.recipient, c.sensitive, now, evidence, c.actor, c.withdraw
        )
        if changed:
            touched.append(c.user_id)
            gone = removed_on_withdrawal(c.purpose, c.recipient, records.schema.cookie_fields)
            if c.withdraw and gone:
                cookies[c.user_id] = gone
    users = sorted(set(to_reversion(recovered.sent, backlog, live)) | (set(touched) & set(live)))
    plain = [u for u in users if u not in cookies]
    for i in range(0, len(plain), 1000):
        records.bump(plain[i : i + 1000])
    for u in users:
        if u in cookies:
            records.bump([u], remove=cookies[u])
    summary = _summary(manifest, rolled, epoch, len(erased), len(recovered.consents), len(users))
    store.log_append([_entry(region, records.rules.version, summary)])
    store.set_restore_summary(epoch, summary)
    return summary


def _summary(
    manifest: dict[str, Any], rolled: RolledForward | None, epoch: int, erased: int, consents: int, users: int
) -> dict[str, Any]:
    size = manifest["tree_size"]
    recovered_to = rolled.size if rolled is not None else size
    if rolled is None:
        lost = (
            f"no archive is configured: entries after {size} are lost, and this log is not "
            f"consistent with any checkpoint of a size above {size} published before the loss"
        )
    elif rolled.archived_to > recovered_to:
        lost = (
            f"entries {recovered_to + 1} to {rolled.archived_to} are archived but could not be "
            f"recovered ({rolled.stopped}): this log is not consistent with the checkpoints "
            f"above {recovered_to}"
        )
    else:
        lost = (
            f"entries after {recovered_to} were never archived and are lost: this log is not "
            f"consistent with any checkpoint of a size above {recovered_to} published before the loss"
        )
    return {
        "backup_taken_at": manifest["taken_at"],
        "backup_tree_size": size,
        "recovered_to": recovered_to,
        "recovered_entries": recovered_to - size,
        "erasures_reapplied": erased,
        "consent_changes_reapplied": consents,
        "reversioned": users,
        "restore_epoch": epoch,
        "versions_above": epoch << VERSION_EPOCH_BITS,
        "lost": lost,
    }


def _entry(region: str, rules_version: str, s: dict[str, Any]) -> dict[str, Any]:
    taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["backup_taken_at"]))
    reason = (
        f"store restored from a backup taken {taken} at tree size {s['backup_tree_size']}; entries "
        f"{s['backup_tree_size'] + 1} to {s['recovered_to']} recovered from the archive, each "
        f"segment verified against its signed checkpoint; {s['erasures_reapplied']} erasures and "
        f"{s['consent_changes_reapplied']} consent changes made since the backup re-applied; "
        f"{s['reversioned']} users re-versioned under restore epoch {s['restore_epoch']} "
        f"(every version from now on is above {s['versions_above']}); {s['lost']}"
    )
    return translog.entry(
        "admin",
        subject="",
        source_region=region,
        destination_region="",
        outcome="allowed",
        actor=ACTOR,
        rules_version=rules_version,
        reason=reason,
    )
