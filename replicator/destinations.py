"""Destinations: the affiliate regions a worker ships to, each with its sink, its sealing keys
and the worker's place in the outbox."""

from __future__ import annotations

from dataclasses import dataclass

from residency.replicator.copies import CopyKeys
from residency.replicator.sinks import Sink, make_sink
from residency.server.config.node import NodeConfig
from residency.server.core.errors import ConfigError
from residency.server.keys.cache import KeyCache
from residency.server.keys.copykey import CopySigner, load_copy_key
from residency.server.keys.region import RecipientKey


@dataclass
class Destination:
    """One affiliate region as this worker ships to it."""

    region: str
    keys: CopyKeys
    sink: Sink
    # The home's copy-signing key: every copy and high-water mark sent here is signed with it.
    signer: CopySigner
    # the last outbox sequence this destination has applied, as this worker last read it
    cursor: int = 0
    last_error: str = ""
    # records/s at most (0: no limit), and the monotonic time before which the next batch
    # may not ship under that limit
    max_rate: float = 0.0
    not_before: float = 0.0


def destinations_for(config: NodeConfig, regions: list[str] | None = None) -> list[Destination]:
    """The config's destinations (only `regions`, if given)."""
    unknown = sorted(set(regions or ()) - {a.region for a in config.affiliates})
    if unknown:
        raise ConfigError(f"{config.path}: no destination {unknown} in 'affiliates'")
    signer = load_copy_key(config.region, config.copy_key)
    return [
        Destination(
            a.region,
            CopyKeys(
                RecipientKey.load(a.region, a.public_key),
                KeyCache(config.keys.cache_entries, config.keys.cache_seconds),
            ),
            make_sink(config, a),
            signer,
            max_rate=a.max_rate,
        )
        for a in config.affiliates
        if not regions or a.region in regions
    ]
