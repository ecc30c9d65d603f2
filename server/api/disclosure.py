"""DisclosureService: a user's data disclosed to a third party under one of the grounds of
policy 3a-3g, or refused; logged either way."""

from __future__ import annotations

from residency.server.api.context import Node, check_user
from residency.server.api.errors import rpc
from residency.server.api.identity import caller_of
from residency.server.core.errors import InvalidRecord
from residency.server.core.policy.disclosure import Disclosure, refusal_error
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


class DisclosureService(disclosure_pb2_grpc.DisclosureServiceServicer):
    """Policy 3a-3g: every disclosure names its ground and evidence, given or refused, logged."""

    def __init__(self, node: Node):
        self.node = node

    @rpc
    async def Disclose(self, request, context):
        self.node.primary_only()
        caller = await caller_of(self.node, request.context, context)
        check_user(request.user_id)
        ground = _GROUND_NAMES.get(request.ground)
        if ground is None:
            raise InvalidRecord([("ground", "name one of the policy's grounds 3a-3g")])
        d = Disclosure(
            request.user_id,
            request.third_party,
            request.destination_country,
            ground,
            list(request.fields),
            {
                "reference": request.reference,
                "approver": request.approver,
                "provision": request.provision,
                "service": request.service,
            },
        )
        policy = self.node.policy
        sent, withheld, seq, refusal = await self.node.db.write(lambda: policy.disclose(d, caller))
        if refusal:
            raise refusal_error(refusal, seq)
        schema = self.node.records.schema.fields
        reply = disclosure_pb2.DiscloseResponse(log_sequence=seq)
        for name, value in sent.items():
            reply.fields[name].CopyFrom(value)
        reply.withheld.extend(
            common_pb2.WithheldField(field=n, category=schema[n].category, reason=w.reason, detail=w.detail)
            for n, w in sorted(withheld.items())
        )
        return reply
