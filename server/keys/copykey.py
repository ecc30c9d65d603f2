"""The home region's copy-signing key on disk: `copy.key` (the Ed25519 private key, mode 0600)
and `copy.pub` (its raw 32-byte public key, for region nodes and affiliates) in the region's
key folder; the signer the replicator signs copies and high-water marks with."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from residency.server.core import codec
from residency.server.core.errors import KeyUnavailable
from residency.server.core.signed import copy_bytes, copy_hash, key_id, signed_bytes
from residency.server.keys.files import write_private
from residency.v1 import replica_pb2

KEY, PUB = "copy.key", "copy.pub"


class CopySigner:
    """Signs the copies a home region sends, and each batch's high-water mark."""

    def __init__(self, region: str, private: Ed25519PrivateKey):
        self.region = region
        self._private = private
        self.public_raw = private.public_key().public_bytes_raw()
        self.key_id = key_id(self.public_raw)

    def stamp(self, copy: replica_pb2.SealedCopy, destination: str) -> replica_pb2.SealedCopy:
        """`copy`, stamped with its destination and this key's id, unsigned: for a batch whose
        high-water mark vouches for it (`high_water(vouched=...)`); the last change made to it."""
        copy.region, copy.signing_key_id = destination, self.key_id
        copy.ClearField("signature")
        return copy

    def sign_copy(self, copy: replica_pb2.SealedCopy, destination: str) -> replica_pb2.SealedCopy:
        """`copy`, stamped, then signed: the last change made to it, so every field set before
        is covered."""
        self.stamp(copy, destination)
        copy.signature = self._private.sign(signed_bytes(copy))
        return copy

    def high_water(
        self,
        destination: str,
        version: int,
        lease_epoch: int = 0,
        vouched: Iterable[replica_pb2.SealedCopy] = (),
    ) -> replica_pb2.HighWater:
        """The signed statement that this home had issued no record version above `version`,
        for a batch shipped under the sending worker's lease epoch `lease_epoch`, vouching for
        the `vouched` copies (stamped, unsigned) by the hashes of their bytes as sent."""
        mark = replica_pb2.HighWater(
            home_region=self.region,
            region=destination,
            version=version,
            issued_at=codec.timestamp(time.time()),
            signing_key_id=self.key_id,
            lease_epoch=lease_epoch,
            copy_hashes=[copy_hash(copy_bytes(c)) for c in vouched],
        )
        mark.signature = self._private.sign(signed_bytes(mark))
        return mark


def create_copy_key(region: str, directory: str | Path) -> CopySigner:
    """Writes `copy.key` (mode 0600) and `copy.pub` into `directory`; returns the signer."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    write_private(d / KEY, base64.b64encode(private.private_bytes_raw()) + b"\n", exclusive=True)
    signer = CopySigner(region, private)
    (d / PUB).write_bytes(signer.public_raw)
    return signer


def load_copy_key(region: str, path: str | Path) -> CopySigner:
    try:
        raw = base64.b64decode(Path(path).read_bytes().strip(), validate=True)
        return CopySigner(region, Ed25519PrivateKey.from_private_bytes(raw))
    except (OSError, ValueError, binascii.Error) as e:
        raise KeyUnavailable(
            f"cannot load the copy-signing key {path}: {type(e).__name__}; "
            "`residency init` writes one (copy.key beside region.key)"
        ) from e


def load_home_key(path: str | Path) -> bytes:
    """The raw public key a region node checks its home's copies with (a `copy.pub`)."""
    try:
        raw = Path(path).read_bytes()
        Ed25519PublicKey.from_public_bytes(raw)
        return raw
    except (OSError, ValueError) as e:
        raise KeyUnavailable(
            f"cannot load the home's copy-signing public key {path}: {type(e).__name__}; "
            "it is the home region's copy.pub, 32 bytes"
        ) from e
