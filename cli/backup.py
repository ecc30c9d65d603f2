"""`residency backup` (a node's store, and apart from it its keyring, while it runs) and
`residency restore` (a stopped primary from such a backup; docs/operators.md, "Backup and
restore")."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from residency.server.core.errors import FailedPrecondition

if TYPE_CHECKING:
    from residency.server.config.node import NodeConfig
    from residency.server.storage.backup import Progress
    from residency.server.storage.sqlite import SqliteStore
    from residency.server.vault.restore import RolledForward


@contextmanager
def _progress(quiet: bool) -> Iterator[Progress]:
    """Pages copied per file, on stderr."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    try:

        def show(name: str, done: int, total: int) -> None:
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(desc=f"copying {name}", unit="page", file=sys.stderr, disable=quiet)
            bar.total = total
            bar.update(done - bar.n)

        yield show
    finally:
        for bar in bars.values():
            bar.close()


def _sqlite_only(config: NodeConfig, command: str) -> None:
    if config.store.kind != "sqlite":
        raise FailedPrecondition(
            f"`residency {command}` works on the embedded SQLite store; {config.path} keeps its "
            "store in PostgreSQL: back it up and restore it with PostgreSQL's own tools "
            '(pg_dump, or a base backup with WAL archiving: docs/operators.md, "PostgreSQL"); '
            "nothing was changed"
        )


def _backup(args: argparse.Namespace) -> int:
    from residency.server.config.node import load_config
    from residency.server.vault.backup import take_backup

    config = load_config(args.config)
    _sqlite_only(config, "backup")
    keys_out = Path(args.keys_out) if args.keys_out else None
    with _progress(args.quiet) as progress:
        manifest = take_backup(
            config.data_dir, Path(args.out), keys_out, config.region, config.role, progress
        )
    if keys_out is None:
        print(
            "warning: the keyring (keys.db) was not backed up: give --keys-out KEYDIR, a folder "
            "apart from --out, kept for no longer than your erasure deadline",
            file=sys.stderr,
        )
    print(json.dumps({k: v for k, v in manifest.items() if k != "checkpoint"}, sort_keys=True))
    return 0


def _restore(args: argparse.Namespace) -> int:
    from residency.server.config.node import load_config
    from residency.server.storage.running import hold_stopped
    from residency.server.vault.backup import read_manifest

    config = load_config(args.config)
    _sqlite_only(config, "restore")
    try:
        stopped = hold_stopped(config.data_dir)
    except FailedPrecondition:
        raise FailedPrecondition(
            f"the node of {config.data_dir} is running (it holds {config.data_dir / 'running.lock'}), "
            "or a replication worker of it: stop it before restoring; nothing was changed"
        ) from None
    try:
        keys_from = Path(args.keys_from) if args.keys_from else None
        manifest = read_manifest(Path(args.backup), config.region, config.role, keys_from)
        summary = _restore_stopped(config, Path(args.backup), keys_from, manifest)
    finally:
        os.close(stopped)
    print(_readable(summary), file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _restore_stopped(
    config: NodeConfig, backup: Path, keys_from: Path | None, manifest: dict[str, Any]
) -> dict[str, Any]:
    """The backup's files staged beside the node's, rolled forward and made good there, then
    put in place: a restore cut short leaves the node's files as they were (but keys of users
    erased since the backup, destroyed in the live keyring), and may be run again."""
    from residency.server.config.rules import load_rules
    from residency.server.config.schema import load_schema
    from residency.server.keys.keyring import Keyring
    from residency.server.keys.providers import open_provider
    from residency.server.storage.restores import epoch_of
    from residency.server.storage.sqlite import SqliteStore
    from residency.server.vault.backup import check_log, discard_staged, put_restored, stage_backup
    from residency.server.vault.records import Records
    from residency.server.vault.restore import apply_restore

    verifier_key = _log_pub(config)
    origin = verifier_key.split("+", 1)[0]
    check_log(backup, manifest, origin, verifier_key)
    epoch_seen = epoch_of(config.data_dir / "node.db")
    staged, keyring_file = stage_backup(config.data_dir, backup, keys_from)
    store = SqliteStore(staged, durability=config.durability, keyring=keyring_file)
    done = False
    try:
        rolled = _roll_forward(config, store, origin, verifier_key) if config.archive else None
        schema = load_schema(config.schema)
        keyring = Keyring(config.region, open_provider(config.keys), config.keys_dir)
        try:
            records = Records(
                config.region, config.is_primary, schema, load_rules(config.rules, schema), keyring, store
            )
            destinations = [a.region for a in config.affiliates]
            with store.transaction():
                summary = apply_restore(
                    records, store, manifest, rolled, destinations, epoch_seen, keys_from is not None
                )
            done = True
        finally:
            keyring.provider.close()
    finally:
        store.close()
        if not done:
            discard_staged(config.data_dir)
    put_restored(config.data_dir, staged, keyring_file)
    return summary


def _log_pub(config: NodeConfig) -> str:
    """The node's own log verifier key: the backup and the archive are checked against it."""
    pub = config.keys_dir / "log.pub"
    try:
        return pub.read_text().strip()
    except OSError as e:
        raise FailedPrecondition(
            f"{pub} cannot be read ({type(e).__name__}): a backup and the archive are checked "
            "against the node's own log key; nothing was changed"
        ) from e


def _roll_forward(config: NodeConfig, store: SqliteStore, origin: str, verifier_key: str) -> RolledForward:
    """The archive's entries after the backup, verified with the node's own log.pub."""
    from botocore.exceptions import BotoCoreError, ClientError

    from residency.server.vault.archive import S3Bucket
    from residency.server.vault.restore import roll_forward

    archive = config.archive
    assert archive is not None
    try:
        return roll_forward(store.log_tree(), S3Bucket(archive), archive.prefix, origin, verifier_key)
    except (BotoCoreError, ClientError) as e:  # no answer, access denied, no such bucket
        raise FailedPrecondition(
            f"the archive bucket {archive.bucket} cannot be read ({type(e).__name__}): the restore "
            "needs it to recover what the log recorded after the backup; nothing was changed"
        ) from e


def _readable(s: dict[str, Any]) -> str:
    return (
        f"restored from the backup at tree size {s['backup_tree_size']}; "
        f"{s['recovered_entries']} transfer-log entries recovered from the archive (to {s['recovered_to']}); "
        f"{s['erasures_reapplied']} erasures and {s['consent_changes_reapplied']} consent changes "
        f"re-applied; {s['reversioned']} users re-versioned and {s['tombstones_resent']} tombstones "
        f"sent again under restore epoch {s['restore_epoch']}; "
        f"{s['lost']}; {s['erasures_after']}"
        + (
            f"; the blind index is rebuilt under index key version {s['index_rebuild_version']} "
            "at the node's first start"
            if s["index_rebuild_version"]
            else ""
        )
    )


def add_backup(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("backup", help="back up a node's store (and, apart, its keyring) while it runs")
    b.add_argument("--config", required=True, help="the node's config")
    b.add_argument("--out", required=True, help="a new or empty folder for node.db and manifest.json")
    b.add_argument(
        "--keys-out", help="a new or empty folder apart from --out for keys.db (kept for a shorter time)"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=_backup)
    r = sub.add_parser("restore", help="restore a stopped primary from a backup")
    r.add_argument("--config", required=True, help="the config of the node to restore (stopped)")
    r.add_argument("--from", dest="backup", required=True, help="the backup folder (`backup --out`)")
    r.add_argument(
        "--keys-from", help="the keys backup taken with it (`backup --keys-out`): only if keys.db is lost"
    )
    r.set_defaults(run=_restore)
