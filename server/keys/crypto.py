"""Region keys, data keys and sealing. Raw key bytes never leave this module.

Each region has one HPKE key pair, its *region key* (X25519, or hybrid ML-KEM-768 + X25519).
Data keys (DEKs, AES-256) seal field values with AES-256-GCM; the associated data binds
user, field, region, record version and key id, so a sealed value moved to another record,
field, region or version fails to open. A DEK travels wrapped for its destination region
under a *transit key*: an AES-256 key the primary makes per destination every few minutes
and wraps once with HPKE (RFC 9180) to the region's public key, so the primary can seal for
a region but cannot open what it sent there once it forgets the transit key, and one HPKE
operation (about 85 µs) serves every copy of those minutes instead of one per user. The
region key's private half is stored wrapped by the region's key provider (`residency.server.keys.providers`:
local passphrase-protected keys, AWS KMS or OpenBao Transit), so it is useless without that
region's provider.

A node's own records are sealed under per-user DEKs wrapped by a *wrapping key*: an AES key
the provider generates and wraps (one provider call per wrapping key, not per record), kept
in the node's keyring database beside, not inside, its data. Erasing a user deletes the
user's wrapped DEK from the keyring, so a copy of the data taken earlier no longer opens.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from residency.server.core.errors import KeyUnavailable
from residency.server.keys.providers import KeyDestroyed, KeyProvider, SealError

__all__ = ["SealError", "KeyDestroyed"]

_SUITES = {
    "x25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "mlkem768-x25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
_X25519_PUB, _MLKEM768_PUB, _MLKEM_SEED = 32, 1184, 64
_NONCE = 12
_RAW = serialization.Encoding.Raw


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _kem_of_public(raw: bytes) -> str:
    return "x25519" if len(raw) == _X25519_PUB else "mlkem768-x25519"


def _public_key(raw: bytes):
    if len(raw) == _X25519_PUB:
        return X25519PublicKey.from_public_bytes(raw)
    if len(raw) == _MLKEM768_PUB + _X25519_PUB:
        return hpke.MLKEM768X25519PublicKey(
            MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUB]),
            X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUB:]),
        )
    raise ValueError(
        f"a region public key is 32 (X25519) or 1216 (ML-KEM-768 + X25519) bytes, not {len(raw)}"
    )


def _private_key(raw: bytes):
    """(private key, raw public bytes) from raw private bytes (X25519: 32; hybrid: seed + 32)."""
    if len(raw) == 32:
        k = X25519PrivateKey.from_private_bytes(raw)
        return k, k.public_key().public_bytes_raw()
    m = MLKEM768PrivateKey.from_seed_bytes(raw[:_MLKEM_SEED])
    x = X25519PrivateKey.from_private_bytes(raw[_MLKEM_SEED:])
    return hpke.MLKEM768X25519PrivateKey(
        m, x
    ), m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()


def _dek_context(user_id: str, region: str, key_id: str) -> bytes:
    return b"residency/dek/v1\x00" + "\x00".join((user_id, region, key_id)).encode()


def _transit_context(region: str, key_id: str, transit_id: str) -> bytes:
    return b"residency/transit-key/v1\x00" + "\x00".join((region, key_id, transit_id)).encode()


def field_aad(user_id: str, field: str, region: str, version: int, key_id: str) -> bytes:
    """Associated data of one sealed field of a replicated copy."""
    return "\x00".join(("field", user_id, field, region, str(version), key_id)).encode()


def record_aad(user_id: str, region: str, version: int, key_id: str) -> bytes:
    """Associated data of a home record sealed at rest as one unit (its field names are
    inside the authenticated plaintext)."""
    return "\x00".join(("record", user_id, region, str(version), key_id)).encode()


class DataKey:
    """An unwrapped data key; seals and opens the field values of one (user, region) copy."""

    __slots__ = ("_aead", "raw")

    def __init__(self, raw: bytes):
        self._aead = AESGCM(raw)
        # Kept for rewrapping during rotation; never leaves the crypto and key modules.
        self.raw = raw

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)
        except InvalidTag as e:
            raise SealError("a sealed value does not open under its record's data key and context") from e


@dataclass(frozen=True)
class RecipientKey:
    """The public half of a region's key: enough to seal for it, not to open."""

    region: str
    public_raw: bytes

    @property
    def key_id(self) -> str:
        return _key_id(self.public_raw)

    @property
    def kem(self) -> str:
        return _kem_of_public(self.public_raw)

    def new_data_key(self, user_id: str) -> tuple[DataKey, bytes]:
        """A fresh DEK for `user_id`'s copy in this region, wrapped for it with HPKE alone
        (the format before transit keys; still opened, see `RegionKey.open_data_key`)."""
        raw = AESGCM.generate_key(bit_length=256)
        wrapped = _SUITES[self.kem].encrypt(
            raw, _public_key(self.public_raw), info=_dek_context(user_id, self.region, self.key_id)
        )
        return DataKey(raw), wrapped

    def new_transit_key(self) -> TransitKey:
        """A fresh transit key for this region, wrapped for it with HPKE."""
        id = os.urandom(8).hex()
        raw = AESGCM.generate_key(bit_length=256)
        wrapped = _SUITES[self.kem].encrypt(
            raw, _public_key(self.public_raw), info=_transit_context(self.region, self.key_id, id)
        )
        return TransitKey(self.region, self.key_id, id, raw, wrapped)

    @classmethod
    def load(cls, region: str, path: str | Path) -> RecipientKey:
        try:
            raw = Path(path).read_bytes()
            _public_key(raw)
            return cls(region, raw)
        except (OSError, ValueError) as e:
            raise KeyUnavailable(f"public key of region {region} at {path} cannot be read: {e}") from e


