"""Restoring a stopped primary's store from a backup (`vault.backup` checks and stages it): the
transfer log rolled forward from the archive, and what the lost store did after the backup
(erasures, consent changes, copies sent with newer versions) made good under a new restore
epoch, with one log entry saying what was restored.

Why each step (docs/operators.md, "Backup and restore"): the archive's entries are the only
record of what left after the backup; versions issued from now on must be above any the lost
store sent (`restores`, `RecordRows.version_floor`); and a destination must get again exactly
the users whose copies it may hold ahead of the backup.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from residency.server.core import merkle, translog
from residency.server.core.checkpoint import CheckpointError, open_note
from residency.server.core.policy.erasure import ERASED_HERE, removed_on_withdrawal
from residency.server.core.recovered import RESTORE_ACTOR, Recovered, read_recovered, to_reversion
from residency.server.storage.consents import ConsentStore
from residency.server.storage.database import UnitOfWork
from residency.server.storage.lookup import LookupStore
from residency.server.storage.records import VERSION_EPOCH_BITS, RecordStore
from residency.server.storage.replication import ReplicationStore
from residency.server.storage.restores import RestoreStore
from residency.server.storage.transferlog import LogStore, LogWriter
from residency.server.vault.records import Records


class Archive(Protocol):
    """The archive bucket as a restore reads it (`archive.S3Bucket`)."""

    def keys(self, prefix: str) -> list[str]: ...
    def get(self, key: str) -> bytes: ...


class RestoreTarget(
    UnitOfWork,
    RecordStore,
    ReplicationStore,
    ConsentStore,
    LogStore,
    LogWriter,
    RestoreStore,
    LookupStore,
    Protocol,
):
    """The restored store, as the restore uses it."""

    def log_recover(self, entries: list[bytes]) -> None: ...


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
    # The end of the last segment the archive holds up to `size`: where the archiver goes on.
    archived_mark: int = 0


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
            out.archived_mark = max(out.archived_mark, end)
            continue
        if first > tree.size:
            out.stopped = f"no archived segment holds entries {tree.size + 1} to {first}"
            break
        lines, note = archive.get(key).splitlines(), ""
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
        out.checkpoints.append((end, note))
        out.size = out.archived_mark = end
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
    extended = tree.copy()
    extended.extend(merkle.leaf_hash(d) for d in new)
    if cp.origin != origin or cp.size != end or cp.root != extended.root(end):
        return f"the checkpoint at {end} does not commit to the archived entries before it"
    return ""


def apply_restore(
    records: Records,
    store: RestoreTarget,
    manifest: dict[str, Any],
    rolled: RolledForward | None,
    destinations: list[str],
    epoch_seen: int,
    keys_from_backup: bool = False,
) -> dict[str, Any]:
    """On the store thread, in the caller's transaction: the recovered entries appended, the
    restore epoch raised above every one seen (`epoch_seen`: the node's store before the
    restore), erasures and consent changes since the backup made again, the users whose
    copies may be ahead of the backup sent again under new versions, and one log entry
    saying so. Returns the summary (`keys_from_backup`: the keyring is the keys backup's,
    `--keys-from`, so only erasures the recovered entries show can be re-applied)."""
    recovered = Recovered()
    if rolled is not None:
        store.log_recover(rolled.entries)
        for size, note in rolled.checkpoints:
            store.checkpoint_save(size, note)
        if rolled.archived_mark:
            store.archive_mark(rolled.archived_mark)
        recovered = read_recovered((json.loads(d) for d in rolled.entries), records.region)
    epoch = store.add_restore(max(epoch_seen, recovered.epoch))
    backlog = store.backlog_users(destinations)
    held = store.record_versions()
    live = {u: v for u, (v, erased) in held.items() if not erased}
    erased = [u for u in dict.fromkeys([*recovered.erased, *store.keyless_users()]) if u in live]
    for u in erased:
        records.delete(u, RESTORE_ACTOR, reason=f"{ERASED_HERE}; re-applied at a restore")
        del live[u]
    touched, cookies = _replay_consents(records, store, recovered)
    users = sorted(set(to_reversion(recovered.sent, backlog, live)) | (set(touched) & set(live)))
    plain = [u for u in users if u not in cookies]
    for i in range(0, len(plain), 1000):
        records.bump(plain[i : i + 1000])
    for u in users:
        if u in cookies:
            records.bump([u], remove=cookies[u])
    # Tombstones again where a destination may hold a newer copy: of users erased in the
    # backup (queued, or sent since), and of users the backup does not hold at all (created
    # since, and lost: their home no longer has them, so neither may a destination).
    resent = sorted(
        {u for u in [*backlog, *recovered.sent] if u in held and held[u][1]}
        | {u for u in recovered.sent if u not in held}
    )
    for u in resent:
        records.tombstone(u, max(held.get(u, (0, True))[0], recovered.sent.get(u, 0)))
    summary = _summary(manifest, rolled, epoch, len(erased), len(recovered.consents), len(users), len(resent))
    summary["erasures_after"] = _erasures_after(summary["recovered_to"], keys_from_backup)
    summary["index_rebuild_version"] = _index_anew(records, store)
    store.log_append([_entry(records.region, records.rules.version, summary)])
    store.set_restore_summary(epoch, summary)
    return summary


def _replay_consents(
    records: Records, store: RestoreTarget, recovered: Recovered
) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The recovered consent changes made again, in log order: (users whose standing consents
    changed, cookie fields to remove from those whose cookie consent was withdrawn)."""
    now, touched, cookies = time.time(), [], {}
    for r in recovered.consents:
        c = r.change
        if store.consent_set(
            c.user_id, c.purpose, c.recipient, c.sensitive, now, c.evidence, r.actor, r.withdraw
        ):
            touched.append(c.user_id)
            gone = removed_on_withdrawal(c.purpose, c.recipient, records.schema.cookie_fields)
            if r.withdraw and gone:
                cookies[c.user_id] = gone
    return touched, cookies


