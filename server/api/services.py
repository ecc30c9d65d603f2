"""The gRPC servicers. Thin: decode the request, call the core, encode the reply. Domain
errors become gRPC statuses in one place, `_status_for`."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from residency.server.api.intake import Checked, Intake, check_records
from residency.server.config.node import Affiliate
from residency.server.core import codec, merkle, translog
from residency.server.core.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidRecord,
    KeyUnavailable,
    NotFound,
    OutOfRange,
    PolicyDenied,
    ResidencyError,
    TransferDenied,
)
from residency.server.core.schema import USER_ID, data_uses
from residency.server.keys.crypto import SealError, hash_credential, verify_credential
from residency.server.storage.roles import ServiceStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.policy import ConsentChange, Disclosure, Policy, refusal_error
from residency.server.vault.records import Caller, Records, Write
from residency.server.vault.transferlog import LogEntry, SignedCheckpoint, TransferLog
from residency.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    consent_pb2,
    consent_pb2_grpc,
    disclosure_pb2,
    disclosure_pb2_grpc,
    records_pb2,
    records_pb2_grpc,
    replica_pb2,
    replica_pb2_grpc,
    translog_pb2,
    translog_pb2_grpc,
)

log = logging.getLogger("residency.services")
IDENTITY_KEY = "x-residency-identity"
MAX_BATCH = 1000

_CODES = {
    InvalidRecord: code_pb2.INVALID_ARGUMENT,
    ConfigError: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    OutOfRange: code_pb2.OUT_OF_RANGE,
    TransferDenied: code_pb2.PERMISSION_DENIED,
    PolicyDenied: code_pb2.PERMISSION_DENIED,
    KeyUnavailable: code_pb2.UNAVAILABLE,
    SealError: code_pb2.FAILED_PRECONDITION,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
}


def _status_for(e: ResidencyError) -> status_pb2.Status:
    code = next((c for t, c in _CODES.items() if isinstance(e, t)), code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=str(e))
    if isinstance(e, InvalidRecord):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in e.violations
                ]
            )
        )
        status.details.append(detail)
    return status


def rpc(method: Callable) -> Callable:
    """Maps domain errors raised by a servicer method (unary or streaming) to statuses."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async for item in method(self, request, context):
                    yield item
            except ResidencyError as e:
                await context.abort_with_status(rpc_status.to_status(_status_for(e)))

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ResidencyError as e:
            await context.abort_with_status(rpc_status.to_status(_status_for(e)))

    return unary


class Node:
    """What the servicers share: the records engine, the store thread, the replicator."""

    def __init__(
        self,
        records: Records,
        db: StoreThread[ServiceStore],
        replicator: Any = None,
        affiliates: tuple[Affiliate, ...] = (),
        transfer_log: TransferLog | None = None,
        intake: Intake | None = None,
    ):
        self.records = records
        self.db = db
        # Reads and checks PutRecords requests (large ones in helper processes).
        self.intake = intake or Intake(records.schema, records.region, workers=0)
        # The in-process replication worker, if this node runs one (it is woken on writes).
        self.replicator = replicator
        # Replication destinations; their state is in the store, whichever worker ships.
        self.affiliates = {a.region: a for a in affiliates}
        self.transfer_log = transfer_log
        self.policy = Policy(records)
        self.hashing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="scrypt")
        # Re-projection after a rules change: (done, total).
        self.backfill = (0, 0)
        self.reload_rules: Any = None

    def wake(self) -> None:
        if self.replicator is not None:
            self.replicator.wake()

    def caller(self, ctx: common_pb2.CallContext, context: grpc.aio.ServicerContext) -> Caller:
        identity = ""
        for key, value in context.invocation_metadata() or ():
            if key == IDENTITY_KEY:
                identity = value
        if identity and ctx.location in self.records.rules.regions and ctx.purpose in data_uses():
            return Caller(identity, ctx.location, ctx.purpose)
        bad = []
        if ctx.location not in self.records.rules.regions:
            bad.append(
                (
                    "context.location",
                    f"unknown region {ctx.location!r}; known: {sorted(self.records.rules.regions)}",
                )
            )
        if ctx.purpose not in data_uses():
            bad.append(("context.purpose", f"{ctx.purpose!r} is not a Fides data use"))
        if not identity:
            bad.append((f"metadata.{IDENTITY_KEY}", "the caller's identity is required"))
        if bad:
            raise InvalidRecord(bad)
        return Caller(identity, ctx.location, ctx.purpose)


