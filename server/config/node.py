"""A node's configuration: the node config file's model, and the one typed object built from
it once at start (relative paths resolved against the file's folder, secrets read).

A bad value fails at start with a message naming the file and the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, Field, Tag, model_validator

from residency.server.config.credentials import CredentialsConfig
from residency.server.config.errors import FileModel, empty_if_null, read_model, tagged_by
from residency.server.config.keys import KeysConfig, KeysFile, keys_config
from residency.server.config.store import (
    PostgresStoreFile,
    SqliteStoreFile,
    StoreConfig,
    store_config,
)
from residency.server.config.tls import TlsConfig, TlsFile, tls_config
from residency.server.core.sealing import MAX_BATCH


def _host_port(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port from 0 to 65535, got {value!r}")
    return value


HostPort = Annotated[
    str,
    Field(pattern=r"^.+:[0-9]+$", description="HOST:PORT, e.g. 127.0.0.1:50051"),
    AfterValidator(_host_port),
]
RelativePath = Annotated[str, Field(min_length=1)]


class ReplicatorConfig(FileModel):
    """`replicator:` of a primary's config: its in-process worker and every worker's pacing."""

    enabled: bool = Field(
        default=True, description="true or false: whether the node runs a replication worker"
    )
    batch_size: int = Field(
        default=500, ge=1, le=MAX_BATCH, description=f"a whole number of outbox entries from 1 to {MAX_BATCH}"
    )
    # Seconds between retries grow from `retry_initial` up to `retry_max`, with jitter.
    retry_initial: float = Field(default=0.2, gt=0, description="a number of seconds above 0")
    retry_max: float = Field(default=10.0, gt=0, description="a number of seconds above 0")
    # A worker ships to a destination only while it holds that destination's lease, renewed
    # every third of `lease_seconds`; a dead worker's lease is taken over once it expires.
    lease_seconds: float = Field(default=15.0, gt=0, description="a number of seconds above 0")
    # How often an idle worker looks at the outbox (the in-process worker is also woken
    # by each write).
    poll_interval: float = Field(default=0.1, gt=0, description="a number of seconds above 0")
    # Seconds one shipping call may take; must stay below half of `lease_seconds`.
    ship_timeout: float = Field(
        default=5.0, gt=0, description="a number of seconds above 0, at most half of lease_seconds"
    )
    s3_concurrency: int = Field(
        default=32,
        ge=1,
        le=256,
        description="a whole number from 1 to 256: objects written to a bucket at once",
    )
    # Destinations the node's in-process worker ships to (empty: all). Others are left to
    # standalone workers (`residency replicate --region R`), e.g. a bucket whose boto3
    # calls would otherwise take the primary's interpreter from its region nodes.
    regions: tuple[str, ...] = Field(
        default=(),
        strict=False,
        description="a list of affiliate regions this node's worker ships to (empty: all)",
    )


class ArchiveConfig(FileModel):
    """`archive:`: the S3 bucket the transfer log's sealed segments and checkpoints go to."""

    bucket: str = Field(min_length=1, description="the S3 bucket to archive the transfer log to")
    endpoint: str | None = Field(default=None, description="the S3 endpoint URL (none: AWS's)")
    region: str = Field(default="us-east-1", description="the bucket's AWS region")
    prefix: str = Field(default="translog", description="the key prefix of the archive's objects")
    interval_seconds: float = Field(default=300.0, gt=0, description="a number of seconds above 0")
    retention_days: int = Field(
        default=0, ge=0, description="a whole number of days, 0 or more (0: no Object Lock retention)"
    )
    access_key_id: str | None = Field(
        default=None, description="an access key id (none: boto3's standard chain)"
    )
    secret_access_key: str | None = Field(default=None, description="a secret access key")


class _Destination(FileModel):
    region: str = Field(min_length=1, description="the affiliate region copies go to")
    public_key: RelativePath = Field(description="the path of the destination region's region.pub")
    # A partner's ingestion limit, S3's request rate per prefix, or CPU left to the other
    # destinations by a sink that cannot keep up anyway.
    max_rate: float = Field(default=0.0, ge=0, description="a number of records per second (0: no limit)")


class ReplicaFile(_Destination):
    """A region node, reached over gRPC."""

    sink: Literal["replica"] = "replica"
    address: HostPort