def _private_context(region: str) -> dict[str, str]:
    return {"region": region, "purpose": "region-private-key"}


class RegionKey:
    """A node's own region key. Opens copies sealed for this region. Its private half is kept
    on disk (`region.key`, mode 0600) only wrapped by the region's key provider."""

    def __init__(self, region: str, private_raw: bytes, directory: str | Path | None = None):
        self.region = region
        self.dir = Path(directory) if directory else None
        self._raw = private_raw
        self._private, public_raw = _private_key(private_raw)
        self.recipient = RecipientKey(region, public_raw)
        self.key_id = self.recipient.key_id
        self._suite = _SUITES[self.recipient.kem]
        self._transit = KeyCache(1000, 24 * 3600.0)

    @classmethod
    def generate(
        cls, region: str, directory: str | Path, provider: KeyProvider, kem: str = "x25519"
    ) -> RegionKey:
        """Creates a region key in `directory`: `region.key` (the private half, wrapped by
        `provider`, mode 0600) and `region.pub`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        x = X25519PrivateKey.generate().private_bytes_raw()
        raw = x if kem == "x25519" else MLKEM768PrivateKey.generate().private_bytes_raw() + x
        key = cls(region, raw, d)
        key._write(d, provider.wrap(raw, _private_context(region)))
        (d / "region.pub").write_bytes(key.recipient.public_raw)
        return key

    @staticmethod
    def _write(d: Path, wrapped: bytes) -> None:
        tmp = d / ".region.key.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(wrapped)
        tmp.rename(d / "region.key")

    @classmethod
    def load(cls, region: str, directory: str | Path, provider: KeyProvider) -> RegionKey:
        path = Path(directory) / "region.key"
        try:
            wrapped = path.read_bytes()
        except FileNotFoundError as e:
            raise KeyDestroyed(f"region key of {region} at {path} is gone (shredded?)") from e
        except OSError as e:
            raise KeyUnavailable(f"region key of {region} at {path} cannot be read: {e}") from e
        return cls(region, provider.unwrap(wrapped, _private_context(region)), directory)

    @classmethod
    def rewrap(cls, region: str, directory: str | Path, provider: KeyProvider) -> None:
        """Rewraps `region.key` under the provider's newest key version (rotation)."""
        d = Path(directory)
        cls._write(d, provider.rewrap((d / "region.key").read_bytes(), _private_context(region)))

    def open_data_key(
        self,
        user_id: str,
        key_id: str,
        wrapped: bytes,
        transit_key_id: str = "",
        wrapped_transit_key: bytes = b"",
    ) -> DataKey:
        """Unwraps a DEK that was wrapped for this region (a replicated copy's): under the
        given transit key, or (without one) with HPKE directly."""
        if key_id != self.key_id:
            raise SealError(f"copy was sealed for key {key_id}, this region holds {self.key_id}")
        if transit_key_id:
            tk = self.open_transit_key(key_id, transit_key_id, wrapped_transit_key)
            return DataKey(tk.unwrap(user_id, wrapped))
        try:
            raw = self._suite.decrypt(wrapped, self._private, info=_dek_context(user_id, self.region, key_id))
        except Exception as e:  # hpke raises InvalidTag or ValueError on any mismatch
            raise SealError("the data key does not unwrap for this user and region") from e
        return DataKey(raw)

    def open_transit_key(self, key_id: str, transit_key_id: str, wrapped: bytes) -> TransitKey:
        """Unwraps a transit key sent to this region; opened ones are kept (a few hundred at
        most: one per destination and few minutes), so each is unwrapped once."""
        if key_id != self.key_id:
            raise SealError(f"transit key was wrapped for key {key_id}, this region holds {self.key_id}")
        tk = self._transit.get(transit_key_id)
        if tk is None or tk.wrapped != wrapped:
            try:
                raw = self._suite.decrypt(
                    wrapped, self._private, info=_transit_context(self.region, key_id, transit_key_id)
                )
            except Exception as e:
                raise SealError("the transit key does not unwrap for this region") from e
            tk = TransitKey(self.region, key_id, transit_key_id, raw, wrapped)
            self._transit.put(transit_key_id, tk)
        return tk