class RecordService(records_pb2_grpc.RecordServiceServicer):
    def __init__(self, node: Node):
        self.node = node
        self.records = node.records

    def _primary_only(self) -> None:
        primary_only(self.node)

    def _writes(self, checked: Checked) -> list[Write]:
        """The writes of checked records, or InvalidRecord with every violation."""
        if checked.bad:
            raise InvalidRecord(checked.bad)
        return [Write(u, source, body, cookies) for u, source, body, cookies in checked.writes]

    async def _hash_credentials(self, writes: list[Write], secrets: list[int]) -> None:
        """Credentials are replaced by their scrypt hash before they go anywhere."""
        loop, credential = asyncio.get_running_loop(), self.records.schema.credential_fields
        run = functools.partial(loop.run_in_executor, self.node.hashing, hash_credential)
        jobs = []
        for i in secrets:
            body = records_pb2.Record.FromString(writes[i].body)
            hashes = {n: run(body.fields[n].string_value) for n in credential.intersection(body.fields)}
            jobs.append((i, body, hashes))
        for i, body, hashes in jobs:
            for name, job in hashes.items():
                body.fields[name].CopyFrom(common_pb2.Value(bytes_value=await job))
            writes[i].body = body.SerializeToString()

    @rpc
    async def PutRecord(self, request, context):
        self._primary_only()
        self.node.caller(request.context, context)
        records = self.records
        checked = check_records(records.schema, records.region, [request.record], "record")
        writes = self._writes(checked)
        if checked.secrets:
            await self._hash_credentials(writes, checked.secrets)
        (version,) = await self.node.db.write_many(records.put, writes)
        w = writes[0]
        self._wake()
        return records_pb2.PutRecordResponse(user_id=w.user_id, version=version)

    @rpc
    async def PutRecords(self, request, context):
        """`request` is the request's bytes (see `add_record_service`): a large one is read
        and checked by a helper process."""
        self._primary_only()
        try:
            got = await self.node.intake.check(request)
        except DecodeError as e:
            raise InvalidRecord([("request", f"not a serialized residency.v1.PutRecordsRequest: {e}")]) from e
        self.node.caller(got.context, context)
        if not 1 <= got.count <= MAX_BATCH:
            raise InvalidRecord([("records", f"{got.count} records; send 1 to {MAX_BATCH}")])
        writes = self._writes(got.checked)
        if got.checked.secrets:
            await self._hash_credentials(writes, got.checked.secrets)
        versions = await self.node.db.write_many(self.records.put, writes)
        self._wake()
        return records_pb2.PutRecordsResponse(
            results=[
                records_pb2.PutRecordResponse(user_id=w.user_id, version=v)
                for w, v in zip(writes, versions, strict=True)
            ]
        )

    @rpc
    async def GetRecord(self, request, context):
        caller = self.node.caller(request.context, context)
        _check_user(request.user_id)
        if caller.location == self.records.region:
            result = await self.node.db.call(self.records.read, request.user_id, caller)
        else:  # a cross-location read writes its transfer-log entry before it answers
            result = await self.node.db.write(lambda: self.records.read(request.user_id, caller))
        if result.denied:
            raise TransferDenied(f"{result.denied} (transfer-log entry {result.log_sequence})")
        rec = result.record
        reply = records_pb2.GetRecordResponse(log_sequence=result.log_sequence)
        out = reply.record
        out.user_id, out.version, out.source, out.home_region = (
            rec.user_id,
            rec.version,
            rec.source,
            rec.home_region,
        )
        out.created_at.CopyFrom(codec.timestamp(rec.created_at))
        out.updated_at.CopyFrom(codec.timestamp(rec.updated_at))
        for name, value in rec.fields.items():
            out.fields[name].CopyFrom(value)
        schema = self.records.schema.fields
        reply.withheld.extend(
            common_pb2.WithheldField(field=n, category=schema[n].category, reason=w.reason, detail=w.detail)
            for n, w in sorted(result.withheld.items())
        )
        return reply

    @rpc
    async def DeleteRecord(self, request, context):
        self._primary_only()
        self.node.caller(request.context, context)
        _check_user(request.user_id)
        version = await self.node.db.write(lambda: self.records.delete(request.user_id))
        self._wake()
        return records_pb2.DeleteRecordResponse(user_id=request.user_id, version=version)

    @rpc
    async def VerifyCredential(self, request, context):
        self._primary_only()
        caller = self.node.caller(request.context, context)
        _check_user(request.user_id)
        spec = self.records.schema.fields.get(request.field)
        if spec is None or not spec.credential:
            raise InvalidRecord([("field", f"{request.field!r} is not a credential field of the schema")])
        if caller.location != self.records.region:
            raise TransferDenied(f"credentials are verified in {self.records.region} only")
        stored = await self.node.db.call(self.records.credential, request.user_id, request.field)
        match = bool(stored) and await asyncio.get_running_loop().run_in_executor(
            self.node.hashing, verify_credential, request.secret, stored
        )
        return records_pb2.VerifyCredentialResponse(match=match)

    def _wake(self) -> None:
        self.node.wake()