class S3File(_Destination):
    """An affiliate's S3 bucket. Credentials come from boto3's standard chain (environment,
    shared files, instance role), never from this file."""

    sink: Literal["s3"]
    bucket: str = Field(min_length=1, description="the S3 bucket copies go to")
    endpoint_url: str = Field(default="", description="the S3 endpoint URL (empty: AWS's for s3_region)")
    prefix: str = Field(default="", description="the key prefix of the copies")
    s3_region: str = Field(default="", description="the bucket's AWS region")
    # Fencing: a PUT names the object it replaces (If-Match) or that there is none
    # (If-None-Match: *), so a stale worker's PUT that arrives late cannot undo a newer write
    # or erasure. Off for an endpoint that refuses these headers (docs/operators.md).
    conditional_writes: bool = Field(
        default=True, description="true or false: PUTs carry If-Match / If-None-Match"
    )


AffiliateFile = Annotated[
    Annotated[ReplicaFile, Tag("replica")] | Annotated[S3File, Tag("s3")], tagged_by("sink", "replica")
]


class MetricsConfig(FileModel):
    """`metrics:` of a node config: where it serves Prometheus metrics (plain HTTP, no
    personal data in any of them: keep the port inside the cluster)."""

    listen: HostPort = Field(description="HOST:PORT of the Prometheus endpoint, e.g. 0.0.0.0:9464")


class HomeFile(FileModel):
    """`home:` of a region node's config: its home region and the key that signs its copies."""

    region: str = Field(min_length=1, description="the home region whose primary sends the copies")
    signing_key: RelativePath = Field(
        description="the path of the home region's copy-signing public key (its copy.pub)"
    )


