"""Where a call's caller is established: the identity its verified client certificate names
(`spiffe://TRUST_DOMAIN/ROLE/REGION/NAME`) and its location, that certificate's region. No
request field or header can claim either: a stated location may only agree."""

from __future__ import annotations

import grpc

from residency.server.api.context import Node
from residency.server.api.tls import peer_certificate
from residency.server.core import translog
from residency.server.core.errors import CallerDenied, InvalidRecord
from residency.server.core.schema import USER_ID, data_uses
from residency.server.keys.pki import Identity
from residency.server.vault.records import Caller
from residency.v1 import common_pb2


def peer_of(context: grpc.aio.ServicerContext) -> Identity:
    """The identity of the call's verified client certificate (every call has one: the
    node's `Authenticate` interceptor refuses calls without)."""
    peer = peer_certificate(context)
    if peer is None or peer[1] is None:
        raise CallerDenied("a client certificate naming spiffe://TRUST_DOMAIN/ROLE/REGION/NAME is required")
    return peer[1]


async def caller_of(
    node: Node, ctx: common_pb2.CallContext, context: grpc.aio.ServicerContext, subject: str = ""
) -> Caller:
    """The caller of a call that states a context: its certificate's identity and region (an
    empty `ctx.location` means that region), and a Fides data use. A known location other than
    the certificate's is refused PERMISSION_DENIED and logged against `subject` (a user id), and
    so is a service stating a purpose that the access policy does not let it state."""
    ident = peer_of(context)
    regions = node.records.rules.regions
    bad = []
    if ctx.location and ctx.location not in regions:
        bad.append(("context.location", f"unknown region {ctx.location!r}; known: {sorted(regions)}"))
    if ctx.purpose not in data_uses():
        bad.append(("context.purpose", f"{ctx.purpose!r} is not a Fides data use"))
    if bad:
        raise InvalidRecord(bad)
    refused = kind = permission = ""
    if ctx.location and ctx.location != ident.region:
        kind, permission = "remote_read", ""
        refused = f"the call states location {ctx.location}; the caller's certificate names {ident.region}"
    elif ident.role == "service" and not node.access.allows(ident.uri, ctx.purpose):
        kind, permission = "access", f"purpose {ctx.purpose}"
        refused = (
            f"{ident.uri} lacks permission purpose {ctx.purpose} (access policy {node.access.path.name})"
        )
    if refused:
        entry = translog.entry(
            kind,
            subject=subject if USER_ID.fullmatch(subject) else "",
            source_region=node.records.region,
            destination_region=ident.region,
            outcome="denied",
            actor=ident.uri,
            rules_version=node.records.rules.version,
            purpose=ctx.purpose,
            reason=refused,
        )
        await node.db.write(lambda: node.db.store.log_append([entry]))
        raise CallerDenied(refused, permission=permission)
    if ident.region not in regions:
        raise CallerDenied(
            f"the caller's certificate names region {ident.region!r}, not one of {sorted(regions)}"
        )
    return Caller(ident.uri, ident.region, ctx.purpose, role=ident.role, name=ident.name)
