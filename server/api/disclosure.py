"""DisclosureService: a user's data disclosed to a third party under one of the grounds of
policy 3a-3g, under the two-person rule: requested, approved (or denied) by an approver, then
released to the requester; every step, taken or refused, logged."""

from __future__ import annotations

import time
from typing import TypeVar

import grpc

from residency.server.api.context import Node, check_user
from residency.server.api.errors import rpc
from residency.server.api.identity import at_home_only, caller_of, peer_of, purpose_refusal
from residency.server.core import codec
from residency.server.core.errors import CallerDenied, FailedPrecondition, InvalidRecord, ResidencyError
from residency.server.core.policy import disclosure as policy
from residency.server.core.policy.disclosure import Disclosure, Request
from residency.server.vault.records import Caller
from residency.v1 import common_pb2, disclosure_pb2, disclosure_pb2_grpc

_GROUND_NAMES = {
    disclosure_pb2.DISCLOSURE_GROUND_CONSENT: "consent",
    disclosure_pb2.DISCLOSURE_GROUND_REQUESTED_SERVICE: "requested_service",
    disclosure_pb2.DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST: "judicial_or_administrative_request",
    disclosure_pb2.DISCLOSURE_GROUND_VIOLATION_OF_LAW_OR_AGREEMENT: "violation_of_law_or_agreement",
    disclosure_pb2.DISCLOSURE_GROUND_IP_COMPLAINT: "ip_complaint",
    disclosure_pb2.DISCLOSURE_GROUND_TRANSACTION_DISPUTE: "transaction_dispute",
    disclosure_pb2.DISCLOSURE_GROUND_OTHER_LEGAL_BASIS: "other_legal_basis",
}
_GROUNDS = {name: number for number, name in _GROUND_NAMES.items()}
_STATES = {
    disclosure_pb2.DISCLOSURE_STATE_REQUESTED: policy.REQUESTED,
    disclosure_pb2.DISCLOSURE_STATE_APPROVED: policy.APPROVED,
    disclosure_pb2.DISCLOSURE_STATE_DENIED: policy.DENIED,
    disclosure_pb2.DISCLOSURE_STATE_RELEASED: policy.RELEASED,
    disclosure_pb2.DISCLOSURE_STATE_EXPIRED: policy.EXPIRED,
}
_STATE_NUMBERS = {name: number for number, name in _STATES.items()}
# A denial's reason is written into the transfer log: a sentence, not a document.
MAX_REASON = 500


