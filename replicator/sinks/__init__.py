"""Sinks: where a destination's sealed copies go (a region node over gRPC, an S3 bucket), and
the one `Sink` interface the replication loop ships through."""

from __future__ import annotations

from typing import Protocol

from residency.replicator.lease import Fence
from residency.server.config.node import Affiliate, NodeConfig
from residency.server.keys.copykey import load_home_key
from residency.server.keys.region import RecipientKey
from residency.v1 import replica_pb2


class Sink(Protocol):
    kind: str
    target: str
    # Whether each copy must carry its own signature (a bucket's object is read alone); else
    # the batch's signed high-water mark vouches for its copies, one signature a batch.
    signs_each_copy: bool

    async def apply(
        self,
        source_region: str,
        copies: list[replica_pb2.SealedCopy],
        high_water: replica_pb2.HighWater | None = None,
        fence: Fence | None = None,
    ) -> None:
        """Ships the copies (signed, or vouched for by the mark) with the batch's signed
        high-water mark (a region node requires one; a bucket gets none, since no node there
        checks it). With a `fence`, no request starts after its deadline, none outlives it,
        and the sink raises StandDown when the fence stops the batch or the destination says
        a newer lease holder has written (the batch is left for that holder)."""
        ...

    def permanent(self, e: BaseException) -> str | None:
        """Why `e` (raised by `apply`) will not go away on a retry, or None if it may."""
        ...

    def key_shredded(self, e: BaseException) -> str | None:
        """Why `e` says the region no longer holds the key the copies were sealed to (nothing
        more may go there until its new key is known), or None."""
        ...

    async def region_key(self, nonce: bytes) -> bytes | None:
        """The region's signed statement of its current key (a serialized
        GetRegionKeyResponse), answering an ask that carries `nonce`, or None where the sink
        cannot ask (a bucket)."""
        ...

    async def close(self) -> None: ...


def make_sink(config: NodeConfig, a: Affiliate) -> Sink:
    """The sink an affiliate's config names; each imports its client library when first used."""
    r = config.replicator
    if a.sink == "s3":
        from residency.replicator.sinks.s3 import S3Sink

        return S3Sink(
            home_region=config.region,
            recipient=RecipientKey.load(a.region, a.public_key),
            # The manifest names the key objects are signed with (init writes it beside copy.key).
            home_key=load_home_key(config.copy_key.with_suffix(".pub")),
            bucket=a.bucket,
            prefix=a.prefix,
            endpoint_url=a.endpoint_url,
            s3_region=a.s3_region,
            timeout=r.ship_timeout,
            concurrency=r.s3_concurrency,
            conditional=a.conditional_writes,
        )
    from residency.replicator.sinks.replica import ReplicaSink

    return ReplicaSink(a.address, config.tls, timeout=r.ship_timeout)