def _summary(
    manifest: dict[str, Any],
    rolled: RolledForward | None,
    epoch: int,
    erased: int,
    consents: int,
    users: int,
    resent: int,
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
        "tombstones_resent": resent,
        "restore_epoch": epoch,
        "versions_above": epoch << VERSION_EPOCH_BITS,
        "lost": lost,
    }


def _index_anew(records: Records, store: RestoreTarget) -> int:
    """The blind index emptied, and a rebuild under a new index key version started (the node
    runs it at its first start): the backup's rows may be of a key `index.key` no longer holds
    (rotated since, or the file lost). Returns the version to be built (0: no lookup field)."""
    store.index_drop_all()
    if not records.index.fields or records.keyring.shredded:
        return 0
    keys = records.keyring.index_keys
    return keys.versions()[1] or keys.start_rotation()


def _erasures_after(recovered_to: int, keys_from_backup: bool) -> str:
    """What the restore could not know of the erasures after the recovered entries."""
    if keys_from_backup:
        return (
            f"the keys came from --keys-from: a user erased after entry {recovered_to} (the last "
            "recovered) still has its key in the keys backup, so the record is readable again and "
            "is sent again: erase such users again (use --keys-from only when keys.db is lost)"
        )
    return "the node's keyring was kept: every user erased after the backup has no key and is erased again"


def _entry(region: str, rules_version: str, s: dict[str, Any]) -> dict[str, Any]:
    taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["backup_taken_at"]))
    reason = (
        f"store restored from a backup taken {taken} at tree size {s['backup_tree_size']}; entries "
        f"{s['backup_tree_size'] + 1} to {s['recovered_to']} recovered from the archive, each "
        f"segment verified against its signed checkpoint; {s['erasures_reapplied']} erasures and "
        f"{s['consent_changes_reapplied']} consent changes made since the backup re-applied; "
        f"{s['reversioned']} users re-versioned and {s['tombstones_resent']} tombstones sent again "
        f"under restore epoch {s['restore_epoch']} (every version from now on is above "
        f"{s['versions_above']}); {s['lost']}; {s['erasures_after']}"
    )
    return translog.admin(region, RESTORE_ACTOR, rules_version, reason)
