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

from residency.server.core.errors import ConfigError
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

    def newest_version(self) -> str:
        """The name of the version new wraps go under ("" where the service names none)."""
        ...

    def version_of(self, wrapped: bytes) -> str:
        """The name of the version that wrapped `wrapped`, read from the material itself ("" where
        the service keeps every version for good, so that none is ever retired)."""
        ...

    def retire(self, keep: str = "") -> None:
        """Versions older than `keep` (default: the newest) stop unwrapping (after everything
        was rewrapped). A version made since the caller read `keep` stays."""
        ...

    def refresh(self) -> None:
        """Picks up versions another process created or retired (a no-op for server-side keys)."""
        ...

    def destroy(self) -> None:
        """Destroys the key, every version: everything it wrapped becomes unreadable."""
        ...

    def ping(self) -> None:
        """Raises as a wrap would if the key service cannot be used now (readiness)."""
        ...

    def close(self) -> None: ...


def open_provider(config: Any) -> KeyProvider:
    """The provider a node's `keys:` config names (`residency.server.config.keys.KeysConfig`),
    its calls measured (`measured.Measured`: latency and errors as metrics)."""
    from residency.server.keys.providers.measured import Measured

    return Measured(_open(config))


def _open(config: Any) -> KeyProvider:
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


# What the log key's own key is called, after the region's key (see `open_log_provider`).
LOG_SUFFIX = "-log"


def open_log_provider(config: Any, create: bool = False) -> KeyProvider:
    """The provider of the node's log signing key: the node's own, with a key of its own that
    a shred of the region's key leaves alone (local: key files `DIR/log-kek-vN.key`; OpenBao: the
    Transit key `TRANSIT_KEY-log`; AWS KMS: `log_kms_key_id`, by default the alias `ALIAS-log`).
    `create` makes that key when it is not there yet (`residency init`, and a node wrapping a raw
    `log.key`); a KMS key is made only by `residency init`, and only for the default alias."""
    if config.provider == "local":
        from residency.server.keys.providers.local import LocalProvider

        prefix = "log-kek"
        if create:
            return LocalProvider.create(config.dir, config.passphrase, prefix)
        return LocalProvider(config.dir, config.passphrase, prefix)
    if config.provider == "aws-kms":
        from residency.server.keys.providers.kms import AwsKmsProvider

        key = config.log_kms_key_id
        if key is None and not config.kms_key_id.startswith("alias/"):
            raise ConfigError(
                f"'keys.kms_key_id' {config.kms_key_id!r} is not an alias: set 'keys.log_kms_key_id' "
                "to the KMS key that wraps the log signing key (a key of its own, which a shred of "
                "the region's key leaves alone)"
            )
        kms = AwsKmsProvider(key or config.kms_key_id + LOG_SUFFIX, config.aws_region, config.endpoint_url)
        if create and key is None:
            kms.ensure_key()
        return kms
    if config.provider == "openbao":
        from residency.server.keys.providers.openbao import OpenBaoProvider

        bao = OpenBaoProvider(config.address, config.token, config.transit_key + LOG_SUFFIX, config.mount)
        if create:
            bao.ensure_key()
        return bao
    raise ValueError(f"unknown key provider {config.provider!r}")
