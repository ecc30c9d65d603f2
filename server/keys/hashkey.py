"""A primary's hash key on disk: `hash.key`, the secret behind the `hash` transformation's
per-region keys, wrapped by the log key's provider (as `log.key` is, so that a shred of the
region's key leaves it alone), mode 0600.

Each destination region's key is HMAC-SHA256 of the secret over the region's name, and each
field's hash key there HMAC-SHA256 of the region's key over the field's name: a field hashed
for one region is stable there and unlike the same value hashed for another region or in
another field, and without the provider nobody can run a dictionary against the hashes. `residency init`
writes the file for the primary; a primary (or its standalone worker) whose key folder lacks
it writes it the first time it starts (a wrap under the log provider's key, which `init`
made). Rotation rewraps it with `log.key`; retire keeps it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from residency.server.core.errors import KeyUnavailable
from residency.server.keys.files import KeyExists, write_private
from residency.server.keys.providers import KeyProvider, open_log_provider

KEY = "hash.key"
_CONTEXT = {"purpose": "transform-hash-key"}
_REGION = b"residency/transform-hash-key/v1\x00"
_FIELD = b"residency/transform-hash-field/v1\x00"


class HashKeys:
    """The per-region, per-field hash keys of one secret; raw key bytes never leave this
    object but through `for_field`, which the projection alone calls."""

    __slots__ = ("_secret", "_regions", "_fields")

    def __init__(self, secret: bytes):
        self._secret = secret
        self._regions: dict[str, bytes] = {}
        self._fields: dict[tuple[str, str], bytes] = {}

    def for_field(self, region: str, field: str) -> bytes:
        """The key `field`'s values are hashed under for `region`: equal values in two fields
        hash apart, so a hash learnt in one field confirms nothing in another."""
        key = self._fields.get((region, field))
        if key is None:
            key = self._fields[region, field] = hmac.new(
                self.for_region(region), _FIELD + field.encode(), hashlib.sha256
            ).digest()
        return key

    def for_region(self, region: str) -> bytes:
        key = self._regions.get(region)
        if key is None:
            key = self._regions[region] = hmac.new(
                self._secret, _REGION + region.encode(), hashlib.sha256
            ).digest()
        return key


def _read(path: Path) -> bytes:
    try:
        return base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise KeyUnavailable(
            f"cannot load the hash key {path}: {type(e).__name__}; `residency init` writes one "
            "(hash.key beside log.key)"
        ) from e


def create_hash_key(directory: str | Path, provider: KeyProvider) -> None:
    """Writes `hash.key` (a fresh 32-byte secret wrapped by `provider`, the log key's) unless
    it is there."""
    path = Path(directory) / KEY
    if not path.exists():
        wrapped = provider.wrap(os.urandom(32), _CONTEXT)
        # A worker starting beside the node may write it first: that one is the key.
        with contextlib.suppress(KeyExists):
            write_private(path, base64.b64encode(wrapped) + b"\n", exclusive=True)


def load_hash_keys(directory: str | Path, keys: Any) -> HashKeys:
    """A primary's hash keys at start, through the log key's provider (`keys`: the node's
    `KeysConfig`)."""
    provider = open_log_provider(keys)
    try:
        return open_hash_keys(directory, provider)
    finally:
        provider.close()


def open_hash_keys(directory: str | Path, provider: KeyProvider) -> HashKeys:
    """The primary's hash keys, `hash.key` made first if missing."""
    create_hash_key(directory, provider)
    return HashKeys(provider.unwrap(_read(Path(directory) / KEY), _CONTEXT))


def rewrap_hash_key(directory: Path, provider: KeyProvider) -> None:
    """Rewraps `hash.key` under `provider`'s newest key version (rotation), if there is one."""
    path = directory / KEY
    if path.exists():
        write_private(path, base64.b64encode(provider.rewrap(_read(path), _CONTEXT)) + b"\n")
