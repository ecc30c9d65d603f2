"""`keys:` of a node config: the file's model for each key provider, and the typed object the
node opens its provider with (secrets read once, at start)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Tag

from residency.server.config.errors import FileModel, tagged_by
from residency.server.core.errors import ConfigError

RelativePath = Annotated[str, Field(min_length=1)]


class _Keys(FileModel):
    """What `keys:` holds whatever the provider."""

    dir: RelativePath = Field(description="the folder holding region.key and region.pub")
    kem: Literal["x25519", "mlkem768-x25519"] = "x25519"
    cache_entries: int = Field(default=100_000, gt=0, description="a positive number of data keys cached")
    cache_seconds: float = Field(
        default=300.0, gt=0, description="a positive number of seconds a data key is cached"
    )


class LocalKeysFile(_Keys):
    """Keys on disk, protected at rest by a passphrase read from a file or the environment."""

    # One of the two is required: the loader reads the secret from it, and says so when neither is given.
    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["passphrase_file"]}, {"required": ["passphrase_env"]}]}
    )
    provider: Literal["local"] = "local"
    passphrase_file: str | None = Field(default=None, description="a file holding the passphrase (mode 0600)")
    passphrase_env: str | None = Field(
        default=None, description="an environment variable holding the passphrase"
    )


class KmsKeysFile(_Keys):
    """Keys wrapped by AWS KMS."""

    provider: Literal["aws-kms"]
    kms_key_id: str = Field(description="a KMS key id, ARN or alias")
    log_kms_key_id: str | None = Field(
        default=None,
        description="the KMS key (id, ARN or alias) that wraps the log signing key, one a shred "
        "of kms_key_id leaves alone (default: alias/NAME-log when kms_key_id is alias/NAME)",
    )
    aws_region: str = Field(default="us-east-1", description="the KMS key's AWS region")
    endpoint_url: str | None = Field(default=None, description="the KMS endpoint URL (none: AWS's)")


class OpenbaoKeysFile(_Keys):
    """Keys wrapped by OpenBao (or Vault) Transit."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["token_file"]}, {"required": ["token_env"]}]}
    )
    provider: Literal["openbao"]
    address: str = Field(description="the OpenBao server's URL")
    transit_key: str = Field(description="the name of the Transit key")
    mount: str = Field(default="transit", description="the Transit engine's mount path")
    token_file: str | None = Field(default=None, description="a file holding the token (mode 0600)")
    token_env: str | None = Field(default=None, description="an environment variable holding the token")


KeysFile = Annotated[
    Annotated[LocalKeysFile, Tag("local")]
    | Annotated[KmsKeysFile, Tag("aws-kms")]
    | Annotated[OpenbaoKeysFile, Tag("openbao")],
    tagged_by("provider", "local"),
]


@dataclass(frozen=True)
class KeysConfig:
    """`keys:` of a node config. Secrets (passphrase, token) are read here, once, at start."""

    provider: str
    dir: Path
    kem: str = "x25519"
    # local
    passphrase: bytes = field(default=b"", repr=False)
    # aws-kms
    kms_key_id: str = ""
    log_kms_key_id: str | None = None
    aws_region: str = "us-east-1"
    endpoint_url: str | None = None
    # openbao
    address: str = ""
    token: str = field(default="", repr=False)
    transit_key: str = ""
    mount: str = "transit"
    # The file the passphrase or token was read from (None: an environment variable, or KMS).
    secret_file: Path | None = None
    # data-key caches: entries and seconds
    cache_entries: int = 100_000
    cache_seconds: float = 300.0


def keys_config(
    k: LocalKeysFile | KmsKeysFile | OpenbaoKeysFile, path: Path, rel: Callable[[str], Path]
) -> KeysConfig:
    common = KeysConfig(
        k.provider, rel(k.dir), k.kem, cache_entries=k.cache_entries, cache_seconds=k.cache_seconds
    )
    if isinstance(k, LocalKeysFile):
        secret = _secret("passphrase", k.passphrase_file, k.passphrase_env, path, rel)
        return replace(common, passphrase=secret.encode(), secret_file=_file(k.passphrase_file, rel))
    if isinstance(k, KmsKeysFile):
        return replace(
            common,
            kms_key_id=k.kms_key_id,
            log_kms_key_id=k.log_kms_key_id,
            aws_region=k.aws_region,
            endpoint_url=k.endpoint_url,
        )
    token = _secret("token", k.token_file, k.token_env, path, rel)
    return replace(
        common,
        address=k.address,
        token=token,
        transit_key=k.transit_key,
        mount=k.mount,
        secret_file=_file(k.token_file, rel),
    )


def _file(value: str | None, rel: Callable[[str], Path]) -> Path | None:
    return rel(value) if value is not None else None


def _secret(name: str, file: str | None, env: str | None, path: Path, rel: Callable[[str], Path]) -> str:
    """A secret from `NAME_file` (a file, ideally mode 0600) or `NAME_env` (an environment
    variable), read now and never again."""
    if file is not None:
        f = rel(file)
        try:
            return f.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{path}: 'keys.{name}_file': cannot read {f}: {e}") from e
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise ConfigError(f"{path}: 'keys.{name}_env': environment variable {env} is not set")
        return value
    raise ConfigError(f"{path}: 'keys.{name}_file' or 'keys.{name}_env' is required")
