"""Sealing values: the associated data and contexts every sealed value and wrapped key is
bound to, and the data key (DEK) that seals field values with AES-256-GCM.

The associated data binds user, field, region, record version and key id, so a sealed value
moved to another record, field, region or version fails to open. Copy format 2 writes it as
length-prefixed components, which no choice of ids can make two tuples share; format 1 (NUL-
joined) is kept to open copies written before it. Keys themselves (region
keys, wrapping keys, providers) live in `residency.server.keys`; this module is computation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from residency.server.core.errors import FailedPrecondition

NONCE = 12
# The format of the copies this version writes (`SealedCopy.format`); 0 and 1 are the NUL-joined
# associated data of copies written before it.
COPY_FORMAT = 2
# The most copies one batch holds: what a worker sends at most (`replicator.batch_size`), and
# what a region node takes in one `ApplyCopies` (or its high-water mark lists).
MAX_BATCH = 1000
# An encryption context, bound into every key a provider wraps (user, region, purpose...).
Context = Mapping[str, str]


class SealError(FailedPrecondition):
    """A sealed value or wrapped key did not open: wrong key, or moved to another context."""


class KeyDestroyed(SealError):
    """The key that wrapped this material was destroyed (crypto-shredded) or retired."""


def canonical_context(context: Context) -> bytes:
    """The bytes a provider binds for `context`: the same for any order of its keys."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


def dek_context(user_id: str, region: str, key_id: str) -> bytes:
    """What a wrapped DEK of `user_id`'s copy in `region` is bound to (with its wrapping key)."""
    return b"residency/dek/v1\x00" + "\x00".join((user_id, region, key_id)).encode()


def transit_context(region: str, key_id: str, transit_id: str) -> bytes:
    """What a transit key sent to `region` is bound to (HPKE `info`)."""
    return b"residency/transit-key/v1\x00" + "\x00".join((region, key_id, transit_id)).encode()


def length_prefixed(*parts: bytes) -> bytes:
    """Each part preceded by its length (4 bytes, big-endian): one way only to split it again."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def field_aad(user_id: str, field: str, region: str, version: int, key_id: str, *, format: int) -> bytes:
    """Associated data of one sealed field of a replicated copy of `format` (`SealedCopy.format`):
    format 2, "residency/field/v2" and the components, each length-prefixed (UTF-8, the version
    in decimal); before it (0 or 1), "field" and the components joined by NUL bytes."""
    parts = (user_id, field, region, str(version), key_id)
    if format == 2:
        return length_prefixed(b"residency/field/v2", *(p.encode() for p in parts))
    if format in (0, 1):
        return "\x00".join(("field", *parts)).encode()
    raise SealError(f"copy format {format} is unknown to this node (it knows 0 to {COPY_FORMAT})")


def field_aads(
    user_id: str, region: str, version: int, key_id: str, *, format: int
) -> Callable[[str], bytes]:
    """`field_aad` of one copy's fields, all but the field name fixed: the same bytes, with
    the components every field shares encoded once."""
    if format != 2:
        return lambda field: field_aad(user_id, field, region, version, key_id, format=format)
    head = length_prefixed(b"residency/field/v2", user_id.encode())
    tail = length_prefixed(region.encode(), str(version).encode(), key_id.encode())
    return lambda field: head + length_prefixed(field.encode()) + tail


def record_aad(user_id: str, region: str, version: int, key_id: str) -> bytes:
    """Associated data of a home record sealed at rest as one unit (its field names are
    inside the authenticated plaintext)."""
    return "\x00".join(("record", user_id, region, str(version), key_id)).encode()


class DataKey:
    """An unwrapped data key; seals and opens the field values of one (user, region) copy."""

    __slots__ = ("_aead", "_mark", "raw")

    def __init__(self, raw: bytes):
        self._aead = AESGCM(raw)
        # Read by `residency.server.keys` alone: to wrap a new key and to rewrap one on
        # rotation. Nothing else handles a data key's bytes.
        self.raw = raw
        self._mark = b""

    @property
    def mark(self) -> bytes:
        """A one-way mark of this key (a hash, not the key): two opens under the same key give
        the same mark, so a cache can tell a user's new key from the one it knew (an erased
        user written again) without keeping the key."""
        if not self._mark:
            self._mark = hashlib.sha256(b"residency data key mark\x00" + self.raw).digest()[:16]
        return self._mark

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], aad)
        except InvalidTag as e:
            raise SealError("a sealed value does not open under its record's data key and context") from e
