"""The access policy file (`access:` of a node config, `access.yaml` as `init` writes it):
which purposes each service may state, by identity pattern; reread on SIGHUP."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator

from residency.server.config.errors import FileModel, empty_if_null, read_model
from residency.server.core import translog
from residency.server.core.rules import covers
from residency.server.core.schema import data_uses

ANY_PURPOSE = "*"


class ServiceAccess(FileModel):
    """The purposes the services whose identity matches `identity` may state."""

    identity: str = Field(
        pattern=r"^spiffe://[^/]+/service/[^/]+/[^/]+$",
        description="a service identity spiffe://TRUST_DOMAIN/service/REGION/NAME; "
        "'*' matches any run of characters within one part",
    )
    purposes: list[str] = Field(
        min_length=1,
        description="Fides data uses (a use allows its narrower ones: 'marketing' allows "
        "'marketing.communications'), or '*' for every purpose",
    )

    @field_validator("purposes")
    @classmethod
    def _known(cls, purposes: list[str]) -> list[str]:
        unknown = [p for p in purposes if p != ANY_PURPOSE and p not in data_uses()]
        if unknown:
            raise ValueError(f"{unknown} are not Fides data uses (or '*')")
        return purposes


class AccessFile(FileModel):
    """An access policy: the first entry whose `identity` matches a service's certificate
    decides what it may state; a service no entry matches may state no purpose."""

    services: Annotated[list[ServiceAccess], empty_if_null(list, list[ServiceAccess] | None)] = Field(
        default=[], description="services and the purposes each may state, first match decides"
    )


@dataclass(frozen=True)
class AccessPolicy:
    """The access policy as the node uses it."""

    path: Path
    entries: tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...] = ()

    def purposes(self, identity: str) -> tuple[str, tuple[str, ...]] | None:
        """(the matching pattern, the purposes it allows) for a service identity, or None."""
        for pattern, text, purposes in self.entries:
            if pattern.fullmatch(identity):
                return text, purposes
        return None

    def allows(self, identity: str, purpose: str) -> bool:
        found = self.purposes(identity)
        return found is not None and any(p == ANY_PURPOSE or covers(p, purpose) for p in found[1])

    def reread_entry(self, region: str, rules_version: str) -> dict[str, Any]:
        """The transfer-log entry of this policy taking effect on SIGHUP (an administrative
        act: it widens or narrows what services may do), naming each entry it holds."""
        held = "; ".join(f"{text}: {', '.join(purposes)}" for _, text, purposes in self.entries)
        reason = f"access policy {self.path.name} reread: {len(self.entries)} entries"
        return translog.admin(region, "sighup", rules_version, reason + (f" ({held[:1000]})" if held else ""))


def _pattern(text: str) -> re.Pattern[str]:
    # `*` stays within one part of the URI: `service/*/billing` never matches across a `/`.
    return re.compile("[^/]*".join(re.escape(part) for part in text.split("*")))


def load_access(path: Path) -> AccessPolicy:
    """Reads and validates an access policy file; any problem is a ConfigError naming it."""
    f = read_model(path, AccessFile, "the access policy")
    return AccessPolicy(
        path, tuple((_pattern(s.identity), s.identity, tuple(s.purposes)) for s in f.services)
    )
