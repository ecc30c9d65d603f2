"""What the home region signs: the canonical bytes of a replicated copy and of a batch's
high-water mark, and the check of an Ed25519 signature over them. Pure: no keys on disk.

The bytes are not protobuf's wire encoding, which no implementation promises to reproduce
(field order, map order and unknown fields vary): they are defined over field numbers and
values, so a region node or an affiliate in any language recomputes them from the message
it parsed. Every field the message's schema has is covered, including fields added later;
a message holding fields the reader's schema lacks is refused, since they could not be
checked. The encoding (docs/services.md, "The copy format"):

    message  = for each set field, by field number: number (4 bytes) || value
    value    = bytes, string (UTF-8): length (4 bytes) || bytes
               bool: 1 byte; unsigned integers: 8 bytes; signed integers, enums: 8 bytes
               two's complement; double, float: 8 bytes IEEE 754 (all big-endian)
               message: length (4 bytes) || its encoding
               repeated: count (4 bytes) || each value, in order
               map: count (4 bytes) || key value || value value, by the key's value bytes
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from residency.server.core.sealing import length_prefixed

COPY_CONTEXT = b"residency/copy/v2"
HIGH_WATER_CONTEXT = b"residency/high-water/v1"
# The field of each signed message that holds the signature (left out of its signed bytes).
SIGNATURE_FIELD = {"residency.v1.SealedCopy": 16, "residency.v1.HighWater": 6}

_T = FieldDescriptor
_UNSIGNED = {_T.TYPE_UINT32, _T.TYPE_UINT64, _T.TYPE_FIXED32, _T.TYPE_FIXED64}
_SIGNED = {
    _T.TYPE_INT32,
    _T.TYPE_INT64,
    _T.TYPE_SINT32,
    _T.TYPE_SINT64,
    _T.TYPE_SFIXED32,
    _T.TYPE_SFIXED64,
    _T.TYPE_ENUM,
}


class UnknownFields(ValueError):
    """The message holds fields this reader's schema does not define: it cannot be checked."""


def key_id(public_raw: bytes) -> str:
    """A signing key's id: the first 16 hex digits of SHA-256 of its raw 32-byte public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def canonical(message: Message, leave_out: int = 0) -> bytes:
    """The canonical encoding of `message` (the module's docstring), without field `leave_out`."""
    if len(UnknownFieldSet(message)):
        raise UnknownFields(f"{message.DESCRIPTOR.full_name} holds fields this node does not know")
    out = []
    for fd, value in message.ListFields():
        number = fd.number
        if number != leave_out:
            encode = _ENCODERS.get(fd)
            if encode is None:
                encode = _ENCODERS[fd] = _encoder(fd)
            out.append(_NUMBERS[number] if number < 256 else number.to_bytes(4, "big"))
            out.append(encode(value))
    return b"".join(out)


# Each field's encoder, made once from its descriptor (walking the descriptor for every value
# made this the most costly step of shipping a copy).
_ENCODERS: dict[FieldDescriptor, Callable[[Any], bytes]] = {}
_NUMBERS = [n.to_bytes(4, "big") for n in range(256)]


def _encoder(fd: FieldDescriptor) -> Callable[[Any], bytes]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        if key_fd.type == _T.TYPE_STRING and value_fd.type in (_T.TYPE_STRING, _T.TYPE_BYTES):
            # The maps of a copy's names (sealed fields, categories), spelt out: the generic
            # form below makes two calls an entry.
            text = value_fd.type == _T.TYPE_STRING

            def names(m: Any) -> bytes:
                pairs = []
                for k, v in m.items():
                    kb = k.encode()
                    vb = v.encode() if text else v
                    pairs.append((len(kb).to_bytes(4, "big") + kb, len(vb).to_bytes(4, "big") + vb))
                pairs.sort()
                return len(pairs).to_bytes(4, "big") + b"".join([k + v for k, v in pairs])

            return names
        key = _one(key_fd)
        value = _remembered() if value_fd.message_type is not None else _one(value_fd)

        def entries(m: Any) -> bytes:
            pairs = sorted([(key(k), value(v)) for k, v in m.items()])
            return len(pairs).to_bytes(4, "big") + b"".join([k + v for k, v in pairs])

        return entries
    one = _one(fd)
    if fd.is_repeated:
        return lambda vs: len(vs).to_bytes(4, "big") + b"".join([one(v) for v in vs])
    return one


def _one(fd: FieldDescriptor) -> Callable[[Any], bytes]:
    t = fd.type
    if t == _T.TYPE_MESSAGE or t == _T.TYPE_GROUP:
        return lambda v: _prefixed(canonical(v))
    if t == _T.TYPE_STRING:
        return lambda v: _prefixed(v.encode())
    if t == _T.TYPE_BYTES:
        return lambda v: _prefixed(bytes(v))
    if t == _T.TYPE_BOOL:
        return lambda v: b"\x01" if v else b"\x00"
    if t in _UNSIGNED:
        return lambda v: int(v).to_bytes(8, "big")
    if t in _SIGNED:
        return lambda v: int(v).to_bytes(8, "big", signed=True)
    return lambda v: struct.pack(">d", float(v))  # double, float


def _remembered() -> Callable[[Any], bytes]:
    """The encoder of a map's message values, remembering each small value's encoding by its
    serialized bytes: a copy's field policies are mostly the same from copy to copy. Equal
    bytes of one message type hold equal fields, so they encode alike; bytes that hold
    unknown fields are refused by `canonical` and never remembered. Only values of up to
    1 KiB are remembered (a policy is about 100 bytes), so that what a caller sends before
    any signature is checked can hold at most 4096 such entries in memory."""
    seen: dict[bytes, bytes] = {}

    def encode(v: Message) -> bytes:
        wire = v.SerializePartialToString()
        out = seen.get(wire)
        if out is None:
            out = _prefixed(canonical(v))
            if len(wire) <= 1024:
                if len(seen) >= 4096:
                    seen.clear()
                seen[wire] = out
        return out

    return encode


def _prefixed(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def signed_bytes(message: Message) -> bytes:
    """The bytes the home signs for a SealedCopy or a HighWater: its context, length-prefixed,
    then its canonical encoding without the signature."""
    name = message.DESCRIPTOR.full_name
    context = COPY_CONTEXT if name == "residency.v1.SealedCopy" else HIGH_WATER_CONTEXT
    return length_prefixed(context) + canonical(message, SIGNATURE_FIELD[name])


def copy_digest(copy: Message) -> bytes:
    """What a high-water mark's `copy_digests` list of a copy it vouches for (as homes did
    before `copy_hashes`): SHA-256 of its signed bytes."""
    return hashlib.sha256(signed_bytes(copy)).digest()


def copy_bytes(copy: Message) -> bytes:
    """A copy as a home sends it to a region node: its deterministic serialization, the same
    bytes each time it is asked for (the mark's hash, then the request)."""
    sent: bytes = copy.SerializeToString(deterministic=True)
    return sent


def copy_hash(sent: bytes) -> bytes:
    """What a high-water mark's `copy_hashes` list of a copy it vouches for: SHA-256 of the
    copy's bytes exactly as sent."""
    return hashlib.sha256(sent).digest()


@functools.lru_cache(maxsize=64)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verifies(public_raw: bytes, message: Message) -> bool:
    """Whether `message`'s signature is the key's over its signed bytes (False when it holds
    fields this node does not know, or no signature)."""
    signature = getattr(message, "signature", b"")
    if not signature:
        return False
    try:
        _public_key(public_raw).verify(signature, signed_bytes(message))
    except (InvalidSignature, UnknownFields, ValueError):
        return False
    return True
