"""ReplicaService: a region node takes the sealed copies its primary ships, once it has
checked that its home signed each of them (`residency.server.vault.copies`) and that none is
sealed to a key it no longer holds; and it tells its primary its current public key, signed."""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.message import DecodeError

from residency.server.api.context import Node
from residency.server.api.errors import rpc
from residency.server.api.identity import peer_of
from residency.server.api.requests import out_of_range
from residency.server.core import codec, translog
from residency.server.core.errors import FailedPrecondition, InvalidRecord, KeysBehind, KeyShredded
from residency.server.core.schema import USER_ID
from residency.server.core.sealing import MAX_BATCH
from residency.server.vault.copies import (
    apply_copies,
    check_lease_epoch,
    incoming,
    prepare_copy_keys,
    refusals,
)
from residency.server.vault.inbound import Sender
from residency.v1 import replica_pb2, replica_pb2_grpc

# The longest nonce a GetRegionKeyRequest may carry (the primary sends 16 bytes).
MAX_NONCE = 64


def read_copies(sent: list[bytes]) -> tuple[list[replica_pb2.SealedCopy], list[tuple[str, str]]]:
    """The copies of a batch read from the bytes sent, and the (field path, reason) of each
    that is no SealedCopy or holds a number out of range, as the request's reader finds them
    in any other request."""
    copies, bad = [], []
    for i, data in enumerate(sent):
        try:
            copy = replica_pb2.SealedCopy.FromString(data)
        except DecodeError:
            bad.append((f"copies[{i}]", "not a serialized residency.v1.SealedCopy"))
            continue
        bad += [(f"copies[{i}].{path}", why) for path, why in out_of_range(copy)]
        copies.append(copy)
    return copies, bad


class ReplicaService(replica_pb2_grpc.ReplicaServiceServicer):
    def __init__(self, node: Node):
        self.node = node

    @rpc
    async def ApplyCopies(self, request, context):
        records, home = self.node.records, self.node.home
        if records.primary or home is None:
            raise FailedPrecondition(f"{records.region} is the primary; it does not take copies")
        # The request comes in its wire form (`requests.WIRE_VIEWS`): each copy as sent.
        sent = list(request.copies)
        if len(sent) > MAX_BATCH:  # refused before any is read: each read copy costs memory
            raise InvalidRecord([("copies", f"holds {len(sent)} copies; a batch has at most {MAX_BATCH}")])
        received, unread = read_copies(sent)
        if unread:
            raise InvalidRecord(unread)
        bad = [
            (f"copies[{i}].user_id", "malformed user id")
            for i, c in enumerate(received)
            if not USER_ID.fullmatch(c.user_id)
        ]
        bad += [
            (f"copies[{i}].version", "must be at least 1") for i, c in enumerate(received) if c.version < 1
        ]
        if bad:
            raise InvalidRecord(bad)
        mark = request.high_water if request.HasField("high_water") else None
        # Checked as sent: the signature covers the key material cleared below.
        refused = refusals(home, records.region, mark, received, sent)
        # The lease epoch counts only as the home signed it (refusals found no fault in the mark).
        signed = not any(p.startswith("high_water") for p, _ in refused)
        epoch = mark.lease_epoch if mark is not None and signed else None
        sender = Sender(peer_of(context).uri, home.region, epoch)
        if not refused and received:
            # A stale worker's batch is refused before anything is logged of it (checked
            # again, and a higher epoch remembered, in the transaction that applies it) ...
            await self.node.db.call(lambda: check_lease_epoch(records.store, sender))
            # ... and a batch signed by the home may still be sealed to a shredded key.
            await self._refuse_stale_keys(received, sender.actor)
        # The region stores each copy without its key material, which goes to its keyring.
        copies = [incoming(c) for c in received]
        applied, skipped, refused = await self.node.db.write(
            lambda: apply_copies(records, copies, sender, refused),
            weight=len(copies),
            before=lambda: prepare_copy_keys(records, copies, refused),
        )
        if refused:
            raise InvalidRecord(refused)
        return replica_pb2.ApplyCopiesResponse(applied=applied, skipped=skipped)

    async def _refuse_stale_keys(self, copies: Any, actor: str) -> None:
        """A copy sealed to a key this region no longer holds (shredded, or replaced by a
        rekey) is refused and logged, and the batch with it: the primary must stop sealing to
        a leaked key. Tombstones carry no key and are always taken."""
        records = self.node.records
        keyring = records.keyring
        if keyring.suspended:  # what it holds may be behind another front end's rekey
            raise KeysBehind(keyring.suspended)
        current = "" if keyring.shredded else keyring.region_key.key_id
        stale = [c for c in copies if not c.deleted and c.key_id != current]
        if not stale:
            return
        held = f"its key was shredded: {keyring.shredded}" if keyring.shredded else f"it now holds {current}"
        why = (
            f"{len(stale)} copies are sealed to key {stale[0].key_id}, which {records.region} "
            f"no longer holds ({held})"
        )
        entries = [
            translog.entry(
                "replication",
                subject=c.user_id,
                source_region=records.rules.home_region,
                destination_region=records.region,
                outcome="denied",
                actor=actor,
                rules_version=records.rules.version,
                version=c.version,
                reason=why,
            )
            for c in stale
        ]
        await self.node.db.write(lambda: records.store.log_append(entries))
        raise KeyShredded(why, key_id=stale[0].key_id)

    @rpc
    async def GetRegionKey(self, request, context):
        """The region's current public key, as a statement signed with this node's
        certificate key, so that the primary can trust a key it has not seen; the statement
        carries the asker's nonce, so that it answers this ask and no later one."""
        if len(request.nonce) > MAX_NONCE:
            raise InvalidRecord([("nonce", f"holds {len(request.nonce)} bytes; at most {MAX_NONCE}")])
        keyring = self.node.records.keyring
        if keyring.suspended:  # its key may be behind another front end's rekey or shred
            raise KeysBehind(keyring.suspended)
        statement = replica_pb2.RegionKeyStatement(
            region=self.node.records.region, issued_at=codec.timestamp(time.time()), nonce=request.nonce
        )
        if keyring.shredded:
            statement.shredded = keyring.shredded
        else:
            recipient = keyring.region_key.recipient
            statement.key_id, statement.kem, statement.public_key = (
                recipient.key_id,
                recipient.kem,
                recipient.public_raw,
            )
        tls = self.node.tls
        if tls is None:
            raise FailedPrecondition("this node has no certificate to sign its key with")
        data = statement.SerializeToString()
        return replica_pb2.GetRegionKeyResponse(
            statement=data, signature=tls.sign(data), certificate=tls.cert_pem
        )
