"""Region keys: each region's HPKE key pair (X25519, or hybrid ML-KEM-768 + X25519), the
public half others seal for (`RecipientKey`), and the transit keys that carry data keys to it.

A DEK travels wrapped for its destination region under a *transit key*: an AES-256 key the
primary makes per destination every few minutes and wraps once with HPKE (RFC 9180) to the
region's public key, so the primary can seal for a region but cannot open what it sent there
once it forgets the transit key, and one HPKE operation (about 85 µs) serves every copy of
those minutes instead of one per user. The region key's private half is stored wrapped by the
region's key provider (`residency.server.keys.providers`), so it is useless without that
region's provider. Raw key bytes never leave this package.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from residency.server.core.errors import KeyUnavailable
from residency.server.core.sealing import (
    NONCE,
    DataKey,
    KeyDestroyed,
    SealError,
    dek_context,
    transit_context,
)
from residency.server.keys.cache import KeyCache
from residency.server.keys.files import write_private
from residency.server.keys.providers import KeyProvider

_SUITES = {
    "x25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "mlkem768-x25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
_X25519_PUB, _MLKEM768_PUB, _MLKEM_SEED = 32, 1184, 64


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _kem_of_public(raw: bytes) -> str:
    return "x25519" if len(raw) == _X25519_PUB else "mlkem768-x25519"


def _public_key(raw: bytes) -> Any:
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


def _private_key(raw: bytes) -> tuple[Any, bytes]:
    """(private key, raw public bytes) from raw private bytes (X25519: 32; hybrid: seed + 32)."""
    if len(raw) == 32:
        k = X25519PrivateKey.from_private_bytes(raw)
        return k, k.public_key().public_bytes_raw()
    m = MLKEM768PrivateKey.from_seed_bytes(raw[:_MLKEM_SEED])
    x = X25519PrivateKey.from_private_bytes(raw[_MLKEM_SEED:])
    return hpke.MLKEM768X25519PrivateKey(
        m, x
    ), m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()


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
            raw, _public_key(self.public_raw), info=dek_context(user_id, self.region, self.key_id)
        )
        return DataKey(raw), wrapped

    def new_transit_key(self) -> TransitKey:
        """A fresh transit key for this region, wrapped for it with HPKE."""
        id = os.urandom(8).hex()
        raw = AESGCM.generate_key(bit_length=256)
        wrapped = _SUITES[self.kem].encrypt(
            raw, _public_key(self.public_raw), info=transit_context(self.region, self.key_id, id)
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
        write_private(d / "region.key", provider.wrap(raw, _private_context(region)), exclusive=True)
        (d / "region.pub").write_bytes(key.recipient.public_raw)
        return key

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
        path = Path(directory) / "region.key"
        write_private(path, provider.rewrap(path.read_bytes(), _private_context(region)))

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
            raw = self._suite.decrypt(wrapped, self._private, info=dek_context(user_id, self.region, key_id))
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
                    wrapped, self._private, info=transit_context(self.region, key_id, transit_key_id)
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
        nonce = os.urandom(NONCE)
        return DataKey(raw), nonce + self._aead.encrypt(nonce, raw, self._aad(user_id))

    def unwrap(self, user_id: str, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:NONCE], wrapped[NONCE:], self._aad(user_id))
        except InvalidTag as e:
            raise SealError("the data key does not unwrap for this user and region") from e

    def _aad(self, user_id: str) -> bytes:
        return dek_context(user_id, self.region, self.key_id) + b"\x00" + self.id.encode()
