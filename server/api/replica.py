"""ReplicaService: a region node takes the sealed copies its primary ships, once it has
checked that its home signed each of them (`residency.server.vault.copies`)."""

from __future__ import annotations

from residency.server.api.context import Node
from residency.server.api.errors import rpc
from residency.server.api.identity import peer_of
from residency.server.core.errors import FailedPrecondition, InvalidRecord
from residency.server.core.schema import USER_ID
from residency.server.vault.copies import IncomingCopy, Sender, apply_copies, refusals
from residency.v1 import replica_pb2, replica_pb2_grpc


class ReplicaService(replica_pb2_grpc.ReplicaServiceServicer):
    def __init__(self, node: Node):
        self.node = node

    @rpc
    async def ApplyCopies(self, request, context):
        records, home = self.node.records, self.node.home
        if records.primary or home is None:
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
        mark = request.high_water if request.HasField("high_water") else None
        # Checked as sent: the signature covers the key material cleared below.
        refused = refusals(home, records.region, mark, request.copies)
        copies = []
        for c in request.copies:
            keys = (c.key_id, c.wrapped_data_key, c.transit_key_id, c.wrapped_transit_key)
            if not c.deleted:
                # The region stores the copy without its key material, which goes to its keyring.
                for name in ("wrapped_data_key", "transit_key_id", "wrapped_transit_key"):
                    c.ClearField(name)
            # Checked above, and not checkable again once the key material is gone: not kept.
            c.ClearField("signature")
            copies.append(IncomingCopy(c.user_id, c.version, c.deleted, *keys, stored=c.SerializeToString()))
        sender = Sender(peer_of(context).uri, home.region)
        applied, skipped, refused = await self.node.db.write(
            lambda: apply_copies(records, copies, sender, refused), weight=len(copies)
        )
        if refused:
            raise InvalidRecord(refused)
        return replica_pb2.ApplyCopiesResponse(applied=applied, skipped=skipped)
