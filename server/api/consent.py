"""ConsentService: users' consents per purpose and recipient (policy 2a, 2c and 5)."""

from __future__ import annotations

from typing import Any

from residency.server.api.context import Node, check_user
from residency.server.api.errors import rpc
from residency.server.api.identity import at_home_only, caller_of, hold_to_policy, purpose_refusal
from residency.server.core import codec
from residency.server.core.policy.consent import ConsentChange
from residency.server.storage.consents import ConsentRow
from residency.v1 import consent_pb2, consent_pb2_grpc


def _consent_changes(consents: Any) -> list[ConsentChange]:
    return [ConsentChange(c.user_id, c.purpose, c.recipient, c.sensitive, c.evidence) for c in consents]


class ConsentService(consent_pb2_grpc.ConsentServiceServicer):
    """Policy 2a, 2c and 5: consents per user, purpose and recipient."""

    def __init__(self, node: Node):
        self.node = node

    async def _set(self, request, context, withdraw: bool) -> int:
        self.node.primary_only()
        changes = _consent_changes(request.consents)
        users = [c.user_id for c in changes]
        caller = await caller_of(self.node, request.context, context, users)
        # Consents decide what leaves for where: a service abroad could widen its own reads.
        await at_home_only(self.node, caller, "consents.write", "consents are recorded in", users)
        policy = self.node.policy
        policy.check_consents(changes, withdraw)
        # What it records is held to its policy too: a consent's purpose, not only the context's.
        await hold_to_policy(self.node, caller, [(c.user_id, c.purpose) for c in changes])
        changed = await self.node.db.write(lambda: policy.set_consents(changes, withdraw, caller.identity))
        self.node.wake()
        return changed

    @rpc
    async def GrantConsents(self, request, context):
        return consent_pb2.GrantConsentsResponse(changed=await self._set(request, context, False))

    @rpc
    async def WithdrawConsents(self, request, context):
        return consent_pb2.WithdrawConsentsResponse(changed=await self._set(request, context, True))

    @rpc
    async def ListConsents(self, request, context):
        caller = await caller_of(self.node, request.context, context, [request.user_id])
        check_user(request.user_id)
        # A user's consents (their purposes, recipients and evidence) are personal data that
        # no transfer rule sends: they are read where they are kept.
        users = [request.user_id]
        await at_home_only(self.node, caller, "consents.read", "consents are read in", users, "remote_read")
        rows = await self.node.db.call(self.node.db.store.consents, [request.user_id], True)
        # A service sees the consents for purposes it may state, no others.
        rows = [r for r in rows if not purpose_refusal(self.node, caller, r[1])]
        return consent_pb2.ListConsentsResponse(consents=[consent_message(row) for row in rows])


def consent_message(row: ConsentRow) -> consent_pb2.Consent:
    u, p, r, s, g, w, e, a = row
    return consent_pb2.Consent(
        user_id=u,
        purpose=p,
        recipient=r,
        sensitive=bool(s),
        evidence=e,
        actor=a,
        granted_at=codec.timestamp(g),
        withdrawn_at=codec.timestamp(w) if w else None,
    )
