"""Where a call's caller is established: the identity its verified client certificate names
(`spiffe://TRUST_DOMAIN/ROLE/REGION/NAME`) and its location, that certificate's region. No
request field or header can claim either: a stated location may only agree."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NoReturn

import grpc

from residency.server.api.access import denial_entries
from residency.server.api.context import Node
from residency.server.api.tls import CALLER, peer_certificate
from residency.server.core.errors import CallerDenied, InvalidRecord
from residency.server.core.schema import USER_ID, data_uses
from residency.server.keys.pki import Identity
from residency.server.vault.records import Caller
from residency.v1 import common_pb2

# A refusal is logged against at most this many of the users a call names (as `access.subjects`).
MAX_SUBJECTS = 100


def peer_of(context: grpc.aio.ServicerContext) -> Identity:
    """The identity of the call's verified client certificate (every call has one: the
    node's `access.Gate` refuses calls without, and notes it for the call)."""
    ident = CALLER.get()
    if ident is not None:
        return ident
    peer = peer_certificate(context)
    if peer is None or peer.identity is None:
        raise CallerDenied("a client certificate naming spiffe://TRUST_DOMAIN/ROLE/REGION/NAME is required")
    return peer.identity


async def caller_of(
    node: Node,
    ctx: common_pb2.CallContext,
    context: grpc.aio.ServicerContext,
    subjects: Sequence[str] = (),
) -> Caller:
    """The caller of a call that states a context: its certificate's identity and region (an
    empty `ctx.location` means that region), and a Fides data use. A location other than the
    certificate's (a region of the rules or not), a certificate of a region the rules do not
    have, and a service stating a purpose that the access policy does not let it state are
    refused PERMISSION_DENIED and logged against each user of `subjects` (the users the
    request names)."""
    ident = peer_of(context)
    regions = node.records.rules.regions
    # A purpose that is no data use is the caller's words: not written to the log.
    purpose = ctx.purpose if ctx.purpose in data_uses() else ""
    # A location other than the certificate's is a lie, whether or not it names a region (one
    # that names none is not repeated: the log keeps what it is given for good).
    if ctx.location and ctx.location != ident.region:
        stated = f"location {ctx.location}" if ctx.location in regions else "a location that is no region"
        why = f"the call states {stated}; the caller's certificate names {ident.region}"
        permission = f"location {ctx.location}" if ctx.location in regions else "location"
        await refuse_caller(node, ident.uri, ident.region, "remote_read", purpose, why, subjects, permission)
    if ident.region not in regions:
        why = f"the caller's certificate names region {ident.region!r}, not one of {sorted(regions)}"
        await refuse_caller(
            node, ident.uri, ident.region, "access", purpose, why, subjects, f"region {ident.region}"
        )
    if not purpose:
        raise InvalidRecord([("context.purpose", f"{ctx.purpose!r} is not a Fides data use")])
    caller = Caller(ident.uri, ident.region, ctx.purpose, role=ident.role, name=ident.name)
    await hold_to_policy(node, caller, [(u, ctx.purpose) for u in subjects] or [("", ctx.purpose)])
    return caller


def purpose_refusal(node: Node, caller: Caller, purpose: str) -> str:
    """Why `caller` may not state `purpose` (a service its access policy does not let), or ""."""
    if caller.role != "service" or node.access.allows(caller.identity, purpose):
        return ""
    return f"{caller.identity} lacks permission purpose {purpose} (access policy {node.access.path.name})"


async def hold_to_policy(node: Node, caller: Caller, asked: list[tuple[str, str]]) -> None:
    """Refuses, logged against each user, a call in which a service states a purpose its access
    policy does not let it state: in its context, or in what it records (a consent's purpose).
    `asked`: (user id or "", purpose) pairs."""
    for purpose in dict.fromkeys(p for _, p in asked):
        if why := purpose_refusal(node, caller, purpose):
            users = [u for u, p in asked if p == purpose]
            await refuse_caller(
                node, caller.identity, caller.location, "access", purpose, why, users, f"purpose {purpose}"
            )


async def refuse_caller(
    node: Node,
    actor: str,
    location: str,
    kind: str,
    purpose: str,
    why: str,
    subjects: Iterable[str],
    permission: str = "",
) -> NoReturn:
    """Logs a refused caller against each user it named (at most 100; one entry without a
    subject if none), then raises CallerDenied."""
    users = list(dict.fromkeys(u for u in subjects if USER_ID.fullmatch(u)))[:MAX_SUBJECTS] or [""]
    entries = denial_entries(actor, location, why, users, purpose, node, kind)
    await node.db.write(lambda: node.db.store.log_append(entries))
    raise CallerDenied(why, permission=permission)


async def at_home_only(
    node: Node, caller: Caller, permission: str, what: str, users: Sequence[str], kind: str = "access"
) -> None:
    """Refuses, logged against each user (`kind`), a call answered only to callers located in
    the node's region (`what` it does, up to the region's name; `permission` the permission it
    needs there)."""
    here = node.records.region
    if caller.location != here:
        why = f"{what} {here} only; the caller is in {caller.location}"
        needed = f"{permission} in {here}"
        await refuse_caller(node, caller.identity, caller.location, kind, caller.purpose, why, users, needed)
