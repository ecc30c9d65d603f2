"""`store:` of a node config: where the node keeps its records, outbox, keyring and transfer log.
SQLite in `data_dir` (the embedded default), or a PostgreSQL database that several front ends
and workers of one region share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, field_validator

from residency.server.config.errors import FileModel
from residency.server.core.errors import ConfigError


class StoreTlsFile(FileModel):
    """TLS to the database server: its certificate is checked against `ca` and its host name
    (`sslmode=verify-full`); `cert` and `key` authenticate the node to it if given."""

    ca: str = Field(min_length=1, description="the path of the CA certificate the server's chains to")
    cert: str | None = Field(default=None, description="the path of the node's client certificate (PEM)")
    key: str | None = Field(default=None, description="the path of the client certificate's key (PEM, 0600)")


class SqliteStoreFile(FileModel):
    """The embedded default: `node.db` and `keys.db` in `data_dir`."""

    kind: Literal["sqlite"] = "sqlite"


class PostgresStoreFile(FileModel):
    """A PostgreSQL database that every front end and worker of the region shares."""

    kind: Literal["postgres"]
    dsn: str = Field(
        min_length=1,
        description="a libpq connection string or URI without a password, "
        "e.g. 'host=db.internal port=5432 dbname=residency user=residency'",
    )
    password_file: str | None = Field(
        default=None, description="the path of a file holding the database user's password"
    )
    tls: StoreTlsFile | None = None
    connect_timeout: float = Field(default=10.0, gt=0, description="a number of seconds above 0")
    notices: Literal["listen", "poll"] = Field(
        default="listen",
        description="how this process hears the others' changes (an erasure, the rules, a key "
        "event): 'listen' (PostgreSQL's LISTEN/NOTIFY) or 'poll' (every 250 ms, for databases "
        "without NOTIFY such as CockroachDB)",
    )

    @field_validator("dsn")
    @classmethod
    def _parses(cls, dsn: str) -> str:
        try:
            parts = conninfo_to_dict(dsn)
        except Exception:
            raise ValueError("is not a libpq connection string or URI") from None
        if "password" in parts:
            raise ValueError("must not hold the password: put it in a file named by 'password_file'")
        return dsn


@dataclass(frozen=True)
class StoreConfig:
    """`store:` resolved: `dsn` is empty for SQLite, else complete (password, TLS)."""

    kind: str = "sqlite"
    dsn: str = ""
    connect_timeout: float = 10.0
    notices: str = "listen"


def store_config(
    f: SqliteStoreFile | PostgresStoreFile, path: Path, rel: Callable[[str], Path]
) -> StoreConfig:
    if isinstance(f, SqliteStoreFile):
        return StoreConfig()
    extra: dict[str, str] = {}
    if f.password_file:
        secret = rel(f.password_file)
        try:
            extra["password"] = secret.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{path}: 'store.password_file': cannot read {secret}: {e.strerror}") from None
    if f.tls:
        extra |= {"sslmode": "verify-full", "sslrootcert": str(rel(f.tls.ca))}
        if f.tls.cert and f.tls.key:
            extra |= {"sslcert": str(rel(f.tls.cert)), "sslkey": str(rel(f.tls.key))}
    return StoreConfig("postgres", make_conninfo(f.dsn, **extra), f.connect_timeout, f.notices)
