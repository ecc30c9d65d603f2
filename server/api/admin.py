"""AdminService: node status, explaining a transfer, applying rules, controlling replication
(status, pause, resume, dead-letter retry) and the node's own keys (rotate, rewrap, retire,
shred, rekey; the blind-index key's rotation)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from residency.server.api.context import Node, check_user
from residency.server.api.errors import rpc
from residency.server.api.identity import peer_of
from residency.server.core import codec, translog
from residency.server.core.errors import FailedPrecondition, InvalidRecord, NotFound, ResidencyError
from residency.server.vault import replication_control as control
from residency.server.vault.key_lifecycle import KeyLifecycle
from residency.v1 import admin_pb2, admin_pb2_grpc, replica_pb2

log = logging.getLogger("residency.admin")


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, node: Node, role: str):
        self.node = node
        self.role = role

    @rpc
    async def GetNodeStatus(self, request, context):
        records, store = self.node.records, self.node.db.store

        def gather() -> dict[str, Any]:
            live, dead = store.counts()
            fields: dict[str, int] = {}
            after = ""
            # Copies name their fields outside the seal; home records keep even that sealed.
            while not records.primary and (page := store.live_blobs(after, 2000)):
                for _user_id, blob in page:
                    for name in replica_pb2.SealedCopy.FromString(blob).sealed_fields:
                        fields[name] = fields.get(name, 0) + 1
                after = page[-1][0]
            return {"live": live, "dead": dead, "log": store.log_count(), "fields": fields}

        health = self.node.health
        try:
            s = await self.node.db.call(gather)
        except Exception:  # the store is what is wrong: say so rather than fail the status
            log.exception("node status: the store cannot be read")
            s = {"live": 0, "dead": 0, "log": 0, "fields": {}}
        keys = self._keys()
        try:  # the status answers with the key service down too, and never holds up writes
            key_version = await asyncio.to_thread(keys.newest_version)
        except ResidencyError:
            key_version = ""
        return admin_pb2.GetNodeStatusResponse(
            region=records.region,
            role=self.role,
            records=s["live"],
            tombstones=s["dead"],
            log_entries=s["log"],
            rules_version=records.rules.version,
            field_counts=s["fields"],
            rules_backfill_done=self.node.backfill[0],
            rules_backfill_total=self.node.backfill[1],
            certificate_expires=codec.timestamp(self.node.tls.expires.timestamp()) if self.node.tls else None,
            key_version=key_version,
            region_key_id=keys.region_key_id(),
            ready=health is not None and not health.problems,
            not_ready_because=health.problems if health is not None else [],
            index_key_version=await keys.index.active_version(),
            index_rebuild_version=keys.index.version,
            index_rebuild_done=keys.index.done if keys.index.version else 0,
            index_rebuild_total=keys.index.total if keys.index.version else 0,
        )

    @rpc
    async def ExplainTransfer(self, request, context):
        check_user(request.user_id)
        policy, records, caller = self.node.policy, self.node.records, peer_of(context)
        # A region node answers from the copy it holds, by the policies its fields came with.
        explain = policy.explain if records.primary else policy.explain_copy

        def logged() -> list[dict[str, Any]]:
            """The answer, and an entry saying who learned which fields the user's record holds
            (names and categories, no values), in one transaction: no answer unlogged."""
            items = explain(request.user_id, request.to, request.purpose or None)
            about = f"{request.to}" + (f" for {request.purpose}" if request.purpose else "")
            entry = translog.entry(
                "access",
                subject=request.user_id,
                source_region=records.region,
                destination_region=caller.region,
                outcome="allowed",
                actor=caller.uri,
                rules_version=records.rules.version,
                reason=f"explain: which of the record's {len(items)} fields go to {about} (names, no values)",
            )
            records.store.log_append([entry])
            return items

        items = await self.node.db.write(logged)
        return admin_pb2.ExplainTransferResponse(
            user_id=request.user_id,
            to=request.to,
            purpose=request.purpose,
            rules_version=self.node.records.rules.version,
            fields=[admin_pb2.FieldDecision(**i) for i in items],
        )

    @rpc
    async def ApplyRules(self, request, context):
        self.node.primary_only()
        identity = peer_of(context).uri
        # Errors name the request's field: the node's own file path means nothing to the caller.
        rules = request.rules_yaml.encode()
        prev, version, total = await self.node.reload_rules(rules, identity, True, "rules_yaml")
        return admin_pb2.ApplyRulesResponse(
            previous_version=prev, version=version, records_to_reproject=total
        )

    def _affiliate(self, region: str) -> str:
        if not self.node.affiliates:
            raise FailedPrecondition("this node replicates to no destination")
        if region not in self.node.affiliates:
            raise NotFound(
                f"no replication destination {region!r}; destinations: {sorted(self.node.affiliates)}"
            )
        return region

    @rpc
    async def ReplicationStatus(self, request, context):
        affiliates = self.node.affiliates
        if not affiliates:
            raise FailedPrecondition("this node replicates to no destination")
        store = self.node.db.store
        s = await self.node.db.call(lambda: store.replication_status(list(affiliates), time.time()))
        return admin_pb2.ReplicationStatusResponse(
            head_sequence=s["head"],
            destinations=[
                admin_pb2.DestinationStatus(
                    region=region,
                    address=a.target,
                    sink=a.sink,
                    max_rate=a.max_rate,
                    **s["destinations"][region],
                )
                for region, a in affiliates.items()
            ],
        )

    def _operator(self, context: grpc.aio.ServicerContext) -> control.Operator:
        records = self.node.records
        return control.Operator(peer_of(context).uri, records.region, records.rules.version)

    async def _set_paused(self, request_region: str, paused: bool, context: grpc.aio.ServicerContext) -> None:
        region = self._affiliate(request_region)
        by, store = self._operator(context), self.node.db.store
        await self.node.db.write(lambda: control.set_paused(store, by, region, paused))
        log.info("replication to %s %s", region, "paused" if paused else "resumed")

    @rpc
    async def PauseReplication(self, request, context):
        await self._set_paused(request.region, True, context)
        return admin_pb2.PauseReplicationResponse()

    @rpc
    async def ResumeReplication(self, request, context):
        await self._set_paused(request.region, False, context)
        self.node.wake()
        return admin_pb2.ResumeReplicationResponse()

    @rpc
    async def RetryDeadLetters(self, request, context):
        """Every destination of this node unless the request names one."""
        regions = [self._affiliate(request.region)] if request.region else list(self.node.affiliates)
        by, store = self._operator(context), self.node.db.store
        marked = await self.node.db.write(lambda: control.retry(store, by, regions))
        self.node.wake()
        return admin_pb2.RetryDeadLettersResponse(marked=marked)

    # ---- the node's keys: thin; `KeyLifecycle` does the acts, one at a time, and logs them ----

    def _keys(self) -> KeyLifecycle:
        assert self.node.keys is not None, "the node assembles its key lifecycle at start"
        return self.node.keys

    @rpc
    async def RotateKeys(self, request, context):
        _short("from_version", request.from_version)
        out = await self._keys().rotate(peer_of(context).uri, request.from_version)
        return admin_pb2.RotateKeysResponse(**out)

    @rpc
    async def RewrapKeys(self, request, context):
        return admin_pb2.RewrapKeysResponse(**await self._keys().rewrap(peer_of(context).uri))

    @rpc
    async def RetireKeys(self, request, context):
        return admin_pb2.RetireKeysResponse(**await self._keys().retire(peer_of(context).uri))

    @rpc
    async def ShredRegionKey(self, request, context):
        _short("key_id", request.key_id)
        _short("reason", request.reason, REASON_LENGTH)
        out = await self._keys().shred(peer_of(context).uri, request.key_id, request.reason)
        return admin_pb2.ShredRegionKeyResponse(**out)

    @rpc
    async def RekeyRegionKey(self, request, context):
        return admin_pb2.RekeyRegionKeyResponse(**await self._keys().rekey(peer_of(context).uri))

    @rpc
    async def RotateIndexKey(self, request, context):
        out = await self._keys().index.rotate(peer_of(context).uri, request.from_version)
        return admin_pb2.RotateIndexKeyResponse(**out)


# A shred's reason is logged: a sentence, not a document.
REASON_LENGTH = 500


def _short(field: str, value: str, limit: int = 64) -> None:
    if len(value) > limit or not value.isprintable():
        raise InvalidRecord([(field, f"at most {limit} printable characters")])
