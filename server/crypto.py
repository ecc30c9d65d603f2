"""Region keys, data keys and sealing. Raw key bytes never leave this module.

Each region has one X25519 key pair, its *region key*. Data keys (DEKs, AES-256) seal field
values with AES-256-GCM; the associated data binds user, field, region, record version and
key id, so a sealed value moved to another record, field, region or version fails to open.
A DEK travels wrapped for its destination region with HPKE (RFC 9180, X25519, HKDF-SHA256,
AES-256-GCM), so the primary can seal for a region but cannot open what it sent there. A
node's own records are sealed under DEKs wrapped by a key-encryption key derived from its
own region key.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.errors import FailedPrecondition, KeyUnavailable

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_NONCE = 12
_RAW = serialization.Encoding.Raw


class SealError(FailedPrecondition):
    """A sealed value or wrapped key did not open: wrong key, or moved to another context."""


def _key_id(public: X25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes(_RAW, serialization.PublicFormat.Raw)).hexdigest()[:16]


def _dek_context(user_id: str, region: str, key_id: str) -> bytes:
    return b"residency/dek/v1\x00" + "\x00".join((user_id, region, key_id)).encode()


def field_aad(user_id: str, field: str, region: str, version: int, key_id: str) -> bytes:
    """Associated data of one sealed field of a replicated copy."""
    return "\x00".join(("field", user_id, field, region, str(version), key_id)).encode()


def record_aad(user_id: str, region: str, version: int, key_id: str) -> bytes:
    """Associated data of a home record sealed at rest as one unit (its field names are
    inside the authenticated plaintext)."""
    return "\x00".join(("record", user_id, region, str(version), key_id)).encode()


class DataKey:
    """An unwrapped data key; seals and opens the field values of one (user, region) copy."""

    __slots__ = ("_aead",)

    def __init__(self, raw: bytes):
        self._aead = AESGCM(raw)

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
    """The public half of another region's key: enough to seal for it, not to open."""

    region: str
    public: X25519PublicKey

    @property
    def key_id(self) -> str:
        return _key_id(self.public)

    def new_data_key(self, user_id: str) -> tuple[DataKey, bytes]:
        """A fresh DEK for `user_id`'s copy in this region, and that DEK wrapped for it."""
        raw = AESGCM.generate_key(bit_length=256)
        wrapped = _SUITE.encrypt(raw, self.public, info=_dek_context(user_id, self.region, self.key_id))
        return DataKey(raw), wrapped

    @classmethod
    def load(cls, region: str, path: str | Path) -> RecipientKey:
        try:
            raw = Path(path).read_bytes()
            return cls(region, X25519PublicKey.from_public_bytes(raw))
        except (OSError, ValueError) as e:
            raise KeyUnavailable(f"public key of region {region} at {path} cannot be read: {e}") from e


class RegionKey:
    """A node's own region key. Opens copies sealed for this region and seals its own records."""

    def __init__(self, region: str, private: X25519PrivateKey):
        self.region = region
        self._private = private
        self.recipient = RecipientKey(region, private.public_key())
        self.key_id = self.recipient.key_id
        secret = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        kek = HKDF(hashes.SHA256(), 32, salt=None, info=b"residency/at-rest-kek/v1").derive(secret)
        self._kek = AESGCM(kek)

    @classmethod
    def generate(cls, region: str, directory: str | Path) -> RegionKey:
        """Creates a region key in `directory` (`region.key`, mode 0600, and `region.pub`)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        private = X25519PrivateKey.generate()
        secret = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        fd = os.open(d / "region.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        (d / "region.pub").write_bytes(
            private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        )
        return cls(region, private)

    @classmethod
    def load(cls, region: str, directory: str | Path) -> RegionKey:
        path = Path(directory) / "region.key"
        try:
            return cls(region, X25519PrivateKey.from_private_bytes(path.read_bytes()))
        except (OSError, ValueError) as e:
            raise KeyUnavailable(f"region key of {region} at {path} cannot be read: {e}") from e

    def open_data_key(self, user_id: str, key_id: str, wrapped: bytes) -> DataKey:
        """Unwraps a DEK that was wrapped for this region (a replicated copy's)."""
        if key_id != self.key_id:
            raise SealError(f"copy was sealed for key {key_id}, this region holds {self.key_id}")
        try:
            raw = _SUITE.decrypt(wrapped, self._private, info=_dek_context(user_id, self.region, key_id))
        except Exception as e:  # hpke raises InvalidTag or ValueError on any mismatch
            raise SealError("the data key does not unwrap for this user and region") from e
        return DataKey(raw)

    def new_local_data_key(self, user_id: str) -> tuple[DataKey, bytes]:
        """A fresh DEK for this node's own record of `user_id`, wrapped at rest."""
        raw = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        wrapped = nonce + self._kek.encrypt(nonce, raw, _dek_context(user_id, self.region, self.key_id))
        return DataKey(raw), wrapped

    def open_local_data_key(self, user_id: str, wrapped: bytes) -> DataKey:
        try:
            raw = self._kek.decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], _dek_context(user_id, self.region, self.key_id)
            )
        except InvalidTag as e:
            raise SealError("a stored data key does not unwrap under this region's key") from e
        return DataKey(raw)


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

    salt, digest = stored[7:23], stored[23:]
    candidate = hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return hmac.compare_digest(candidate, digest)
