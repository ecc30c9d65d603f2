"""Signed checkpoints of the transfer log: C2SP tlog-checkpoint bodies in C2SP signed notes.

A checkpoint body is three lines: the origin (e.g. `residency/cn-north`), the tree size in
decimal and the base64 root hash. The note appends a blank line and one signature line,
`\u2014 NAME BASE64(key hash[4] || Ed25519 signature)`, where the key hash is the first four
bytes of SHA-256(NAME || "\\n" || 0x01 || public key). The verifier key is published as
`NAME+HEXKEYHASH+BASE64(0x01 || public key)`. Pure: where a node keeps its signing key is
`residency.server.keys.logkey`'s business.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from residency.server.core.errors import ResidencyError

_ED25519 = b"\x01"  # the signed-note signature type of Ed25519
_DASH = "\u2014 "
_RAW = serialization.Encoding.Raw


class CheckpointError(ResidencyError):
    """A checkpoint is malformed or its signature does not verify with the given key."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> bytes:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()


def _key_hash(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public).digest()[:4]


def _check_name(name: str) -> str:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise CheckpointError(f"a key name must be non-empty, without '+' or spaces; got {name!r}")
    return name


class LogSigner:
    """A node's log signing key: signs checkpoints, tells its verifier key."""

    def __init__(self, name: str, private: Ed25519PrivateKey):
        self.name = _check_name(name)
        self._private = private
        self._public = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)

    @classmethod
    def new(cls, name: str) -> LogSigner:
        """A fresh signing key (`residency.server.keys.logkey` keeps a node's on disk)."""
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_signer_key(cls, text: str) -> LogSigner:
        """A signer from a signed-note signer key, `PRIVATE+KEY+NAME+HEXKEYHASH+BASE64(0x01 ||
        seed)`, the form Go's `sumdb/note` writes (so keys move between the two)."""
        try:
            prefix, key, name, hexhash, b64 = text.strip().split("+", 4)
            raw = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error) as e:
            raise CheckpointError("a signer key is PRIVATE+KEY+NAME+HEXKEYHASH+BASE64KEY") from e
        if (prefix, key) != ("PRIVATE", "KEY") or raw[:1] != _ED25519 or len(raw) != 33:
            raise CheckpointError("the signer key is not an Ed25519 note signer key")
        signer = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if _key_hash(name, signer._public).hex() != hexhash:
            raise CheckpointError("the signer key's hash does not match its name and key")
        return signer

    @property
    def verifier_key(self) -> str:
        return verifier_key(self.name, self._public)

    def sign_text(self, text: str) -> str:
        """A signed note of any text that ends in a newline: text, blank line, signature."""
        if not text.endswith("\n") or "\n\n" in text:
            raise CheckpointError("a note's text ends in one newline and has no blank line")
        sig = _key_hash(self.name, self._public) + self._private.sign(text.encode())
        return f"{text}\n{_DASH}{self.name} {base64.b64encode(sig).decode()}\n"

    def sign(self, checkpoint: Checkpoint) -> str:
        """The signed checkpoint: body, blank line, signature line."""
        return self.sign_text(checkpoint.body().decode())


def verifier_key(name: str, public: bytes) -> str:
    _check_name(name)
    return f"{name}+{_key_hash(name, public).hex()}+{base64.b64encode(_ED25519 + public).decode()}"


def parse_verifier_key(text: str) -> tuple[str, bytes, Ed25519PublicKey]:
    """(name, key hash, public key) of a `name+hexkeyhash+base64` verifier key."""
    try:
        # The base64 key may itself contain '+': split off the name and hash only.
        name, hexhash, b64 = text.strip().split("+", 2)
        raw = base64.b64decode(b64, validate=True)
        keyhash = bytes.fromhex(hexhash)
    except (ValueError, binascii.Error) as e:
        raise CheckpointError("the verifier key is not NAME+HEXKEYHASH+BASE64KEY") from e
    if raw[:1] != _ED25519 or len(raw) != 33:
        raise CheckpointError("the verifier key is not an Ed25519 note key")
    if _key_hash(name, raw[1:]) != keyhash:
        raise CheckpointError("the verifier key's hash does not match its name and key")
    return name, keyhash, Ed25519PublicKey.from_public_bytes(raw[1:])


def fingerprint(key: str) -> str:
    """What a reviewer compares out of band to know a verifier key is the log's: SHA-256 of
    the typed public key, as `sha256:HEX`."""
    _, _, public = parse_verifier_key(key)
    raw = _ED25519 + public.public_bytes(_RAW, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def verify_note(note: str, key: str) -> str:
    """Verifies a signed note (C2SP signed-note, Go's `sumdb/note`) with a verifier key and
    returns its text. Signatures by other keys (cosignatures) are passed over.

    Raises CheckpointError when the note is malformed, carries no signature by that key, or
    a signature by that key does not verify (a forged or altered note)."""
    name, keyhash, public = parse_verifier_key(key)
    body, sep, sigs = note.partition("\n\n")
    if not sep or not body:
        raise CheckpointError("a signed note is a body, a blank line and signature lines")
    body_bytes = (body + "\n").encode()
    signed = False
    for line in sigs.splitlines():
        if not line.startswith(_DASH):
            raise CheckpointError(f"not a signature line: {line[:40]!r}")
        who, _, b64 = line[len(_DASH) :].rpartition(" ")
        try:
            sig = base64.b64decode(b64, validate=True)
        except binascii.Error as e:
            raise CheckpointError("a signature line is not base64") from e
        if who != name or sig[:4] != keyhash:
            continue  # a cosignature by someone else; not ours to judge
        try:
            public.verify(sig[4:], body_bytes)
        except InvalidSignature as e:
            raise CheckpointError(
                f"the checkpoint's signature by {name} does not verify: it was forged or altered"
            ) from e
        signed = True
    if not signed:
        raise CheckpointError(f"the checkpoint carries no signature by {name}")
    return body + "\n"


def open_note(note: str, key: str) -> Checkpoint:
    """Verifies a signed checkpoint with a verifier key and returns what it commits to."""
    body = verify_note(note, key).rstrip("\n")
    lines = body.split("\n")
    try:
        origin, size, root = lines[0], int(lines[1]), base64.b64decode(lines[2], validate=True)
    except (IndexError, ValueError, binascii.Error) as e:
        raise CheckpointError("the checkpoint body is not origin, tree size and root hash") from e
    if len(root) != 32 or size < 0:
        raise CheckpointError("the checkpoint's root hash is not 32 bytes or its size is negative")
    return Checkpoint(origin, size, root)
