"""A node's transfer-log signing key on disk: `log.key` (the Ed25519 private key, mode 0600)
and `log.pub` (its verifier key, for reviewers) in the region's key folder."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from residency.server.core.checkpoint import LogSigner
from residency.server.core.errors import KeyUnavailable
from residency.server.keys.files import write_private

KEY, PUB = "log.key", "log.pub"


def create_log_key(name: str, directory: str | Path) -> LogSigner:
    """Writes `log.key` (mode 0600) and `log.pub` into `directory`; returns the signer."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    write_private(d / KEY, f"{name}\n{base64.b64encode(raw).decode()}\n".encode(), exclusive=True)
    signer = LogSigner(name, private)
    (d / PUB).write_text(signer.verifier_key + "\n")
    return signer


def load_log_key(path: str | Path) -> LogSigner:
    try:
        name, b64 = Path(path).read_text().split()
        return LogSigner(name, Ed25519PrivateKey.from_private_bytes(base64.b64decode(b64, validate=True)))
    except (OSError, ValueError, binascii.Error) as e:
        raise KeyUnavailable(
            f"cannot load the log signing key {path}: {type(e).__name__}; "
            "`residency init` writes one (log.key beside region.key)"
        ) from e
