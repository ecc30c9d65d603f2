"""A node's configuration: one typed object, loaded and validated once at start.

Relative paths are resolved against the config file's folder. A bad value fails at start
with a message naming the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from residency.server.core.errors import ConfigError
from residency.server.vault.archive import ArchiveConfig

ROLES = ("primary", "region")
PROVIDERS = ("local", "aws-kms", "openbao")
KEMS = ("x25519", "mlkem768-x25519")
DURABILITY = {"full": "FULL", "normal": "NORMAL"}


SINKS = ("replica", "s3")


@dataclass(frozen=True)
class Affiliate:
    """A destination of replication: a region node (`sink: replica`, the default, at
    `address`) or an affiliate's S3 bucket (`sink: s3`)."""

    region: str
    address: str
    public_key: Path
    sink: str = "replica"
    bucket: str = ""
    # Empty: the standard AWS endpoint of `s3_region`. Credentials come from boto3's
    # standard chain (environment, shared files, instance role), never from this file.
    endpoint_url: str = ""
    prefix: str = ""
    s3_region: str = ""
    # Records/s at most shipped to this destination (0: no limit): a partner's ingestion
    # limit, S3's request rate per prefix, or CPU left to the other destinations by a sink
    # that cannot keep up anyway.
    max_rate: float = 0.0

    @property
    def target(self) -> str:
        """Where copies go, for status and logs."""
        if self.sink == "s3":
            return f"s3://{self.bucket}/{self.prefix}" + (
                f" at {self.endpoint_url}" if self.endpoint_url else ""
            )
        return self.address


@dataclass(frozen=True)
class ReplicatorConfig:
    enabled: bool = True
    batch_size: int = 500
    # Seconds between retries grow from `retry_initial` up to `retry_max`, with jitter.
    retry_initial: float = 0.2
    retry_max: float = 10.0
    # A worker ships to a destination only while it holds that destination's lease, renewed
    # every third of `lease_seconds`; a dead worker's lease is taken over once it expires.
    lease_seconds: float = 15.0
    # How often an idle worker looks at the outbox (the in-process worker is also woken
    # by each write).
    poll_interval: float = 0.1
    # Seconds one shipping call may take; must stay below half of `lease_seconds`.
    ship_timeout: float = 5.0
    # Objects written to an S3 bucket at once.
    s3_concurrency: int = 32
    # Destinations the node's in-process worker ships to (empty: all). Others are left to
    # standalone workers (`residency replicate --region R`), e.g. a bucket whose boto3
    # calls would otherwise take the primary's interpreter from its region nodes.
    regions: tuple[str, ...] = ()


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
    aws_region: str = "us-east-1"
    endpoint_url: str | None = None
    # openbao
    address: str = ""
    token: str = field(default="", repr=False)
    transit_key: str = ""
    mount: str = "transit"
    # data-key caches: entries and seconds
    cache_entries: int = 100_000
    cache_seconds: float = 300.0


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    region: str
    role: str
    listen: str
    data_dir: Path
    schema: Path
    rules: Path
    keys: KeysConfig
    durability: str = "full"
    # How often the primary ends expired grants and withdraws copies past retention.
    policy_sweep_seconds: float = 30.0
    affiliates: tuple[Affiliate, ...] = ()
    replicator: ReplicatorConfig = field(default_factory=ReplicatorConfig)
    # The transfer log signs a checkpoint this often (when it grew), and on demand.
    checkpoint_interval_seconds: float = 60.0
    # Where sealed transfer-log segments and checkpoints are uploaded (None: not archived).
    archive: ArchiveConfig | None = None
    # Helper processes that read and check large PutRecords requests (None: one per core
    # beyond the first, at most 4; 0: in-process).
    check_workers: int | None = None

    @property
    def log_key(self) -> Path:
        """The log signing key `residency init` writes beside the region key."""
        return self.keys_dir / "log.key"

    @property
    def is_primary(self) -> bool:
        return self.role == "primary"

    @property
    def keys_dir(self) -> Path:
        return self.keys.dir


