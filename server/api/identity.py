"""Where a call's caller is established: who they are and where they are. Today the identity
is the `x-residency-identity` metadata and the location the request's `CallContext`; peer
certificates (mTLS) will replace them here, and nowhere else."""

from __future__ import annotations

from collections.abc import Collection

import grpc

from residency.server.core.errors import InvalidRecord
from residency.server.core.schema import data_uses
from residency.server.vault.records import Caller
from residency.v1 import common_pb2

IDENTITY_KEY = "x-residency-identity"


def identity_of(context: grpc.aio.ServicerContext, default: str = "") -> str:
    """The caller's identity, or `default` when the call states none."""
    identity = default
    for key, value in context.invocation_metadata() or ():
        if key == IDENTITY_KEY:
            identity = value
    return identity


def caller_of(
    ctx: common_pb2.CallContext, context: grpc.aio.ServicerContext, regions: Collection[str]
) -> Caller:
    """The caller of a call that states a context: identity, a known region, a Fides data
    use; or InvalidRecord naming everything missing."""
    identity = identity_of(context)
    if identity and ctx.location in regions and ctx.purpose in data_uses():
        return Caller(identity, ctx.location, ctx.purpose)
    bad = []
    if ctx.location not in regions:
        bad.append(("context.location", f"unknown region {ctx.location!r}; known: {sorted(regions)}"))
    if ctx.purpose not in data_uses():
        bad.append(("context.purpose", f"{ctx.purpose!r} is not a Fides data use"))
    if not identity:
        bad.append((f"metadata.{IDENTITY_KEY}", "the caller's identity is required"))
    raise InvalidRecord(bad)
