"""Key lifecycle: rotate, retire and shred a region's keys, and the key events a node logs.

Operators run these through `residency keys ...` while the node keeps serving. They act on
what they are given: the key provider, the key folder and the node's data keys (`DataKeys`,
the keyring database `keys.db`), and append an event to `keyring.json` in the key folder;
the node watches that file, writes each new event to its transfer log (kind `key_event`)
and, after a shred, forgets every key it holds. The caller opens and closes all of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from residency.server.keys.files import KeyExists, shred_file, write_private
from residency.server.keys.keyring import Keyring
from residency.server.keys.logkey import KEY as LOG_KEY
from residency.server.keys.logkey import rewrap_log_key
from residency.server.keys.providers import KeyProvider
from residency.server.keys.region import RegionKey

STATE = "keyring.json"
PAGE = 500
# Called with (data keys done, data keys in all) as a rewrap goes on.
Progress = Callable[[int, int], None]


class DataKeys(Protocol):
    """What rotation needs of the node's keyring database."""

    def transaction(self) -> AbstractContextManager[Any]: ...
    def put_wrapping_key(self, id: str, wrapped: bytes) -> None: ...
    def count_data_keys_not_under(self, wrapping_key: str) -> int: ...
    def data_keys_not_under(
        self, wrapping_key: str, after_user: str, limit: int
    ) -> list[tuple[str, str, bytes, bytes]]: ...
    def data_keys(self, user_ids: list[str]) -> dict[str, tuple[str, bytes, bytes]]: ...
    def put_data_keys(self, rows: list[tuple[str, str, bytes]]) -> None: ...
    def delete_unused_wrapping_keys(self) -> int: ...


def read_events(directory: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((directory / STATE).read_text()).get("events", [])
    except FileNotFoundError:
        return []


def append_event(directory: Path, event: str, actor: str, detail: str) -> dict[str, Any]:
    events = read_events(directory)
    item = {"event": event, "time": round(time.time(), 3), "actor": actor, "detail": detail}
    events.append(item)
    # Durably, like a key file: a power cut leaves the events before or after, never none.
    write_private(directory / STATE, json.dumps({"events": events}, indent=1).encode())
    return item


def shredded_reason(region: str, events: list[dict[str, Any]]) -> str:
    """Why the region's key is gone, or "" if it is not (never shredded, or rekeyed since)."""
    for e in reversed(events):
        if e["event"] == "rekeyed":
            return ""
        if e["event"] == "shredded":
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["time"]))
            return (
                f"the region key of {region} was shredded at {when} by {e['actor']} "
                f"(residency keys shred: {e['detail']}); copies sealed for it cannot be opened"
            )
    return ""


def rotate(
    region: str,
    provider: KeyProvider,
    keys_dir: Path,
    store: DataKeys,
    actor: str,
    progress: Progress | None = None,
    *,
    log_keys: KeyProvider,
) -> dict[str, Any]:
    """A new provider key version; `region.key` and every data key in the node's keyring are
    rewrapped under it, page by page (one short transaction each, so traffic goes on): the
    primary's, and on a region node the copies' keys (HPKE-wrapped as they arrived, then
    under a wrapping key of the new version). Field values are not re-encrypted: only the
    keys that wrap their data keys change. The log key's own key (`log_keys`,
    `open_log_provider`) gets a new version too, and `log.key` is rewrapped under it."""
    version = provider.rotate()
    if (keys_dir / "region.key").exists():
        RegionKey.rewrap(region, keys_dir, provider)
    if (keys_dir / LOG_KEY).exists():
        log_keys.rotate()
        rewrap_log_key(keys_dir / LOG_KEY, log_keys)
    append_event(keys_dir, "rotated", actor, f"new key version {version}")
    rewrapped = rewrap_data_keys(region, provider, keys_dir, store, progress)
    append_event(keys_dir, "rewrapped", actor, f"{rewrapped} data keys rewrapped under {version}")
    return {"region": region, "version": version, "data_keys_rewrapped": rewrapped}


def rewrap_data_keys(
    region: str, provider: KeyProvider, keys_dir: Path, store: DataKeys, progress: Progress | None = None
) -> int:
    keyring = Keyring(region, provider, keys_dir)
    new = keyring.new_wrapping_key()
    with store.transaction():
        store.put_wrapping_key(new.id, new.wrapped)
    total = store.count_data_keys_not_under(new.id)
    done, after = 0, ""
    if progress:
        progress(done, total)
    while page := store.data_keys_not_under(new.id, after, PAGE):
        rows = []
        for user_id, wk_id, wk_wrapped, wrapped in page:
            rows.append(
                (user_id, new.id, keyring.rewrap_stored_key(user_id, wk_id, wk_wrapped, wrapped, new))
            )
        with store.transaction():
            # Only rows still as read: a user erased meanwhile stays erased.
            current = store.data_keys([r[0] for r in rows])
            store.put_data_keys([r for r in rows if r[0] in current])
        done += len(rows)
        after = page[-1][0]
        if progress:
            progress(done, total)
    return done


def retire(
    region: str, provider: KeyProvider, keys_dir: Path, store: DataKeys, actor: str, *, log_keys: KeyProvider
) -> dict[str, Any]:
    """After a rotation (give the node a second to notice it): every data key is moved under a
    fresh wrapping key, wrapping keys no data key uses are deleted and old provider key
    versions stop decrypting, the log key's own key's (`log_keys`) included."""
    # Data keys the node made between the rotation and noticing it are under a wrapping key
    # of the old version: move everything under a fresh one first.
    rewrap_data_keys(region, provider, keys_dir, store)
    with store.transaction():
        dropped = store.delete_unused_wrapping_keys()
    provider.retire()
    if (keys_dir / LOG_KEY).exists():
        # Under the newest version first (a rotation cut short may have left it under an old one).
        rewrap_log_key(keys_dir / LOG_KEY, log_keys)
        log_keys.retire()
    append_event(keys_dir, "retired", actor, f"old key versions retired; {dropped} wrapping keys deleted")
    return {"region": region, "wrapping_keys_deleted": dropped}


def shred(region: str, provider: KeyProvider, keys_dir: Path, actor: str, reason: str) -> dict[str, Any]:
    """Destroys the region's key in its provider and its private key file: every copy and
    record sealed for this region becomes unreadable, backups included. Irreversible. The
    log signing key is under a key of its own, which this leaves alone: the node goes on
    signing its transfer log (the shred included) with the key `log.pub` names."""
    provider.destroy()
    shred_file(keys_dir / "region.key")
    append_event(keys_dir, "shredded", actor, reason or "key compromised")
    return {"region": region, "shredded": True}


def rekey(region: str, provider: KeyProvider, keys_dir: Path, kem: str, actor: str) -> dict[str, Any]:
    """After a shred: a new region key pair (a new key id), wrapped by the provider's key (a
    local provider makes a new key-encryption key: `residency keys rekey` opens it with
    `LocalProvider.create`; a KMS or OpenBao key must be a new one, named in the config).
    Copies sealed to the shredded key stay unreadable: the node drops them, and the primary,
    once it has the new public key from the node, sends every copy again."""
    if not shredded_reason(region, read_events(keys_dir)):
        raise KeyExists(
            f"the key of {region} was not shredded: rekey replaces a shredded key "
            "(to change a key that is not compromised, rotate it)"
        )
    (keys_dir / "region.pub").unlink(missing_ok=True)
    key = RegionKey.generate(region, keys_dir, provider, kem)
    append_event(keys_dir, "rekeyed", actor, f"new region key {key.key_id} ({kem})")
    return {"region": region, "key_id": key.key_id, "kem": kem}
