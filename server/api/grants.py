"""GrantService: a third party's time-bound access to users' data (policy 2a)."""

from __future__ import annotations

import json
import time

from residency.server.api.context import Node
from residency.server.api.errors import rpc
from residency.server.api.identity import caller_of
from residency.server.core import codec
from residency.server.core.policy.grants import state
from residency.v1 import consent_pb2, consent_pb2_grpc

_STATES = {
    "active": consent_pb2.GRANT_STATE_ACTIVE,
    "ended": consent_pb2.GRANT_STATE_ENDED,
    "revoked": consent_pb2.GRANT_STATE_REVOKED,
}


class GrantService(consent_pb2_grpc.GrantServiceServicer):
    """Policy 2a: a third party's access ends with the service it helps provide."""

    def __init__(self, node: Node):
        self.node = node

    @rpc
    async def CreateGrant(self, request, context):
        self.node.primary_only()
        g = request.grant
        caller = await caller_of(self.node, request.context, context, g.user_ids)
        spec = {
            "id": g.id,
            "recipient": g.recipient,
            "purpose": g.purpose,
            "legal_basis": g.legal_basis or "contract",
            "categories": list(g.categories),
            "ends_at": codec.seconds(g.ends_at),
        }
        users = list(dict.fromkeys(g.user_ids))
        policy = self.node.policy
        grant_id = await self.node.db.write(lambda: policy.create_grant(spec, users, caller.identity))
        self.node.wake()
        return consent_pb2.CreateGrantResponse(id=grant_id)

    @rpc
    async def RevokeGrant(self, request, context):
        self.node.primary_only()
        caller = await caller_of(self.node, request.context, context)
        policy = self.node.policy
        revoked = await self.node.db.write(lambda: policy.revoke_grant(request.id, caller.identity))
        self.node.wake()
        return consent_pb2.RevokeGrantResponse(revoked=revoked)

    @rpc
    async def ListGrants(self, request, context):
        await caller_of(self.node, request.context, context)
        rows = await self.node.db.call(self.node.db.store.grants_list)
        now = time.time()
        return consent_pb2.ListGrantsResponse(
            grants=[
                consent_pb2.Grant(
                    id=i,
                    recipient=r,
                    purpose=p,
                    legal_basis=b,
                    categories=json.loads(c),
                    created_at=codec.timestamp(created),
                    ends_at=codec.timestamp(ends),
                    revoked_at=codec.timestamp(revoked) if revoked else None,
                    user_count=n,
                    state=_STATES[state(ends, revoked, now)],
                )
                for i, r, p, b, c, created, ends, revoked, _, n in rows
            ]
        )
