"""A node's keyring: its provider, its region key, and the wrapping keys of its own records'
data keys.

A node's own records are sealed under per-user DEKs wrapped by a *wrapping key*: an AES key
the provider generates and wraps (one provider call per wrapping key, not per record), kept
in the node's keyring database beside, not inside, its data. Erasing a user deletes the
user's wrapped DEK from the keyring, so a copy of the data taken earlier no longer opens.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from residency.server.core.errors import KeysBehind
from residency.server.core.sealing import NONCE, DataKey, KeyDestroyed, SealError, dek_context
from residency.server.keys.cache import KeyCache
from residency.server.keys.indexkey import IndexKeys
from residency.server.keys.providers import KeyProvider
from residency.server.keys.region import RegionKey


class WrappingKey:
    """An AES-256 key, generated and wrapped by the provider, that wraps many users' DEKs
    locally: the provider is called once per wrapping key, never per record or field."""

    __slots__ = ("id", "wrapped", "born", "_aead")

    def __init__(self, id: str, raw: bytes, wrapped: bytes, born: float):
        self.id, self.wrapped, self.born = id, wrapped, born
        self._aead = AESGCM(raw)

    @staticmethod
    def context(region: str, id: str) -> dict[str, str]:
        return {"region": region, "purpose": "wrapping-key", "wrapping_key": id}

    def wrap(self, region: str, user_id: str, raw: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, raw, dek_context(user_id, region, self.id))

    def unwrap(self, region: str, user_id: str, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:NONCE], wrapped[NONCE:], dek_context(user_id, region, self.id))
        except InvalidTag as e:
            raise SealError("a stored data key does not unwrap for this user and region") from e


def _older(version: str, than: str) -> bool:
    """Whether provider version `version` is older than `than` (both `vN`; any other name
    that differs counts as older: a retire must not guess in its favour)."""
    if version[:1] == than[:1] == "v" and version[1:].isdigit() and than[1:].isdigit():
        return int(version[1:]) < int(than[1:])
    return version != than


class Keyring:
    """A node's keys: its provider, its region key (opened lazily: a primary that never
    opens copies never unwraps it), and the wrapping keys of its own records' DEKs."""

    def __init__(
        self,
        region: str,
        provider: KeyProvider,
        directory: str | Path,
        cache_entries: int = 100_000,
        cache_seconds: float = 300.0,
    ):
        self.region = region
        self.provider = provider
        self.dir = Path(directory)
        self.cache_seconds = cache_seconds
        self.cache_entries = cache_entries
        self.data_keys = KeyCache(cache_entries, cache_seconds)
        self._wrapping = KeyCache(1000, cache_seconds)
        self._active: WrappingKey | None = None
        # The store's wrapping-key generation `_active` belongs to (None: not read yet).
        self.generation: int | None = None
        self._region_key: RegionKey | None = None
        self._index_keys: IndexKeys | None = None
        # Set when the region's key was shredded: why every open fails.
        self.shredded = ""
        # Set while this process's keys folder lags the store's key events (`suspend`).
        self.suspended = ""

    @property
    def region_key(self) -> RegionKey:
        self.check()
        if self._region_key is None:
            self._region_key = RegionKey.load(self.region, self.dir, self.provider)
        return self._region_key

    @property
    def index_keys(self) -> IndexKeys:
        """The region's blind-index keys (`index.key`, wrapped by the provider)."""
        self.check()
        if self._index_keys is None:
            self._index_keys = IndexKeys(self.region, self.dir, self.provider)
        return self._index_keys

    def check(self) -> None:
        # Suspended first: a shred this process knows of may have been followed by a rekey it
        # does not know of yet, and a region node must not answer its primary "shredded" then.
        if self.suspended:
            raise KeysBehind(self.suspended)
        if self.shredded:
            raise KeyDestroyed(self.shredded)

    def shred(self, reason: str) -> None:
        """Forgets every key held in memory; from now on every open fails with `reason`."""
        self.shredded = reason
        self._forget()

    def suspend(self, why: str) -> None:
        """Forgets every key held in memory; until `resume`, every open fails KeysBehind(`why`)
        (UNAVAILABLE: not a shred, which the primary would hold a destination for)."""
        self.suspended = why
        self._forget()

    def resume(self) -> None:
        """Opens again, reading the provider's versions and the key files anew."""
        self.suspended = ""
        if not self.shredded:
            self.rekeyed()

    def _forget(self) -> None:
        self._region_key = None
        self._index_keys = None
        self._active = None
        self.data_keys = KeyCache(1, self.cache_seconds)
        self._wrapping = KeyCache(1, self.cache_seconds)

    def rekeyed(self) -> None:
        """After `residency keys rekey`: the provider's and the region's new keys are read at
        the next open, and opens work again."""
        self.provider.refresh()
        self.shredded = ""
        self._region_key = None
        self._index_keys = None
        self._active = None
        self.data_keys = KeyCache(self.cache_entries, self.cache_seconds)
        self._wrapping = KeyCache(1000, self.cache_seconds)

    def follow(self, generation: int) -> None:
        """The store's wrapping keys were renewed (a rotation or a retire, through this process
        or another): the provider's versions are read again, and the next data key goes under a
        fresh wrapping key of its newest version, which belongs to `generation`."""
        if generation != self.generation:
            self.provider.refresh()
            self._active = None
            self.generation = generation

    def active_wrapping_key(self) -> WrappingKey:
        """The wrapping key for new DEKs. A new one is asked of the provider when the last is
        older than the cache age, so a provider that is down is noticed within that age."""
        self.check()
        now = time.monotonic()
        wk = self._active
        if wk is None or now - wk.born > self.cache_seconds:
            id = os.urandom(8).hex()
            raw, wrapped = self.provider.new_data_key(WrappingKey.context(self.region, id))
            wk = self._active = WrappingKey(id, raw, wrapped, now)
            self._wrapping.put(id, wk)
        return wk

    def wrapping_key(self, id: str, wrapped: bytes) -> WrappingKey:
        self.check()
        wk: WrappingKey | None = self._wrapping.get(id)
        if wk is None:
            raw = self.provider.unwrap(wrapped, WrappingKey.context(self.region, id))
            wk = WrappingKey(id, raw, wrapped, time.monotonic())
            self._wrapping.put(id, wk)
        return wk

    def new_data_key(self, user_id: str) -> tuple[DataKey, WrappingKey, bytes]:
        """A fresh data key for a user's record, the wrapping key it goes under, and the key
        wrapped by it (what the store keeps). Its raw bytes stay inside this package."""
        wk = self.active_wrapping_key()
        raw = AESGCM.generate_key(bit_length=256)
        return DataKey(raw), wk, wk.wrap(self.region, user_id, raw)

    def rewrap_stored_key(
        self, user_id: str, wk_id: str, wk_wrapped: bytes, wrapped: bytes, new: WrappingKey
    ) -> bytes:
        """A stored data key, opened and wrapped again under `new` (key rotation)."""
        return new.wrap(self.region, user_id, self.open_stored_key(user_id, wk_id, wk_wrapped, wrapped).raw)

    def open_stored_key(self, user_id: str, wk_id: str, wk_wrapped: bytes, wrapped: bytes) -> DataKey:
        """Opens a DEK as the keyring stores it: under one of this node's wrapping keys, or
        (a region's copies, as the primary sent them) under a transit key `transit:KEYID:ID`
        whose HPKE-wrapped blob is `wk_wrapped`, or with HPKE alone, `hpke:KEYID`."""
        kind, _, rest = wk_id.partition(":")
        if kind == "transit":
            key_id, _, transit_id = rest.partition(":")
            return self.region_key.open_data_key(user_id, key_id, wrapped, transit_id, wk_wrapped)
        if kind == "hpke":
            return self.region_key.open_data_key(user_id, rest, wrapped)
        return DataKey(self.wrapping_key(wk_id, wk_wrapped).unwrap(self.region, user_id, wrapped))

    def new_wrapping_key(self) -> WrappingKey:
        """A fresh wrapping key under the provider's newest version, which every new data key
        goes under from now on (rotation)."""
        self._active = None
        return self.active_wrapping_key()

    def old_versions(self, in_use: list[tuple[str, bytes, int]], newest: str) -> dict[str, int]:
        """Of (wrapping key id, wrapped wrapping key, data keys under it): how many data keys
        are under each provider version older than `newest` (`vN`), which a retire keeping
        `newest` would make unreadable; a newer one (another front end's rotation since) is
        kept. Copies' keys under the region key (`transit:`, `hpke:`) are under none:
        rotation rewraps `region.key` itself."""
        old: dict[str, int] = {}
        for wk_id, wrapped, n in in_use:
            if wk_id.partition(":")[0] in ("transit", "hpke"):
                continue
            version = self.provider.version_of(wrapped)
            if version and _older(version, newest):
                old[version] = old.get(version, 0) + n
        return old