def _listen(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.count(":") < 1:
        raise ConfigError(f"{where}: must be HOST:PORT, e.g. 127.0.0.1:50051")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: must be HOST:PORT with a port from 0 to 65535, got {value!r}")
    return value


def _affiliate(a: Any, where: str, rel: Any) -> Affiliate:
    if not isinstance(a, dict):
        raise ConfigError(f"{where}' must be a mapping")
    sink = a.get("sink", "replica")
    if sink not in SINKS:
        raise ConfigError(f"{where}.sink' must be one of {list(SINKS)}, got {sink!r}")
    known = {"region", "sink", "public_key", "max_rate"} | (
        {"address"} if sink == "replica" else {"bucket", "endpoint_url", "prefix", "s3_region"}
    )
    unknown = sorted(set(a) - known)
    if unknown:
        raise ConfigError(f"{where}': unknown key(s) {unknown} for sink {sink}; known: {sorted(known)}")
    need = ("region", "public_key", "address") if sink == "replica" else ("region", "public_key", "bucket")
    for k in need:
        if not isinstance(a.get(k), str) or not a[k]:
            raise ConfigError(f"{where}.{k}' is required for sink {sink}")
    for k in ("endpoint_url", "prefix", "s3_region"):
        if not isinstance(a.get(k, ""), str):
            raise ConfigError(f"{where}.{k}' must be a string")
    max_rate = a.get("max_rate", 0)
    if isinstance(max_rate, bool) or not isinstance(max_rate, int | float) or max_rate < 0:
        raise ConfigError(f"{where}.max_rate' must be a number of records per second (0: no limit)")
    if sink == "replica":
        return Affiliate(
            a["region"], _listen(a["address"], f"{where}.address'"), rel(a["public_key"]), max_rate=max_rate
        )
    prefix = a.get("prefix", "")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return Affiliate(
        a["region"],
        "",
        rel(a["public_key"]),
        sink="s3",
        bucket=a["bucket"],
        endpoint_url=a.get("endpoint_url", ""),
        prefix=prefix,
        s3_region=a.get("s3_region", ""),
        max_rate=max_rate,
    )


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: must be a positive number of seconds")
    return float(value)


def load_config(path: str | Path) -> NodeConfig:
    path = Path(path).resolve()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a node config is a mapping")
    base = path.parent

    def need(key: str, kind: type = str) -> Any:
        if key not in doc:
            raise ConfigError(f"{path}: '{key}' is required")
        if not isinstance(doc[key], kind):
            raise ConfigError(f"{path}: '{key}' must be a {kind.__name__}")
        return doc[key]

    def rel(value: str) -> Path:
        return (base / value).resolve()

    known = {
        "region",
        "role",
        "listen",
        "data_dir",
        "schema",
        "rules",
        "keys",
        "durability",
        "affiliates",
        "replicator",
        "checkpoint_interval_seconds",
        "archive",
        "policy_sweep_seconds",
        "check_workers",
    }
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    role = need("role")
    if role not in ROLES:
        raise ConfigError(f"{path}: 'role' must be one of {list(ROLES)}, got {role!r}")
    keys = _keys(need("keys", dict), path, rel)
    durability = doc.get("durability", "full")
    if durability not in DURABILITY:
        raise ConfigError(f"{path}: 'durability' must be one of {sorted(DURABILITY)}")
    affiliates = []
    for i, a in enumerate(doc.get("affiliates") or []):
        affiliates.append(_affiliate(a, f"{path}: 'affiliates[{i}]", rel))
    regions = [a.region for a in affiliates]
    if len(set(regions)) != len(regions):
        raise ConfigError(f"{path}: 'affiliates': each region may appear once, got {regions}")
    if affiliates and role != "primary":
        raise ConfigError(f"{path}: 'affiliates' is for the primary only")
    rep = doc.get("replicator") or {}
    if not isinstance(rep, dict):
        raise ConfigError(f"{path}: 'replicator' must be a mapping")
    if not isinstance(rep.get("regions", []), list):
        raise ConfigError(f"{path}: 'replicator.regions' must be a list of affiliate regions")
    try:
        replicator = ReplicatorConfig(**{**rep, "regions": tuple(rep.get("regions", ()))})
    except TypeError as e:
        raise ConfigError(f"{path}: 'replicator': {e}") from e
    stray = sorted(set(replicator.regions) - {a.region for a in affiliates})
    if stray:
        raise ConfigError(f"{path}: 'replicator.regions' names {stray}, which are not in 'affiliates'")
    if not 1 <= replicator.batch_size <= 1000:
        raise ConfigError(f"{path}: 'replicator.batch_size' must be from 1 to 1000")
    if not 0 < replicator.ship_timeout <= replicator.lease_seconds / 2:
        raise ConfigError(
            f"{path}: 'replicator.ship_timeout' must be above 0 and at most half of "
            f"'replicator.lease_seconds' ({replicator.lease_seconds})"
        )
    if not 1 <= replicator.s3_concurrency <= 256:
        raise ConfigError(f"{path}: 'replicator.s3_concurrency' must be from 1 to 256")
    interval = doc.get("checkpoint_interval_seconds", 60.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigError(f"{path}: 'checkpoint_interval_seconds' must be a number of seconds above 0")
    archive = _archive(doc.get("archive"), f"{path}: 'archive")
    check_workers = doc.get("check_workers")
    if check_workers is not None and (
        isinstance(check_workers, bool) or not isinstance(check_workers, int) or not 0 <= check_workers <= 64
    ):
        raise ConfigError(f"{path}: 'check_workers' must be a whole number from 0 to 64 (0: in-process)")
    return NodeConfig(
        path=path,
        region=need("region"),
        role=role,
        listen=_listen(need("listen"), f"{path}: 'listen'"),
        data_dir=rel(need("data_dir")),
        schema=rel(need("schema")),
        rules=rel(need("rules")),
        keys=keys,
        durability=durability,
        policy_sweep_seconds=_positive(
            doc.get("policy_sweep_seconds", 30.0), f"{path}: 'policy_sweep_seconds'"
        ),
        affiliates=tuple(affiliates),
        replicator=replicator,
        checkpoint_interval_seconds=float(interval),
        archive=archive,
        check_workers=check_workers,
    )


_KEYS = {
    "local": {"passphrase_file", "passphrase_env"},
    "aws-kms": {"kms_key_id", "aws_region", "endpoint_url"},
    "openbao": {"address", "token_file", "token_env", "transit_key", "mount"},
}


def _secret(keys: dict[str, Any], name: str, path: Path, rel: Any) -> str:
    """A secret from `NAME_file` (a file, ideally mode 0600) or `NAME_env` (an environment
    variable), read now and never again."""
    if isinstance(keys.get(f"{name}_file"), str):
        f = rel(keys[f"{name}_file"])
        try:
            return f.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{path}: 'keys.{name}_file': cannot read {f}: {e}") from e
    if isinstance(keys.get(f"{name}_env"), str):
        value = os.environ.get(keys[f"{name}_env"], "")
        if not value:
            raise ConfigError(
                f"{path}: 'keys.{name}_env': environment variable {keys[f'{name}_env']} is not set"
            )
        return value
    raise ConfigError(f"{path}: 'keys.{name}_file' or 'keys.{name}_env' is required")


def _keys(keys: dict[str, Any], path: Path, rel: Any) -> KeysConfig:
    provider = keys.get("provider", "local")
    if provider not in PROVIDERS:
        raise ConfigError(f"{path}: 'keys.provider' must be one of {list(PROVIDERS)}, got {provider!r}")
    known = {"provider", "dir", "kem", "cache_entries", "cache_seconds"} | _KEYS[provider]
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ConfigError(f"{path}: 'keys': unknown key(s) {unknown} for provider {provider}")
    if not isinstance(keys.get("dir"), str):
        raise ConfigError(f"{path}: 'keys.dir' is required: the folder holding region.key and region.pub")
    kem = keys.get("kem", "x25519")
    if kem not in KEMS:
        raise ConfigError(f"{path}: 'keys.kem' must be one of {list(KEMS)}, got {kem!r}")
    common: dict[str, Any] = {"provider": provider, "dir": rel(keys["dir"]), "kem": kem}
    for k, kind in (("cache_entries", int), ("cache_seconds", (int, float))):
        if k in keys:
            if not isinstance(keys[k], kind) or keys[k] <= 0:
                raise ConfigError(f"{path}: 'keys.{k}' must be a positive number")
            common[k] = keys[k]
    if provider == "local":
        return KeysConfig(**common, passphrase=_secret(keys, "passphrase", path, rel).encode())
    if provider == "aws-kms":
        if not isinstance(keys.get("kms_key_id"), str):
            raise ConfigError(f"{path}: 'keys.kms_key_id' is required: a KMS key id, ARN or alias")
        return KeysConfig(
            **common,
            kms_key_id=keys["kms_key_id"],
            aws_region=str(keys.get("aws_region", "us-east-1")),
            endpoint_url=keys.get("endpoint_url"),
        )
    for k in ("address", "transit_key"):
        if not isinstance(keys.get(k), str):
            raise ConfigError(f"{path}: 'keys.{k}' is required for provider openbao")
    return KeysConfig(
        **common,
        address=keys["address"],
        token=_secret(keys, "token", path, rel),
        transit_key=keys["transit_key"],
        mount=str(keys.get("mount", "transit")),
    )


def _archive(doc: Any, where: str) -> ArchiveConfig | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("bucket"), str) or not doc["bucket"]:
        raise ConfigError(f"{where}.bucket' is required: the S3 bucket to archive the transfer log to")
    try:
        a = ArchiveConfig(**doc)
    except TypeError as e:
        raise ConfigError(f"{where}': {e}") from e
    if not isinstance(a.interval_seconds, int | float) or a.interval_seconds <= 0:
        raise ConfigError(f"{where}.interval_seconds' must be a number of seconds above 0")
    if not isinstance(a.retention_days, int) or a.retention_days < 0:
        raise ConfigError(f"{where}.retention_days' must be a whole number of days, 0 or more")
    return a