class TransitKey:
    """An AES-256 key that wraps the DEKs of many users' copies for one region; it travels
    with them, wrapped with HPKE to the region's public key."""

    __slots__ = ("region", "key_id", "id", "wrapped", "born", "_aead")

    def __init__(self, region: str, key_id: str, id: str, raw: bytes, wrapped: bytes):
        self.region, self.key_id, self.id, self.wrapped = region, key_id, id, wrapped
        self.born = time.monotonic()
        self._aead = AESGCM(raw)

    def new_data_key(self, user_id: str) -> tuple[DataKey, bytes]:
        """A fresh DEK for `user_id`'s copy in this region, and that DEK wrapped by this key."""
        raw = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        return DataKey(raw), nonce + self._aead.encrypt(nonce, raw, self._aad(user_id))

    def unwrap(self, user_id: str, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], self._aad(user_id))
        except InvalidTag as e:
            raise SealError("the data key does not unwrap for this user and region") from e

    def _aad(self, user_id: str) -> bytes:
        return _dek_context(user_id, self.region, self.key_id) + b"\x00" + self.id.encode()


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
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, raw, _dek_context(user_id, region, self.id))

    def unwrap(self, region: str, user_id: str, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], _dek_context(user_id, region, self.id)
            )
        except InvalidTag as e:
            raise SealError("a stored data key does not unwrap for this user and region") from e


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
        self.data_keys = KeyCache(cache_entries, cache_seconds)
        self._wrapping = KeyCache(1000, cache_seconds)
        self._active: WrappingKey | None = None
        self._region_key: RegionKey | None = None
        # Set when the region's key was shredded: why every open fails.
        self.shredded = ""

    @property
    def region_key(self) -> RegionKey:
        self.check()
        if self._region_key is None:
            self._region_key = RegionKey.load(self.region, self.dir, self.provider)
        return self._region_key

    def check(self) -> None:
        if self.shredded:
            raise KeyDestroyed(self.shredded)

    def shred(self, reason: str) -> None:
        """Forgets every key held in memory; from now on every open fails with `reason`."""
        self.shredded = reason
        self._region_key = None
        self._active = None
        self.data_keys = KeyCache(1, self.cache_seconds)
        self._wrapping = KeyCache(1, self.cache_seconds)

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
        wk = self._wrapping.get(id)
        if wk is None:
            raw = self.provider.unwrap(wrapped, WrappingKey.context(self.region, id))
            wk = WrappingKey(id, raw, wrapped, time.monotonic())
            self._wrapping.put(id, wk)
        return wk

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

    def rotated(self) -> None:
        """The provider has a new key version (or retired old ones): new data keys go under a
        new wrapping key, wrapped by the newest version."""
        self.provider.refresh()
        self._active = None

    def new_wrapping_key(self) -> WrappingKey:
        """A fresh wrapping key under the provider's newest version (rotation)."""
        self._active = None
        return self.active_wrapping_key()


class KeyCache:
    """Bounded by size and age, so that wrapping or unwrapping is not paid on every field."""

    def __init__(self, max_entries: int = 100_000, max_age: float = 600.0):
        self._items: OrderedDict[object, tuple[float, object]] = OrderedDict()
        self.max_entries = max_entries
        self.max_age = max_age

    def get(self, key: object):
        hit = self._items.get(key)
        if hit is None:
            return None
        born, value = hit
        if time.monotonic() - born > self.max_age:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: object, value: object) -> None:
        self._items[key] = (time.monotonic(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def drop(self, key: object) -> None:
        self._items.pop(key, None)


def hash_credential(secret: str) -> bytes:
    """scrypt (N=2^14, r=8, p=1, 16-byte salt): `b"scrypt$" + salt + hash`."""
    salt = os.urandom(16)
    return b"scrypt$" + salt + hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def verify_credential(secret: str, stored: bytes) -> bool:
    import hmac

    if not stored.startswith(b"scrypt$") or len(stored) != 7 + 16 + 32:
        return False
    salt, digest = stored[7:23], stored[23:]
    candidate = hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return hmac.compare_digest(candidate, digest)