def add_record_service(servicer: RecordService, server: Any) -> None:
    """Registers RecordService as the generated `add_RecordServiceServicer_to_server` does,
    except that `PutRecords` takes its request as bytes: the servicer reads it, in a helper
    process when it is large. The wire format is unchanged."""

    class Capture:
        handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
            self.handlers = handlers

    capture = Capture()
    records_pb2_grpc.add_RecordServiceServicer_to_server(servicer, capture)
    handlers = dict(capture.handlers)
    handlers["PutRecords"] = grpc.unary_unary_rpc_method_handler(
        servicer.PutRecords,
        request_deserializer=None,
        response_serializer=records_pb2.PutRecordsResponse.SerializeToString,
    )
    name = records_pb2.DESCRIPTOR.services_by_name["RecordService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def primary_only(node: Node) -> None:
    if not node.records.primary:
        raise FailedPrecondition(
            f"{node.records.region} holds copies only; send this to the home region's primary"
        )


def _check_user(user_id: str) -> None:
    if not USER_ID.fullmatch(user_id):
        raise InvalidRecord([("user_id", "must be 1-128 characters from [A-Za-z0-9._:@-]")])


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
        copies = list(request.copies)
        applied, skipped = await self.node.db.write(lambda: records.apply(copies), weight=len(copies))
        return replica_pb2.ApplyCopiesResponse(applied=applied, skipped=skipped)


class TransferLogService(translog_pb2_grpc.TransferLogServiceServicer):
    PAGE = 1000
    QUERY_PAGE, QUERY_PAGE_MAX = 500, 5000
    QUERY_SCAN = 20_000  # entries looked at per store-thread turn

    def __init__(self, node: Node):
        self.node = node

    @property
    def log(self) -> TransferLog:
        if self.node.transfer_log is None:
            raise FailedPrecondition("this node has no log signing key; checkpoints and proofs are off")
        return self.node.transfer_log

    @rpc
    async def TailEntries(self, request, context):
        after, left = request.after_sequence, request.limit or None
        store = self.node.db.store
        while left is None or left > 0:
            page = await self.node.db.call(store.log_after, after, min(self.PAGE, left or self.PAGE))
            if not page:
                return
            for seq, data, chain in page:
                yield translog_pb2.TailEntriesResponse(
                    sequence=seq, entry_json=data.decode(), chain_hash=chain, leaf_hash=merkle.leaf_hash(data)
                )
            after = page[-1][0]
            if left is not None:
                left -= len(page)

    @rpc
    async def Query(self, request, context):
        f = translog.Filter(
            subject=request.subject,
            region=request.region,
            recipient=request.recipient,
            kind=request.kind,
            purpose=request.purpose,
            legal_basis=request.legal_basis,
            outcome=request.outcome,
            since=_secs(request.since) if request.HasField("since") else None,
            until=_secs(request.until) if request.HasField("until") else None,
        )
        page_size = request.page_size or self.QUERY_PAGE
        if page_size > self.QUERY_PAGE_MAX:
            raise InvalidRecord([("page_size", f"at most {self.QUERY_PAGE_MAX}")])
        after = _page_token(request.page_token)
        left = request.limit or None
        entries: list[LogEntry] = []
        while True:
            room = page_size - len(entries)
            want = min(room, left) if left is not None else room
            found, after, more = await self.node.db.call(self.log.query, f, after, want, self.QUERY_SCAN)
            entries += found
            if left is not None:
                left -= len(found)
            done = not more or left == 0
            if len(entries) == page_size or done:  # a page is full, or the last one
                yield translog_pb2.QueryResponse(
                    entries=[_entry(e) for e in entries], next_page_token=str(after) if more else ""
                )
                entries = []
            if done:
                return

    @rpc
    async def GetCheckpoint(self, request, context):
        cp = await self.node.db.call(self.log.checkpoint, request.refresh)
        return self._checkpoint(cp)

    def _checkpoint(self, cp: SignedCheckpoint) -> translog_pb2.GetCheckpointResponse:
        return translog_pb2.GetCheckpointResponse(
            checkpoint=cp.note, tree_size=cp.size, root_hash=cp.root, verifier_key=self.log.verifier_key
        )

    @rpc
    async def ProveInclusion(self, request, context):
        log_ = self.log
        size = request.tree_size

        def prove() -> tuple[list[bytes], bytes, bytes]:
            hashes, leaf = log_.prove_inclusion(request.leaf_index, size)
            return hashes, leaf, log_.store.log_tree().root(size)

        hashes, leaf, root = await self.node.db.call(prove)
        return translog_pb2.ProveInclusionResponse(
            leaf_index=request.leaf_index, tree_size=size, hashes=hashes, leaf_hash=leaf, root_hash=root
        )

    @rpc
    async def ProveConsistency(self, request, context):
        hashes = await self.node.db.call(self.log.prove_consistency, request.from_size, request.tree_size)
        return translog_pb2.ProveConsistencyResponse(
            from_size=request.from_size, tree_size=request.tree_size, hashes=hashes
        )

    @rpc
    async def SubjectReport(self, request, context):
        _check_user(request.subject)
        log_ = self.log
        # The checkpoint first: the entries are read up to the size it covers, a bounded
        # stretch per store-thread turn so writes keep flowing meanwhile.
        cp = await self.node.db.call(log_.checkpoint, True)
        f = translog.Filter(subject=request.subject)
        entries: list[LogEntry] = []
        after, more = 0, cp.size > 0
        while more and after < cp.size:
            found, after, more = await self.node.db.call(log_.query, f, after, 1 << 30, self.QUERY_SCAN)
            entries += [e for e in found if e.sequence <= cp.size]
        named = {r for e in entries for r in str(json.loads(e.data).get("recipient", "")).split(",") if r}
        rules = self.node.records.rules
        return translog_pb2.SubjectReportResponse(
            subject=request.subject,
            entries=[_entry(e) for e in entries],
            recipients=[_recipient(rules.recipients[r]) for r in sorted(named) if r in rules.recipients],
            checkpoint=self._checkpoint(cp),
        )

    @rpc
    async def GetReviewContext(self, request, context):
        records = self.node.records
        return translog_pb2.GetReviewContextResponse(
            region=records.region,
            home_region=records.rules.home_region,
            recipients=[_recipient(r) for _, r in sorted(records.rules.recipients.items())],
            sensitive_fields=sorted(n for n, f in records.schema.fields.items() if f.sensitive),
            rules_version=records.rules.version,
        )


def _entry(e: LogEntry) -> translog_pb2.LogEntry:
    return translog_pb2.LogEntry(
        sequence=e.sequence, leaf_index=e.leaf_index, entry_json=e.data.decode(), leaf_hash=e.leaf_hash
    )


def _recipient(r: Any) -> translog_pb2.Recipient:
    return translog_pb2.Recipient(id=r.id, region=r.region, company=r.company, contact=r.contact)


def _secs(ts: Any) -> float:
    return ts.seconds + ts.nanos / 1e9


def _page_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidRecord([("page_token", "not a token this service issued")])
    return int(token)


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

        s = await self.node.db.call(gather)
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
        )

    @rpc
    async def ExplainTransfer(self, request, context):
        _check_user(request.user_id)
        policy = self.node.policy
        items = await self.node.db.call(policy.explain, request.user_id, request.to, request.purpose)
        return admin_pb2.ExplainTransferResponse(
            user_id=request.user_id,
            to=request.to,
            purpose=request.purpose,
            rules_version=self.node.records.rules.version,
            fields=[admin_pb2.FieldDecision(**i) for i in items],
        )

    @rpc
    async def ApplyRules(self, request, context):
        primary_only(self.node)
        identity = dict(context.invocation_metadata() or ()).get(IDENTITY_KEY, "operator")
        prev, version, total = await self.node.reload_rules(request.rules_yaml.encode(), identity, True)
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

    @rpc
    async def PauseReplication(self, request, context):
        region = self._affiliate(request.region)
        await self.node.db.write(lambda: self.node.db.store.set_paused(region, True))
        log.info("replication to %s paused", region)
        return admin_pb2.PauseReplicationResponse()

    @rpc
    async def ResumeReplication(self, request, context):
        region = self._affiliate(request.region)
        await self.node.db.write(lambda: self.node.db.store.set_paused(region, False))
        log.info("replication to %s resumed", region)
        self._wake()
        return admin_pb2.ResumeReplicationResponse()

    @rpc
    async def RetryDeadLetters(self, request, context):
        region = self._affiliate(request.region) if request.region else None
        marked = await self.node.db.write(lambda: self.node.db.store.request_retry(region))
        self._wake()
        return admin_pb2.RetryDeadLettersResponse(marked=marked)

    def _wake(self) -> None:
        if self.node.replicator is not None:
            self.node.replicator.wake()