class DisclosureService(disclosure_pb2_grpc.DisclosureServiceServicer):
    """Policy 3a-3g: every disclosure names its ground and evidence and is approved by a second
    person before its fields go to the one who asked; every step logged."""

    def __init__(self, node: Node):
        self.node = node

    @rpc
    async def Disclose(self, request, context):
        raise FailedPrecondition(
            "Disclose no longer releases fields in one call (two-person rule): ask with"
            " RequestDisclosure, have an approver call ApproveDisclosure, then call ReleaseDisclosure"
        )

    @rpc
    async def RequestDisclosure(self, request, context):
        self.node.primary_only()
        caller = await caller_of(self.node, request.context, context, [request.user_id])
        check_user(request.user_id)
        # The fields go to the requester: one abroad would take them out of the region unruled.
        what = "disclosures are requested in"
        await at_home_only(self.node, caller, "disclosures.request", what, [request.user_id])
        ground = _GROUND_NAMES.get(request.ground)
        if ground is None:
            raise InvalidRecord([("ground", "name one of the policy's grounds 3a-3g")])
        evidence = {
            "reference": request.reference,
            "provision": request.provision,
            "service": request.service,
        }
        d = Disclosure(
            request.user_id,
            request.third_party,
            request.destination_country,
            ground,
            list(request.fields),
            evidence,
        )
        ops = self.node.policy
        r, seq = _taken(await self.node.db.write(lambda: ops.request_disclosure(d, caller)))
        return disclosure_pb2.RequestDisclosureResponse(
            id=r.id, expires_at=codec.timestamp(r.expires_at), log_sequence=seq
        )

    @rpc
    async def ApproveDisclosure(self, request, context):
        self.node.primary_only()
        approver = _peer_caller(context)
        ops = self.node.policy
        seq = _taken(await self.node.db.write(lambda: ops.decide_disclosure(request.id, approver)))
        return disclosure_pb2.ApproveDisclosureResponse(log_sequence=seq)

    @rpc
    async def DenyDisclosure(self, request, context):
        self.node.primary_only()
        approver = _peer_caller(context)
        reason = request.reason.strip()
        if not reason or len(reason) > MAX_REASON:
            raise InvalidRecord(
                [("reason", f"say why the disclosure is denied, in 1-{MAX_REASON} characters")]
            )
        ops = self.node.policy
        seq = _taken(await self.node.db.write(lambda: ops.decide_disclosure(request.id, approver, reason)))
        return disclosure_pb2.DenyDisclosureResponse(log_sequence=seq)

    @rpc
    async def ReleaseDisclosure(self, request, context):
        self.node.primary_only()
        caller = _peer_caller(context)
        ops, node, here = self.node.policy, self.node, self.node.records.region

        def refusal(purpose: str) -> str | CallerDenied:  # the access policy as it stands now
            if caller.location != here:  # released at home only, as asked (logged, as any refusal)
                why = f"disclosures are released in {here} only; the caller is in {caller.location}"
                return CallerDenied(why, permission=f"disclosures.request in {here}")
            return purpose_refusal(node, caller, purpose)

        sent, withheld, seq, r = _taken(
            await self.node.db.write(lambda: ops.release_disclosure(request.id, caller, refusal))
        )
        schema = self.node.records.schema.fields
        reply = disclosure_pb2.ReleaseDisclosureResponse(log_sequence=seq, disclosure=summary_of(r))
        for name, value in sent.items():
            reply.fields[name].CopyFrom(value)
        reply.withheld.extend(
            common_pb2.WithheldField(field=n, category=schema[n].category, reason=w.reason, detail=w.detail)
            for n, w in sorted(withheld.items())
        )
        return reply

    @rpc
    async def ListDisclosures(self, request, context):
        self.node.primary_only()
        peer_of(context)
        state = _STATES.get(request.state, "")
        if request.state and not state:
            raise InvalidRecord([("state", "name a DisclosureState, or none for every request")])
        ops = self.node.policy
        found = await self.node.db.call(ops.disclosure_requests, state)
        return disclosure_pb2.ListDisclosuresResponse(disclosures=[summary_of(r) for r in found])


T = TypeVar("T")


def _taken(result: T | ResidencyError) -> T:
    """The step's result; a refusal (already logged) is raised now that its entry committed."""
    if isinstance(result, ResidencyError):
        raise result
    return result


def _peer_caller(context: grpc.aio.ServicerContext) -> Caller:
    """The caller of a step that states no context: its certificate's identity alone."""
    ident = peer_of(context)
    return Caller(ident.uri, ident.region, "", role=ident.role, name=ident.name)


def summary_of(r: Request) -> disclosure_pb2.Disclosure:
    """A request as approvers and its requester see it: no field values."""
    d = r.disclosure
    out = disclosure_pb2.Disclosure(
        id=r.id,
        user_id=d.user_id,
        third_party=d.third_party,
        destination_country=d.destination_country,
        ground=_GROUNDS[d.ground],
        fields=d.fields,
        purpose=r.purpose,
        state=_STATE_NUMBERS[policy.state_at(r, time.time())],
        requester=r.requester,
        decided_by=r.decided_by,
        decision_reason=r.decision_reason,
        requested_at=codec.timestamp(r.requested_at),
        expires_at=codec.timestamp(r.expires_at),
        **{k: v for k, v in d.evidence.items() if k in policy.EVIDENCE},
    )
    if r.decided_at is not None:
        out.decided_at.CopyFrom(codec.timestamp(r.decided_at))
    if r.released_at is not None:
        out.released_at.CopyFrom(codec.timestamp(r.released_at))
    return out
