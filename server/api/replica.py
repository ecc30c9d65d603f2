"""ReplicaService: a region node takes the sealed copies its primary ships."""

from __future__ import annotations

from residency.server.api.context import Node
from residency.server.api.errors import rpc
from residency.server.api.identity import peer_of
from residency.server.core.errors import FailedPrecondition, InvalidRecord
from residency.server.core.schema import USER_ID
from residency.server.vault.copies import apply_copies, incoming
from residency.v1 import replica_pb2, replica_pb2_grpc


class ReplicaService(replica_pb2_grpc.ReplicaServiceServicer):
    def __init__(self, node: Node):
        self.node = node

    @rpc
    async def ApplyCopies(self, request, context):
        records = self.node.records
        if records.primary:
            raise FailedPrecondition(f"{records.region} is the primary; it does not take copies")
        bad = [
            (f"copies[{i}].user_id", "malformed user id")
            for i, c in enumerate(request.copies)
            if not USER_ID.fullmatch(c.user_id)
        ]
        bad += [
            (f"copies[{i}].version", "must be at least 1")
            for i, c in enumerate(request.copies)
            if c.version < 1
        ]
        if bad:
            raise InvalidRecord(bad)
        # The region stores each copy without its key material, which goes to its keyring.
        copies = [incoming(c) for c in request.copies]
        actor = peer_of(context).uri
        applied, skipped = await self.node.db.write(
            lambda: apply_copies(records, copies, actor), weight=len(copies)
        )
        return replica_pb2.ApplyCopiesResponse(applied=applied, skipped=skipped)
