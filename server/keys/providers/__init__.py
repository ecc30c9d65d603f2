"""Key providers: where a region's key-encryption keys live and how they wrap data keys.

One small interface, `KeyProvider`, with three implementations: `local` (key files on disk,
themselves encrypted under a passphrase-derived key), `aws-kms` (AWS KMS through boto3) and
`openbao` (OpenBao / Vault Transit over HTTP). A provider never sees field values: it wraps
and unwraps key material only, and every wrap binds an encryption context (user, region,
purpose) so wrapped material moved to another context does not unwrap.

A provider that cannot be reached raises `KeyUnavailable` (UNAVAILABLE); wrapped material
that does not unwrap, or a destroyed key, raises `SealError` / `KeyDestroyed`
(FAILED_PRECONDITION, both in `residency.server.core.sealing`). Nothing falls back to
another key.
"""

from __future__ import annotations

from typing import Any, Protocol

from residency.server.core.sealing import Context


class KeyProvider(Protocol):
    """What every provider offers. `new_data_key` returns (plaintext, wrapped)."""

    name: str

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]: ...
    def wrap(self, plaintext: bytes, context: Context) -> bytes: ...
    def unwrap(self, wrapped: bytes, context: Context) -> bytes: ...
    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        """The same plaintext wrapped under the provider's newest key version."""
        ...

    def rotate(self) -> str:
        """Creates a new key version for new wraps; returns its name. Old versions still unwrap."""
        ...

    def retire(self) -> None:
        """Old versions stop unwrapping (after everything was rewrapped)."""
        ...

    def refresh(self) -> None:
        """Picks up versions another process created or retired (a no-op for server-side keys)."""
        ...

    def destroy(self) -> None:
        """Destroys the key, every version: everything it wrapped becomes unreadable."""
        ...

    def close(self) -> None: ...


def open_provider(config: Any) -> KeyProvider:
    """The provider a node's `keys:` config names (`residency.server.config.keys.KeysConfig`)."""
    # Each provider's client library is imported only by the nodes that use it.
    if config.provider == "local":
        from residency.server.keys.providers.local import LocalProvider

        return LocalProvider(config.dir, config.passphrase)
    if config.provider == "aws-kms":
        from residency.server.keys.providers.kms import AwsKmsProvider

        return AwsKmsProvider(config.kms_key_id, config.aws_region, config.endpoint_url)
    if config.provider == "openbao":
        from residency.server.keys.providers.openbao import OpenBaoProvider

        return OpenBaoProvider(config.address, config.token, config.transit_key, config.mount)
    raise ValueError(f"unknown key provider {config.provider!r}")
