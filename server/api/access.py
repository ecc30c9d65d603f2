"""Who may call what, decided in one place: the permission each method needs, the roles that
hold each permission, and `Gate`, the interceptor that checks both (after the certificate) on
every call before any servicer runs. Every refusal is logged, against each user it names.

A `service` is further held to the purposes the access policy file lets it state
(`residency.server.config.access`; `identity.caller_of` asks it)."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from residency.server.api.context import Node
from residency.server.api.errors import refuse, status_for
from residency.server.api.metrics import refused
from residency.server.api.requests import Pending, Refused
from residency.server.api.tls import CALLER, ServerTls, peer_certificate, peer_chain
from residency.server.api.wrapping import HandlerRewriter, kind_of
from residency.server.core import translog
from residency.server.core.errors import CallerDenied, StoreUnavailable
from residency.server.core.policy.credentials import TokenBuckets
from residency.server.core.schema import USER_ID, data_uses
from residency.server.keys.pki import Identity

log = logging.getLogger("residency.access")

# What each method needs. A method missing here is refused: a new RPC is closed until it is
# given a permission.
METHODS: dict[str, str] = {
    "/residency.v1.RecordService/PutRecord": "records.write",
    "/residency.v1.RecordService/PutRecords": "records.write",
    "/residency.v1.RecordService/DeleteRecord": "records.write",
    "/residency.v1.RecordService/GetRecord": "records.read",
    "/residency.v1.RecordService/FindRecords": "records.read",
    "/residency.v1.RecordService/VerifyCredential": "credentials.verify",
    # The data subject's own export: an operator, or a service acting for the user (who must
    # also state the purpose `api.subject.EXPORT_PURPOSE` and be allowed it).
    "/residency.v1.RecordService/ExportSubject": "subjects.export",
    "/residency.v1.ConsentService/GrantConsents": "consents.write",
    "/residency.v1.ConsentService/WithdrawConsents": "consents.write",
    "/residency.v1.ConsentService/ListConsents": "consents.read",
    "/residency.v1.GrantService/CreateGrant": "grants.write",
    "/residency.v1.GrantService/RevokeGrant": "grants.write",
    "/residency.v1.GrantService/ListGrants": "grants.read",
    # Two people: one identity requests and receives, a different approver approves.
    "/residency.v1.DisclosureService/Disclose": "disclosures.request",
    "/residency.v1.DisclosureService/RequestDisclosure": "disclosures.request",
    "/residency.v1.DisclosureService/ReleaseDisclosure": "disclosures.request",
    "/residency.v1.DisclosureService/ApproveDisclosure": "disclosures.approve",
    "/residency.v1.DisclosureService/DenyDisclosure": "disclosures.approve",
    "/residency.v1.DisclosureService/ListDisclosures": "disclosures.approve",
    "/residency.v1.AdminService/GetNodeStatus": "admin.status",
    # Per destination: addresses, lease holders' hosts, errors: the region's own operators'.
    "/residency.v1.AdminService/ReplicationStatus": "admin.replication",
    # Which fields of a user's record would go where: about one user, so own-region only.
    "/residency.v1.AdminService/ExplainTransfer": "admin.explain",
    "/residency.v1.AdminService/PauseReplication": "admin.replication",
    "/residency.v1.AdminService/ResumeReplication": "admin.replication",
    "/residency.v1.AdminService/RetryDeadLetters": "admin.replication",
    "/residency.v1.AdminService/ApplyRules": "admin.rules",
    # The node's own keys: only an operator of the node's region (`refusal` checks where).
    **{
        f"/residency.v1.AdminService/{m}": "admin.keys"
        for m in (
            "RotateKeys",
            "RewrapKeys",
            "RetireKeys",
            "ShredRegionKey",
            "RekeyRegionKey",
            "RotateIndexKey",
        )
    },
    "/residency.v1.ReplicaService/ApplyCopies": "replica.apply",
    "/residency.v1.ReplicaService/GetRegionKey": "replica.apply",
    **{
        f"/residency.v1.TransferLogService/{m}": "translog.read"
        for m in (
            "TailEntries",
            "Query",
            "GetCheckpoint",
            "ProveInclusion",
            "ProveConsistency",
            "SubjectReport",
            "GetReviewContext",
        )
    },
}
# Open to every authenticated caller, whatever their methods: health checks and reflection.
OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# The roles of spiffe://TRUST_DOMAIN/ROLE/REGION/NAME and what each holds (README, "Security
# model"). Key commands on a stopped node (`residency keys --config`) ask for `operator` too.
ROLES: dict[str, frozenset[str]] = {
    # Records and consents, for the purposes the access policy lets it state.
    "service": frozenset(
        {
            "records.write",
            "records.read",
            "credentials.verify",
            "consents.write",
            "consents.read",
            "disclosures.request",
            "subjects.export",
        }
    ),
    "operator": frozenset(
        {
            "subjects.export",
            "admin.status",
            "admin.explain",
            "admin.replication",
            "admin.rules",
            "admin.keys",
            "grants.write",
            "grants.read",
            "disclosures.request",
        }
    ),
    "reviewer": frozenset({"translog.read"}),
    "approver": frozenset({"disclosures.approve"}),
    # Reads under its own grants only (`Records.read` looks at nothing else for it).
    "recipient": frozenset({"records.read"}),
    # A region node takes copies from its home region's node only (`refusal` checks where).
    "node": frozenset({"replica.apply"}),
}


# What an operator holds on the node of its own region only: acts that change how that
# region handles its data (rules, replication, grants, keys) and answers about its users. An
# affiliate's operator administers its own node, not the home region's (status stays open to
# every operator: it names no user).
OWN_REGION = frozenset(
    {"admin.keys", "admin.rules", "admin.replication", "admin.explain", "grants.write", "grants.read"}
)


# Calls on users' data, answered from what a front end keeps in memory (rules, data keys): not
# while it cannot hear the other front ends' changes (`notices.Hearing`).
_DATA = ("records.", "credentials.", "consents.", "subjects.", "disclosures.", "grants.", "replica.")


def _on_data(method: str) -> bool:
    return METHODS.get(method, "").startswith(_DATA)


def holders(permission: str) -> list[str]:
    return [role for role, held in ROLES.items() if permission in held]


def refusal(ident: Identity, method: str, home_region: str, region: str = "") -> tuple[str, str] | None:
    """(the missing permission, why) if `ident` may not call `method` on the node of `region`
    (whose home is `home_region`), else None."""
    needed = METHODS.get(method)
    if needed is None:
        if method.startswith(OPEN):
            return None
        return "unknown", f"{method} is not a method this node serves"
    if needed not in ROLES.get(ident.role, frozenset()):
        return (
            needed,
            f"{ident.uri} lacks permission {needed} (roles holding it: {', '.join(holders(needed))})",
        )
    if needed == "replica.apply" and ident.region != home_region:
        return needed, f"{ident.uri} lacks permission {needed}: copies come only from {home_region}'s node"
    if needed in OWN_REGION and region and ident.region != region:
        why = (
            f"the keys of {region} are its own operators' to change"
            if needed == "admin.keys"
            else f"on {region}'s node only its own operators hold it"
        )
        return needed, f"{ident.uri} lacks permission {needed}: {why}"
    return None


def subjects(message: Message, limit: int = 100) -> list[str]:
    """The distinct user ids a request names (`user_id` and `user_ids` fields, nested
    ones too, and the transfer log's `subject`), at most `limit`: a refusal is logged
    against each."""
    found: dict[str, None] = {}
    for uid in _user_ids(message):
        if USER_ID.fullmatch(uid):
            found[uid] = None
            if len(found) == limit:
                break
    return list(found)


def _user_ids(message: Message) -> Iterator[str]:
    for field, value in message.ListFields():
        if field.name in ("user_id", "subject") and isinstance(value, str):
            yield value
        elif field.name == "user_ids" and field.is_repeated:
            yield from (v for v in value if isinstance(v, str))
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if field.is_repeated else [value]:
                yield from _user_ids(item)


# How many calls of one revoked or expired certificate a minute are logged (`Gate._log_disowned`).
DISOWNED_PER_MINUTE = 6.0

# A refused request read as bytes (PutRecords) is parsed for the users it names only up to
# this size, on the event loop: a larger one is logged without them.
_PARSE_LIMIT = 1024 * 1024


def _parsed(method: str, request: Any) -> Message | None:
    """The request as a message: bytes for methods that read their own (PutRecords), and a
    request read in its wire form (`requests.WIRE_VIEWS`: ApplyCopies, whose copies are bytes),
    are parsed here as the method's request, on the refusal path only."""
    service, _, name = method.strip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        found = None
    if isinstance(request, Message):
        if found is None or request.DESCRIPTOR.full_name == found.input_type.full_name:
            return request
        if request.ByteSize() > _PARSE_LIMIT:
            return None
        request = request.SerializeToString()
    if isinstance(request, bytes) and len(request) <= _PARSE_LIMIT and found is not None:
        try:
            return GetMessageClass(found.input_type).FromString(request)
        except Exception:  # unreadable bytes name nobody
            return None
    return None


class Gate(HandlerRewriter):
    """Refuses every call, before the method runs, from a peer without an acceptable
    certificate (UNAUTHENTICATED, `ServerTls.refusal`) or whose role lacks the method's
    permission (PERMISSION_DENIED naming it). With a `node`, every such refusal is a
    transfer-log entry: one per user the request names, or one without a subject (without a
    node, as in benchmarks, nothing is logged)."""

    def __init__(self, tls: ServerTls, node: Node | None = None):
        super().__init__()
        self.tls, self.node = tls, node
        self._disowned = TokenBuckets(DISOWNED_PER_MINUTE)  # per certificate serial

    def rewrite(self, method: str, handler: Any) -> Any:
        kind = kind_of(handler)
        return handler._replace(**{kind: self._guard(method, getattr(handler, kind))})

    async def _check(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        peer = peer_certificate(context)
        if (why := self.tls.refusal(peer, lambda: peer_chain(context))) is not None:
            refused("unauthenticated")
            if peer is not None and peer.identity is not None and self.tls.disowned(peer):
                await self._log_disowned(method, request, peer, why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        assert peer is not None and peer.identity is not None  # `refusal` said so
        ident = peer.identity
        CALLER.set(ident)
        if isinstance(request, Refused) and request.message is None:
            return  # bytes that are no request name nobody: INVALID_ARGUMENT, whoever sent them
        node = self.node
        denied = (
            refusal(ident, method, node.records.rules.home_region, node.records.region)
            if node
            else refusal(ident, method, "")
        )
        if denied is None:
            # What another front end changed may not hold here while it is not heard.
            deaf = node.hearing.problems() if node is not None and node.hearing is not None else []
            if deaf and _on_data(method):
                why = f"this front end cannot act on data now ({deaf[0]}): nothing was done; call another"
                await refuse(context, status_for(StoreUnavailable(why)))
            return  # a number out of range: `RequestGuard` refuses it INVALID_ARGUMENT next
        permission, why = denied
        await self._log_refused(method, request, ident, why)
        await refuse(context, status_for(CallerDenied(why, permission=permission)))

    def _named(self, method: str, request: Any) -> tuple[list[str], str]:
        """The users a refused request names, and its purpose if that is a Fides data use (else
        "": the caller's words, of any length, are not written to the log, as in
        `identity.caller_of`). A request refused for an out-of-range number still names its
        users; an unreadable one names nobody, nor does one not read yet (over 64 KiB)."""
        if isinstance(request, Pending):  # a request too large to read for a refusal's log
            request = None
        message = _parsed(method, request.message if isinstance(request, Refused) else request)
        users = subjects(message) if message is not None else []
        stated = getattr(getattr(message, "context", None), "purpose", "")
        return users, stated if stated in data_uses() else ""

    async def _log_refused(self, method: str, request: Any, ident: Identity, why: str) -> None:
        """The transfer-log entries of a call refused for its role: one per user it names, or
        one without a subject (none without a node)."""
        if (node := self.node) is not None:
            users, purpose = self._named(method, request)
            await self._append(
                node, method, denial_entries(ident.uri, ident.region, why, users or [""], purpose, node)
            )

    async def _log_disowned(self, method: str, request: Any, peer: Any, why: str) -> None:
        """A revoked or expired certificate's call that names users: one entry naming them all
        (`subjects`), at most `DISOWNED_PER_MINUTE` a minute per certificate, so its holder
        leaves a trace without filling the log (its health probes name nobody: none)."""
        node = self.node
        if node is None or self._disowned.wait(str(peer.serial), time.monotonic()) > 0:
            return
        users, purpose = self._named(method, request)
        if not users:
            return
        self._disowned.take(str(peer.serial), time.monotonic())
        ident = peer.identity
        entry = translog.entry(
            "access",
            subject="",
            subjects=users,
            source_region=node.records.region,
            destination_region=ident.region,
            outcome="denied",
            actor=ident.uri,
            rules_version=node.records.rules.version,
            purpose=purpose,
            reason=why,
        )
        await self._append(node, method, [entry])

    @staticmethod
    async def _append(node: Node, method: str, entries: list[dict[str, Any]]) -> None:
        try:
            await node.db.write(lambda: node.db.store.log_append(entries))
        except Exception:  # the caller is refused all the same
            log.exception("cannot log a refused call of %s", method)

    def _guard(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        check = self._check
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(method, request, context)
                async for item in behavior(request, context):
                    yield item

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(method, request, context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        return unary


def denial_entries(
    actor: str, location: str, why: str, users: list[str], purpose: str, node: Node, kind: str = "access"
) -> list[dict[str, Any]]:
    """The transfer-log entries of a refused call by `actor` (located in `location`), one per
    user it names ("": none)."""
    return [
        translog.entry(
            kind,
            subject=u,
            source_region=node.records.region,
            destination_region=location,
            outcome="denied",
            actor=actor,
            rules_version=node.records.rules.version,
            purpose=purpose,
            reason=why,
        )
        for u in users
    ]
