"""RecordService: put, get, find (by a lookup field) and delete records, verify a credential,
and export a data subject's record (`subject`), on the node that holds them."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from residency.server.api.context import Node, check_user
from residency.server.api.errors import rpc
from residency.server.api.identity import at_home_only, caller_of
from residency.server.api.intake import Checked, check_records
from residency.server.api.messages import record_message, withheld_messages
from residency.server.api.subject import export_subject
from residency.server.core.errors import InvalidRecord, RateLimited, ResidencyError, TransferDenied
from residency.server.core.lookup import DEFAULT_FIND, MAX_FIND
from residency.server.core.policy.credentials import hash_credential, verify_credential
from residency.server.core.policy.opaque import oversize
from residency.server.vault.credentials import rehash_credential, stored_credential
from residency.server.vault.finding import Finder, check_token
from residency.server.vault.records import Caller, ReadResult, Write
from residency.v1 import common_pb2, records_pb2, records_pb2_grpc

log = logging.getLogger("residency.records")
MAX_BATCH = 1000


class RecordService(records_pb2_grpc.RecordServiceServicer):
    def __init__(self, node: Node):
        self.node = node
        self.records = node.records

    def _writes(self, checked: Checked) -> list[Write]:
        """The writes of checked records, or InvalidRecord with every violation."""
        if checked.bad:
            raise InvalidRecord(checked.bad)
        return [
            Write(u, source, body, cookies, lookup=found)
            for u, source, body, cookies, found in checked.writes
        ]

    async def _hash_credentials(self, writes: list[Write], secrets: list[int]) -> None:
        """Credentials are replaced by their hash before they go anywhere."""
        loop, credential = asyncio.get_running_loop(), self.records.schema.credential_fields

        def run(secret: str) -> asyncio.Future[bytes]:
            return loop.run_in_executor(self.node.hashing, hash_credential, secret)

        jobs = []
        for i in secrets:
            body = records_pb2.Record.FromString(writes[i].body)
            hashes = {n: run(body.fields[n].string_value) for n in credential.intersection(body.fields)}
            jobs.append((i, body, hashes))
        for i, body, hashes in jobs:
            for name, job in hashes.items():
                body.fields[name].CopyFrom(common_pb2.Value(bytes_value=await job))
            writes[i].body = body.SerializeToString()

    async def _writer_at_home(self, caller: Caller, users: list[str]) -> None:
        """Refuses, logged against each user, a write by a caller located outside the home
        region: what it wrote it could read back from there in a rule's form (a `hash` of a
        guess, to compare with other users' hashes), and data is collected at home."""
        await at_home_only(self.node, caller, "records.write", "records are written from", users)

    @rpc
    async def PutRecord(self, request, context):
        self.node.primary_only()
        caller = await caller_of(self.node, request.context, context, [request.record.user_id])
        await self._writer_at_home(caller, [request.record.user_id])
        records = self.records
        checked = check_records(records.schema, records.region, [request.record], "record")
        writes = self._writes(checked)
        if checked.secrets:
            await self._hash_credentials(writes, checked.secrets)
        (version,) = await self.node.db.write_many(records.put, writes, records.prepare_keys)
        w = writes[0]
        self.node.wake()
        return records_pb2.PutRecordResponse(user_id=w.user_id, version=version)

    @rpc
    async def PutRecords(self, request, context):
        """`request` is the request's bytes (see `add_record_service`): a large one is read
        and checked by a helper process."""
        self.node.primary_only()
        try:
            got = await self.node.intake.check(request)
        except DecodeError as e:
            raise InvalidRecord([("request", "not a serialized residency.v1.PutRecordsRequest")]) from e
        users = [w[0] for w in got.checked.writes]
        await self._writer_at_home(await caller_of(self.node, got.context, context, users), users)
        if not 1 <= got.count <= MAX_BATCH:
            raise InvalidRecord([("records", f"{got.count} records; send 1 to {MAX_BATCH}")])
        writes = self._writes(got.checked)
        if got.checked.secrets:
            await self._hash_credentials(writes, got.checked.secrets)
        versions = await self.node.db.write_many(self.records.put, writes, self.records.prepare_keys)
        self.node.wake()
        return records_pb2.PutRecordsResponse(
            results=[
                records_pb2.PutRecordResponse(user_id=w.user_id, version=v)
                for w, v in zip(writes, versions, strict=True)
            ]
        )

    @rpc
    async def GetRecord(self, request, context):
        caller = await caller_of(self.node, request.context, context, [request.user_id])
        check_user(request.user_id)
        if not self.records.primary:  # a copy: read as its policy says, and logged, every time
            result = await self.node.db.write(lambda: self.node.policy.read_copy(request.user_id, caller))
        elif caller.location == self.records.region and caller.role != "recipient":
            result = await self.node.db.call(self.records.read, request.user_id, caller)
        else:  # a cross-location or a recipient's read writes its log entry before it answers
            result = await self.node.db.write(lambda: self.records.read(request.user_id, caller))
        if result.denied:
            raise TransferDenied(f"{result.denied} (transfer-log entry {result.log_sequence})")
        return self._reply(result)

    @rpc
    async def FindRecords(self, request, context):
        caller = await caller_of(self.node, request.context, context)
        records, policy = self.records, self.node.policy
        if records.primary:
            finder = Finder(records, lambda u, c, f: records.read(u, c, found_by=f), records.findable)
        else:
            finder = Finder(
                records, lambda u, c, f: policy.read_copy(u, c, found_by=f), policy.findable_copies
            )
        normalized = finder.check(request.field, request.value)
        limit = request.limit or DEFAULT_FIND
        if limit > MAX_FIND:
            raise InvalidRecord([("limit", f"{limit}; ask for 1 to {MAX_FIND} (0: {DEFAULT_FIND})")])
        token = request.page_token
        check_token(token)
        if why := finder.searchable(request.field, caller):
            seq = await self.node.db.write(lambda: finder.refuse(request.field, caller, why))
            raise TransferDenied(f"{why} (transfer-log entry {seq})")
        found = await self.node.db.write(lambda: finder.find(request.field, normalized, caller, token, limit))
        return records_pb2.FindRecordsResponse(
            results=[self._reply(r) for r in found.results], next_page_token=found.next_page_token
        )

    def _reply(self, result: ReadResult) -> records_pb2.GetRecordResponse:
        return records_pb2.GetRecordResponse(
            log_sequence=result.log_sequence,
            record=record_message(result.record),
            withheld=withheld_messages(self.records.schema, result.withheld),
            forms=result.forms,
        )

    @rpc
    async def ExportSubject(self, request, context):
        async for message in export_subject(self.node, request, context):
            yield message

    @rpc
    async def DeleteRecord(self, request, context):
        self.node.primary_only()
        caller = await caller_of(self.node, request.context, context, [request.user_id])
        check_user(request.user_id)
        # An erasure is a write: from abroad it would destroy what the home region keeps.
        await self._writer_at_home(caller, [request.user_id])
        version = await self.node.db.write(
            lambda: self.records.delete(request.user_id, caller.identity, caller.purpose)
        )
        self.node.wake()
        return records_pb2.DeleteRecordResponse(user_id=request.user_id, version=version)

    @rpc
    async def VerifyCredential(self, request, context):
        self.node.primary_only()
        caller = await caller_of(self.node, request.context, context, [request.user_id])
        check_user(request.user_id)
        spec = self.records.schema.fields.get(request.field)
        if spec is None or not spec.credential:
            raise InvalidRecord([("field", f"{request.field!r} is not a credential field of the schema")])
        # As it was stored, however composed: no secret that long was, not worth the hashing.
        if size := oversize(request.secret, spec.max_bytes):
            raise InvalidRecord([("secret", f"{size} bytes; the field's limit is {spec.max_bytes}")])
        what, users = "credentials are verified in", [request.user_id]
        await at_home_only(self.node, caller, "credentials.verify", what, users, "remote_read")
        # A refusal seen already costs nothing; then a read, so that a caller past its limit
        # costs no write; then taken in a write, where no other front end counts meanwhile.
        buckets, user, who = self.node.verify_buckets, request.user_id, caller.identity
        refused = buckets.refused(user, who) or await self.node.db.call(buckets.check, user, who)
        if refused is None:
            refused = await self.node.db.write(lambda: buckets.take(user, who))
        if refused is not None:
            limit, wait = refused
            about = "about this user" if limit == "user" else "by this caller"
            raise RateLimited(f"too many credential checks {about}; retry in {math.ceil(wait)} s", wait)
        stored = await self.node.db.call(stored_credential, self.records, request.user_id, request.field)
        # Unknown users and users without this credential cost the same verify as the others.
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(self.node.hashing, verify_credential, request.secret, stored)
        if verdict.rehash:
            await self._rehash(request.user_id, request.field, stored, request.secret)
        return records_pb2.VerifyCredentialResponse(match=verdict.match)

    async def _rehash(self, user_id: str, field: str, stored: bytes, secret: str) -> None:
        """Stores the secret that just matched under today's hash, in its own transaction;
        if that fails the old hash stays, and still verifies."""
        new = await asyncio.get_running_loop().run_in_executor(self.node.hashing, hash_credential, secret)
        try:
            if await self.node.db.write(lambda: rehash_credential(self.records, user_id, field, stored, new)):
                self.node.wake()
        except ResidencyError as e:  # its text may name the user: the log gets only its kind
            log.warning("a verified credential was not rehashed (%s); its old hash stays", type(e).__name__)


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
