"""A node's transfer-log signing key on disk: `log.key` (the Ed25519 private key, wrapped by the
log key's provider, mode 0600) and `log.pub` (its verifier key, which reviewers pin).

The log key is wrapped by the node's own provider, but under a key of its own (`open_log_provider`):
local key files `log-kek-vN.key`, the Transit key `NAME-log`, the KMS alias `ALIAS-log`. A shred
destroys the region's key and nothing else, so after one the node still opens `log.key`
and goes on signing checkpoints that verify with the same `log.pub` (the log is what shows
reviewers the shred). Rotation rotates that key too and rewraps `log.key`; retire retires
its old versions. A `log.key` written raw (before it was wrapped) is wrapped in place the
first time a node opens it, and the node's log says so.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from residency.server.core.checkpoint import LogSigner
from residency.server.core.errors import KeyUnavailable
from residency.server.keys.files import write_private
from residency.server.keys.providers import KeyProvider, open_log_provider

KEY, PUB = "log.key", "log.pub"
# Second line of a wrapped `log.key`; a raw one has the key's base64 there instead.
_WRAPPED = "wrapped"

log = logging.getLogger("residency.keys")


def _context(name: str) -> dict[str, str]:
    return {"log": name, "purpose": "log-signing-key"}


def _write(path: Path, name: str, wrapped: bytes, *, exclusive: bool = False) -> None:
    b64 = base64.b64encode(wrapped).decode()
    write_private(path, f"{name}\n{_WRAPPED}\n{b64}\n".encode(), exclusive=exclusive)


def _read(path: Path) -> tuple[str, bytes | None, bytes]:
    """(name, raw key if the file holds it raw, else None, wrapped key or b"")."""
    try:
        parts = path.read_text().split()
        if len(parts) == 2:
            return parts[0], base64.b64decode(parts[1], validate=True), b""
        if len(parts) == 3 and parts[1] == _WRAPPED:
            return parts[0], None, base64.b64decode(parts[2], validate=True)
        raise ValueError("not a log key file")
    except (OSError, ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise KeyUnavailable(
            f"cannot load the log signing key {path}: {type(e).__name__}; "
            "`residency init` writes one (log.key beside region.key)"
        ) from e


def create_log_key(name: str, directory: str | Path, provider: KeyProvider) -> LogSigner:
    """Writes `log.key` (wrapped by `provider`, the log key's: `open_log_provider`; mode 0600)
    and `log.pub` into `directory`; returns the signer."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    _write(d / KEY, name, provider.wrap(raw, _context(name)), exclusive=True)
    signer = LogSigner(name, private)
    (d / PUB).write_text(signer.verifier_key + "\n")
    return signer


def load_log_key(path: str | Path, provider: KeyProvider) -> LogSigner:
    """The signer in `log.key`, unwrapped by `provider` (a raw file is read as it is)."""
    name, raw, wrapped = _read(Path(path))
    if raw is None:
        raw = provider.unwrap(wrapped, _context(name))
    try:
        return LogSigner(name, Ed25519PrivateKey.from_private_bytes(raw))
    except ValueError as e:
        raise KeyUnavailable(f"the log signing key {path} is not an Ed25519 key: {e}") from e


def open_log_key(path: Path, keys: Any) -> LogSigner:
    """The node's signer at start, through the log key's provider (`keys`: the node's
    `KeysConfig`), refused unless it is the key of `log.pub` beside it. A raw `log.key` is
    wrapped in place (once; the log says so)."""
    name, raw, _ = _read(path)
    # A node never creates a KMS key (its role should not hold kms:CreateKey): `residency init` does.
    provider = open_log_provider(keys, create=raw is not None and keys.provider != "aws-kms")
    try:
        signer = load_log_key(path, provider)
        pinned = path.with_name(PUB)
        if pinned.exists() and pinned.read_text().strip() != signer.verifier_key:
            raise KeyUnavailable(
                f"{path} is not the key of {pinned}, the verifier key reviewers pin: the node would "
                "sign checkpoints nobody can verify; put back the log.key that goes with it"
            )
        if raw is not None:
            _write(path, name, provider.wrap(raw, _context(name)))
            log.warning(
                "log signing key %s was stored raw: wrapped in place by the %s provider's log key "
                "(log.pub and every checkpoint are unchanged)",
                path,
                provider.name,
            )
        return signer
    finally:
        provider.close()


def rewrap_log_key(path: Path, provider: KeyProvider) -> None:
    """Rewraps `log.key` under `provider`'s newest key version (rotation)."""
    name, raw, wrapped = _read(path)
    context = _context(name)
    _write(path, name, provider.wrap(raw, context) if raw is not None else provider.rewrap(wrapped, context))
