"""`tls:` of a node config: the node's certificate and key, the CA its callers' certificates
must come from, and an optional revocation list; all reread on SIGHUP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from residency.server.config.errors import FileModel


class TlsFile(FileModel):
    """Mutual TLS: every listener serves TLS and requires a client certificate from `ca`."""

    cert: str = Field(min_length=1, description="the path of the node's certificate (PEM)")
    key: str = Field(min_length=1, description="the path of the node's private key (PEM, mode 0600)")
    ca: str = Field(min_length=1, description="the path of the CA certificate callers' certificates chain to")
    revoked: str | None = Field(
        default=None, description="the path of a file of revoked serial numbers, one hexadecimal a line"
    )
    trust_domain: str = Field(
        default="residency",
        min_length=1,
        description="the SPIFFE trust domain of callers' URI SANs (spiffe://TRUST_DOMAIN/ROLE/REGION/NAME)",
    )


@dataclass(frozen=True)
class TlsConfig:
    """`tls:` with its paths resolved."""

    cert: Path
    key: Path
    ca: Path
    revoked: Path | None = None
    trust_domain: str = "residency"


def tls_config(t: TlsFile, rel: Callable[[str], Path]) -> TlsConfig:
    return TlsConfig(
        rel(t.cert), rel(t.key), rel(t.ca), rel(t.revoked) if t.revoked else None, t.trust_domain
    )