def _consent_changes(consents: Any) -> list[ConsentChange]:
    return [ConsentChange(c.user_id, c.purpose, c.recipient, c.sensitive, c.evidence) for c in consents]


class ConsentService(consent_pb2_grpc.ConsentServiceServicer):
    """Policy 2a, 2c and 5: consents per user, purpose and recipient."""

    def __init__(self, node: Node):
        self.node = node

    async def _set(self, request, context, withdraw: bool) -> int:
        primary_only(self.node)
        caller = self.node.caller(request.context, context)
        changes = _consent_changes(request.consents)
        policy = self.node.policy
        policy.check_consents(changes)
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
        self.node.caller(request.context, context)
        _check_user(request.user_id)
        rows = await self.node.db.call(self.node.db.store.consents, [request.user_id], True)
        return consent_pb2.ListConsentsResponse(
            consents=[
                consent_pb2.Consent(
                    user_id=u,
                    purpose=p,
                    recipient=r,
                    sensitive=bool(s),
                    evidence=e,
                    actor=a,
                    granted_at=codec.timestamp(g),
                    withdrawn_at=codec.timestamp(w) if w else None,
                )
                for u, p, r, s, g, w, e, a in rows
            ]
        )


class GrantService(consent_pb2_grpc.GrantServiceServicer):
    """Policy 2a: a third party's access ends with the service it helps provide."""

    def __init__(self, node: Node):
        self.node = node

    @rpc
    async def CreateGrant(self, request, context):
        primary_only(self.node)
        caller = self.node.caller(request.context, context)
        g = request.grant
        spec = {
            "id": g.id,
            "recipient": g.recipient,
            "purpose": g.purpose,
            "legal_basis": g.legal_basis or "contract",
            "categories": list(g.categories),
            "ends_at": g.ends_at.seconds + g.ends_at.nanos / 1e9,
        }
        users = list(dict.fromkeys(g.user_ids))
        policy = self.node.policy
        grant_id = await self.node.db.write(lambda: policy.create_grant(spec, users, caller.identity))
        self.node.wake()
        return consent_pb2.CreateGrantResponse(id=grant_id)

    @rpc
    async def RevokeGrant(self, request, context):
        primary_only(self.node)
        caller = self.node.caller(request.context, context)
        policy = self.node.policy
        revoked = await self.node.db.write(lambda: policy.revoke_grant(request.id, caller.identity))
        self.node.wake()
        return consent_pb2.RevokeGrantResponse(revoked=revoked)

    @rpc
    async def ListGrants(self, request, context):
        self.node.caller(request.context, context)
        rows = await self.node.db.call(self.node.db.store.grants_list)
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
                )
                for i, r, p, b, c, created, ends, revoked, _, n in rows
            ]
        )


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
        primary_only(self.node)
        caller = self.node.caller(request.context, context)
        _check_user(request.user_id)
        ground = _GROUND_NAMES.get(request.ground)
        if ground is None:
            raise InvalidRecord([("ground", "name one of the policy's grounds 3a-3g")])
        d = Disclosure(
            request.user_id,
            request.third_party,
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
