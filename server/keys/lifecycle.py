"""Key lifecycle: rotate, retire and shred a region's keys, and the key events a node logs.

Operators run these through `residency keys ...` while the node keeps serving. They act on
the key provider, the key folder and the node's keyring database (`keys.db`), and append an
event to `keyring.json` in the key folder; the node watches that file, writes each new event
to its transfer log (kind `key_event`) and, after a shred, forgets every key it holds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from residency.server.config.node import NodeConfig
from residency.server.keys.crypto import Keyring, RegionKey
from residency.server.keys.providers import KeyProvider, _shred_file, open_provider
from residency.server.storage.sqlite import SqliteStore

STATE = "keyring.json"
PAGE = 500


def read_events(directory: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((directory / STATE).read_text()).get("events", [])
    except FileNotFoundError:
        return []


def append_event(directory: Path, event: str, actor: str, detail: str) -> dict[str, Any]:
    events = read_events(directory)
    item = {"event": event, "time": round(time.time(), 3), "actor": actor, "detail": detail}
    events.append(item)
    tmp = directory / f".{STATE}.tmp"
    tmp.write_text(json.dumps({"events": events}, indent=1))
    os.replace(tmp, directory / STATE)
    return item


def shredded_reason(region: str, events: list[dict[str, Any]]) -> str:
    for e in events:
        if e["event"] == "shredded":
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["time"]))
            return (
                f"the region key of {region} was shredded at {when} by {e['actor']} "
                f"(residency keys shred: {e['detail']}); copies sealed for it cannot be opened"
            )
    return ""


def _store(config: NodeConfig) -> SqliteStore:
    return SqliteStore(config.data_dir / "node.db")


def rotate(config: NodeConfig, actor: str, progress: bool = True) -> dict[str, Any]:
    """A new provider key version; `region.key` and every data key in the node's keyring are
    rewrapped under it, page by page (one short transaction each, so traffic goes on): the
    primary's, and on a region node the copies' keys (HPKE-wrapped as they arrived, then
    under a wrapping key of the new version). Field values are not re-encrypted: only the
    keys that wrap their data keys change."""
    provider = open_provider(config.keys)
    try:
        version = provider.rotate()
        if (config.keys_dir / "region.key").exists():
            RegionKey.rewrap(config.region, config.keys_dir, provider)
        append_event(config.keys_dir, "rotated", actor, f"new key version {version}")
        rewrapped = rewrap_data_keys(config, provider, progress)
    finally:
        provider.close()
    append_event(config.keys_dir, "rewrapped", actor, f"{rewrapped} data keys rewrapped under {version}")
    return {"region": config.region, "version": version, "data_keys_rewrapped": rewrapped}


def rewrap_data_keys(config: NodeConfig, provider: KeyProvider, progress: bool) -> int:
    keyring = Keyring(config.region, provider, config.keys_dir)
    store = _store(config)
    try:
        new = keyring.new_wrapping_key()
        with store.transaction():
            store.put_wrapping_key(new.id, new.wrapped)
        total = store.count_data_keys_not_under(new.id)
        done, after = 0, ""
        with tqdm(
            total=total, desc=f"rewrapping {config.region}", unit="key", file=sys.stderr, disable=not progress
        ) as bar:
            while page := store.data_keys_not_under(new.id, after, PAGE):
                rows = []
                for user_id, wk_id, wk_wrapped, wrapped in page:
                    raw = keyring.open_stored_key(user_id, wk_id, wk_wrapped, wrapped).raw
                    rows.append((user_id, new.id, new.wrap(config.region, user_id, raw)))
                with store.transaction():
                    # Only rows still as read: a user erased meanwhile stays erased.
                    current = store.data_keys([r[0] for r in rows])
                    store.put_data_keys([r for r in rows if r[0] in current])
                done += len(rows)
                after = page[-1][0]
                bar.update(len(rows))
        return done
    finally:
        store.close()


def retire(config: NodeConfig, actor: str) -> dict[str, Any]:
    """After a rotation (give the node a second to notice it): every data key is moved under a
    fresh wrapping key, wrapping keys no data key uses are deleted and old provider key
    versions stop decrypting."""
    provider = open_provider(config.keys)
    # Data keys the node made between the rotation and noticing it are under a wrapping key
    # of the old version: move everything under a fresh one first.
    rewrap_data_keys(config, provider, progress=False)
    store = _store(config)
    try:
        with store.transaction():
            dropped = store.delete_unused_wrapping_keys()
        provider.retire()
    finally:
        store.close()
        provider.close()
    append_event(
        config.keys_dir, "retired", actor, f"old key versions retired; {dropped} wrapping keys deleted"
    )
    return {"region": config.region, "wrapping_keys_deleted": dropped}


def shred(config: NodeConfig, actor: str, reason: str) -> dict[str, Any]:
    """Destroys the region's key in its provider and its private key file: every copy and
    record sealed for this region becomes unreadable, backups included. Irreversible."""
    provider = open_provider(config.keys)
    try:
        provider.destroy()
    finally:
        provider.close()
    _shred_file(config.keys_dir / "region.key")
    append_event(config.keys_dir, "shredded", actor, reason or "key compromised")
    return {"region": config.region, "shredded": True}