class NodeFile(FileModel):
    """A residency node's config file (`residency serve --config FILE`). Relative paths are
    relative to the file's folder."""

    region: str = Field(min_length=1, description="the region this node serves, e.g. cn-north")
    role: Literal["primary", "region"]
    listen: HostPort
    tls: TlsFile
    data_dir: RelativePath = Field(description="the folder of the node's database")
    schema_: RelativePath = Field(alias="schema", description="the path of the schema file")
    rules: RelativePath = Field(description="the path of the transfer rules file")
    access: RelativePath = Field(
        description="the path of the access policy file: the purposes each service may state"
    )
    keys: KeysFile
    durability: Literal["full", "normal"] = "full"
    store: Annotated[
        Annotated[SqliteStoreFile, Tag("sqlite")] | Annotated[PostgresStoreFile, Tag("postgres")],
        tagged_by("kind", "sqlite"),
    ] = SqliteStoreFile()
    policy_sweep_seconds: float = Field(default=30.0, gt=0, description="a positive number of seconds")
    affiliates: Annotated[list[AffiliateFile], empty_if_null(list, list[AffiliateFile] | None)] = Field(
        default=[], description="a list of the primary's replication destinations"
    )
    replicator: Annotated[ReplicatorConfig, empty_if_null(dict, ReplicatorConfig | None)] = ReplicatorConfig()
    home: HomeFile | None = None
    checkpoint_interval_seconds: float = Field(default=60.0, gt=0, description="a number of seconds above 0")
    archive: ArchiveConfig | None = None
    check_workers: int | None = Field(
        default=None, ge=0, le=64, description="a whole number from 0 to 64 (0: in-process)"
    )
    credentials: Annotated[CredentialsConfig, empty_if_null(dict, CredentialsConfig | None)] = (
        CredentialsConfig()
    )
    metrics: MetricsConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext_health(cls, data: Any) -> Any:
        # Said apart from an unknown key: configs from before mutual TLS everywhere have it.
        if isinstance(data, dict) and "health" in data:
            raise ValueError(
                "'health.listen' was a plaintext port and is gone: remove 'health' and probe with "
                "`residency health --config NODE.yaml` (an exec probe over mutual TLS)"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        regions = [a.region for a in self.affiliates]
        if len(set(regions)) != len(regions):
            raise ValueError(f"'affiliates': each region may appear once, got {regions}")
        if self.affiliates and self.role != "primary":
            raise ValueError("'affiliates' is for the primary only")
        if self.role == "region" and self.home is None:
            raise ValueError(
                "'home' is required for a region node: its home region and the path of that "
                "region's copy.pub, e.g. {region: cn-north, signing_key: keys/cn-north/copy.pub}"
            )
        stray = sorted(set(self.replicator.regions) - set(regions))
        if stray:
            raise ValueError(f"'replicator.regions' names {stray}, which are not in 'affiliates'")
        rep = self.replicator
        if rep.ship_timeout > rep.lease_seconds / 2:
            raise ValueError(
                "'replicator.ship_timeout' must be above 0 and at most half of "
                f"'replicator.lease_seconds' ({rep.lease_seconds})"
            )
        return self


@dataclass(frozen=True)
class Affiliate:
    """A destination of replication: a region node (`sink: replica`, the default, at
    `address`) or an affiliate's S3 bucket (`sink: s3`)."""

    region: str
    address: str
    public_key: Path
    sink: str = "replica"
    bucket: str = ""
    # Empty: the standard AWS endpoint of `s3_region`.
    endpoint_url: str = ""
    prefix: str = ""
    s3_region: str = ""
    # Records/s at most shipped to this destination (0: no limit).
    max_rate: float = 0.0
    conditional_writes: bool = True

    @property
    def target(self) -> str:
        """Where copies go, for status and logs."""
        if self.sink == "s3":
            return f"s3://{self.bucket}/{self.prefix}" + (
                f" at {self.endpoint_url}" if self.endpoint_url else ""
            )
        return self.address


@dataclass(frozen=True)
class NodeConfig:
    """The node's configuration as the node uses it: paths resolved, secrets read."""

    path: Path
    region: str
    role: str
    listen: str
    data_dir: Path
    schema: Path
    rules: Path
    access: Path
    keys: KeysConfig
    tls: TlsConfig
    durability: str = "full"
    # SQLite in `data_dir` (the default), or a PostgreSQL database.
    store: StoreConfig = field(default_factory=StoreConfig)
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
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    # A region node's home region and the public key its copies must be signed with.
    home_region: str = ""
    home_signing_key: Path | None = None
    # HOST:PORT of the Prometheus endpoint ("" : none).
    metrics_listen: str = ""

    @property
    def log_key(self) -> Path:
        """The log signing key `residency init` writes beside the region key."""
        return self.keys_dir / "log.key"

    @property
    def copy_key(self) -> Path:
        """The copy-signing key `residency init` writes beside the region key (a primary's
        replicator signs with it)."""
        return self.keys_dir / "copy.key"

    @property
    def is_primary(self) -> bool:
        return self.role == "primary"

    @property
    def keys_dir(self) -> Path:
        return self.keys.dir


def load_config(path: str | Path) -> NodeConfig:
    """Reads, validates and resolves a node config file; any problem is a ConfigError."""
    path = Path(path).resolve()
    f = read_model(path, NodeFile, "config")

    def rel(value: str) -> Path:
        return (path.parent / value).resolve()

    return NodeConfig(
        path=path,
        region=f.region,
        role=f.role,
        listen=f.listen,
        data_dir=rel(f.data_dir),
        schema=rel(f.schema_),
        rules=rel(f.rules),
        access=rel(f.access),
        keys=keys_config(f.keys, path, rel),
        tls=tls_config(f.tls, rel),
        durability=f.durability,
        store=store_config(f.store, path, rel),
        policy_sweep_seconds=f.policy_sweep_seconds,
        affiliates=tuple(_affiliate(a, rel) for a in f.affiliates),
        replicator=f.replicator,
        checkpoint_interval_seconds=f.checkpoint_interval_seconds,
        archive=f.archive,
        check_workers=f.check_workers,
        credentials=f.credentials,
        home_region=f.home.region if f.home else "",
        home_signing_key=rel(f.home.signing_key) if f.home else None,
        metrics_listen=f.metrics.listen if f.metrics else "",
    )


def _affiliate(a: ReplicaFile | S3File, rel: Callable[[str], Path]) -> Affiliate:
    if isinstance(a, ReplicaFile):
        return Affiliate(a.region, a.address, rel(a.public_key), max_rate=a.max_rate)
    return Affiliate(
        a.region,
        "",
        rel(a.public_key),
        sink="s3",
        bucket=a.bucket,
        endpoint_url=a.endpoint_url,
        prefix=a.prefix if not a.prefix or a.prefix.endswith("/") else a.prefix + "/",
        s3_region=a.s3_region,
        max_rate=a.max_rate,
        conditional_writes=a.conditional_writes,
    )
