"""Key lifecycle, the key side: what rotating, retiring, shredding and rekeying a region's keys
does to its provider and key files, and the record of those events (`keyring.json`).

The acts themselves, with the node's data keys and transfer log, are
`residency.server.vault.key_lifecycle`'s: a running node does them (AdminService), and
`residency keys ... --config` does them the same way for a stopped one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from residency.server.core.sealing import KeyDestroyed
from residency.server.keys.files import KeyExists, shred_file, write_private
from residency.server.keys.hashkey import rewrap_hash_key
from residency.server.keys.indexkey import IndexKeys, shred_index_keys
from residency.server.keys.keyring import Keyring, WrappingKey
from residency.server.keys.logkey import KEY as LOG_KEY
from residency.server.keys.logkey import rewrap_log_key
from residency.server.keys.providers import KeyProvider
from residency.server.keys.region import RegionKey

STATE = "keyring.json"
LOCK = "keyring.json.lock"  # held while an event is appended (`_locked`); always empty


def read_events(directory: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((directory / STATE).read_text()).get("events", [])
    except FileNotFoundError:
        return []


def events_digest(events: list[dict[str, Any]]) -> str:
    """A digest of a sequence of key events: SHA-256 over each event's canonical JSON, each
    preceded by its length. Two folders' first N events are the same events in the same order
    exactly when their digests agree (the store keeps the digest of those it logged)."""
    h = hashlib.sha256()
    for e in events:
        # ASCII: total over whatever the file holds, a lone surrogate included.
        line = json.dumps(e, sort_keys=True, separators=(",", ":")).encode()
        h.update(len(line).to_bytes(8, "big") + line)
    return h.hexdigest()


# Appends of one process, one at a time: two acts finishing together (a rewrap and an index
# key rotation, run in threads) would otherwise each write the events it read, losing one.
_APPENDING = threading.Lock()


def append_event(directory: Path, event: str, actor: str, detail: str) -> dict[str, Any]:
    with _APPENDING, _locked(directory):
        events = read_events(directory)
        item = {"event": event, "time": round(time.time(), 3), "actor": actor, "detail": detail}
        events.append(item)
        # Durably, like a key file: a power cut leaves the events before or after, never none.
        write_private(directory / STATE, json.dumps({"events": events}, indent=1).encode())
    return item


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """The folder locked against other processes' appends (front ends and workers sharing it,
    `residency keys`): two appending at once would each write the events they read, one lost.
    A POSIX lock on `keyring.json.lock`, which NFS carries between hosts (`flock` on a folder
    it does not)."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


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


def rotate(region: str, provider: KeyProvider, keys_dir: Path, *, log_keys: KeyProvider) -> str:
    """A new provider key version, and `region.key` rewrapped under it; the log key's own key
    (`log_keys`, `open_log_provider`) gets a new version too, and `log.key` is rewrapped under
    it. Returns the new version's name. Data keys are the caller's to rewrap."""
    version = provider.rotate()
    if (keys_dir / "region.key").exists():
        RegionKey.rewrap(region, keys_dir, provider)
    IndexKeys(region, keys_dir, provider).rewrap()
    if (keys_dir / LOG_KEY).exists():
        log_keys.rotate()
        rewrap_log_key(keys_dir / LOG_KEY, log_keys)
        rewrap_hash_key(keys_dir, log_keys)  # under the same provider key: it must follow
    return version


def rewrap_page(
    keyring: Keyring, page: list[tuple[str, str, bytes, bytes]], new: WrappingKey
) -> list[tuple[str, bytes, str, bytes]]:
    """Data keys as the store lists them (user, wrapping key id, wrapping key, wrapped data key),
    opened and wrapped again under `new`: (user, wrapped as read, new's id, wrapped under new),
    what `swap_data_keys` writes where nothing changed meanwhile. Field values are not touched."""
    return [
        (user_id, wrapped, new.id, keyring.rewrap_stored_key(user_id, wk_id, wk_wrapped, wrapped, new))
        for user_id, wk_id, wk_wrapped, wrapped in page
    ]


def retire(
    region: str, provider: KeyProvider, keys_dir: Path, *, log_keys: KeyProvider, keep: str = ""
) -> None:
    """Provider key versions older than `keep` (default: the newest) stop unwrapping, and the
    log key's own key's (`log_keys`) old versions too. `region.key` and `log.key` go under the
    newest version first (a rotation cut short may have left one under an old version): a
    retire must not shred the region by accident. The caller has checked that no data key is
    under a version older than `keep`; a version another process made since stays."""
    if (keys_dir / "region.key").exists():
        RegionKey.rewrap(region, keys_dir, provider)
    IndexKeys(region, keys_dir, provider).rewrap()
    provider.retire(keep)
    if (keys_dir / LOG_KEY).exists():
        # Likewise the log key's own key: a version another front end's rotation made since
        # (its `log.key` may be under it already) stays.
        log_keys.refresh()
        log_keep = log_keys.newest_version()
        rewrap_log_key(keys_dir / LOG_KEY, log_keys)
        rewrap_hash_key(keys_dir, log_keys)
        log_keys.retire(log_keep)


def shred(region: str, provider: KeyProvider, keys_dir: Path) -> None:
    """Destroys the region's key in its provider and its private key file: every copy and
    record sealed for this region becomes unreadable, backups included. Irreversible. The
    log signing key is under a key of its own, which this leaves alone: the node goes on
    signing its transfer log (the shred included) with the key `log.pub` names."""
    provider.destroy()
    shred_file(keys_dir / "region.key")
    shred_index_keys(keys_dir)


def rekey(region: str, provider: KeyProvider, keys_dir: Path, kem: str) -> RegionKey:
    """After a shred: a new region key pair (a new key id), wrapped by the provider's key (a
    local provider makes a new key-encryption key; a KMS or OpenBao key must be a new one,
    named in the config). Copies sealed to the shredded key stay unreadable: the node drops
    them, and the primary, once it has the new public key from the node, sends every copy
    again."""
    if not shredded_reason(region, read_events(keys_dir)):
        raise KeyExists(
            f"the key of {region} was not shredded: rekey replaces a shredded key "
            "(to change a key that is not compromised, rotate it)"
        )
    try:
        provider.newest_version()
    except KeyDestroyed:
        provider.rotate()  # a local provider's first key-encryption key after the shred
    (keys_dir / "region.pub").unlink(missing_ok=True)
    return RegionKey.generate(region, keys_dir, provider, kem)
