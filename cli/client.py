"""A typed client for one node, built on `residency.cli.channel`: the calls the demo and the
reviewer commands make, each returning plain values or the reply message."""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.cli.channel import Credentials
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
    translog_pb2,
    translog_pb2_grpc,
)


class Client:
    """`async with Client(target, credentials) as node:` one mutual TLS channel, the caller
    being the identity of `credentials`' certificate, `timeout` seconds per call unless a call
    says otherwise."""

    def __init__(self, target: str, credentials: Credentials, timeout: float = 30.0):
        self.target = target
        self.timeout = timeout
        self.credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Client:
        self._channel = self.credentials.channel(
            self.target
        )  # made here: a channel belongs to the running loop
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._channel is not None:
            await self._channel.close()

    @property
    def _ch(self) -> grpc.aio.Channel:
        assert self._channel is not None, "use the client as `async with`"
        return self._channel

    def _call(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout}

    async def serving(self, timeout: float | None = None) -> bool:
        """Whether the node reports SERVING (waits for the channel to be ready)."""
        r = await health_pb2_grpc.HealthStub(self._ch).Check(
            health_pb2.HealthCheckRequest(), wait_for_ready=True, **self._call(timeout)
        )
        return r.status == health_pb2.HealthCheckResponse.SERVING

    async def put_records(
        self, ctx: common_pb2.CallContext, records: list[records_pb2.Record], timeout: float | None = None
    ) -> list[records_pb2.PutRecordResponse]:
        reply = await records_pb2_grpc.RecordServiceStub(self._ch).PutRecords(
            records_pb2.PutRecordsRequest(context=ctx, records=records), **self._call(timeout)
        )
        return list(reply.results)

    async def get_record(
        self, ctx: common_pb2.CallContext, user_id: str, timeout: float | None = None
    ) -> records_pb2.GetRecordResponse:
        return await records_pb2_grpc.RecordServiceStub(self._ch).GetRecord(
            records_pb2.GetRecordRequest(context=ctx, user_id=user_id), **self._call(timeout)
        )

    async def grant_consents(
        self, ctx: common_pb2.CallContext, consents: list[consent_pb2.Consent], timeout: float | None = None
    ) -> int:
        """How many consents changed."""
        reply = await consent_pb2_grpc.ConsentServiceStub(self._ch).GrantConsents(
            consent_pb2.GrantConsentsRequest(context=ctx, consents=consents), **self._call(timeout)
        )
        return reply.changed

    async def request_disclosure(
        self, request: disclosure_pb2.RequestDisclosureRequest, timeout: float | None = None
    ) -> disclosure_pb2.RequestDisclosureResponse:
        return await disclosure_pb2_grpc.DisclosureServiceStub(self._ch).RequestDisclosure(
            request, **self._call(timeout)
        )

    async def approve_disclosure(self, request_id: str, timeout: float | None = None) -> int:
        """Approves a disclosure request (as an approver); the approval's log entry."""
        reply = await disclosure_pb2_grpc.DisclosureServiceStub(self._ch).ApproveDisclosure(
            disclosure_pb2.ApproveDisclosureRequest(id=request_id), **self._call(timeout)
        )
        return reply.log_sequence

    async def release_disclosure(
        self, request_id: str, timeout: float | None = None
    ) -> disclosure_pb2.ReleaseDisclosureResponse:
        return await disclosure_pb2_grpc.DisclosureServiceStub(self._ch).ReleaseDisclosure(
            disclosure_pb2.ReleaseDisclosureRequest(id=request_id), **self._call(timeout)
        )

    async def node_status(self, timeout: float | None = None) -> admin_pb2.GetNodeStatusResponse:
        return await admin_pb2_grpc.AdminServiceStub(self._ch).GetNodeStatus(
            admin_pb2.GetNodeStatusRequest(), **self._call(timeout)
        )

    async def replication_status(self, timeout: float | None = None) -> admin_pb2.ReplicationStatusResponse:
        return await admin_pb2_grpc.AdminServiceStub(self._ch).ReplicationStatus(
            admin_pb2.ReplicationStatusRequest(), **self._call(timeout)
        )

    async def read_log(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every transfer-log entry, decoded."""
        stub = translog_pb2_grpc.TransferLogServiceStub(self._ch)
        req = translog_pb2.TailEntriesRequest()
        return [json.loads(e.entry_json) async for e in stub.TailEntries(req, **self._call(timeout))]

    async def review_context(self, timeout: float | None = None) -> translog_pb2.GetReviewContextResponse:
        """What a reviewer's report states about the node: regions, recipients, sensitive fields."""
        return await translog_pb2_grpc.TransferLogServiceStub(self._ch).GetReviewContext(
            translog_pb2.GetReviewContextRequest(), **self._call(timeout)
        )

    async def fetch_log(
        self, timeout: float | None = None
    ) -> tuple[translog_pb2.GetCheckpointResponse, list[bytes], list[bytes]]:
        """A fresh signed checkpoint and exactly the entries (and leaf hashes) it covers."""
        stub = translog_pb2_grpc.TransferLogServiceStub(self._ch)
        call = self._call(timeout)
        cp = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), **call)
        entries, leaves = [], []
        if cp.tree_size:
            req = translog_pb2.TailEntriesRequest(after_sequence=0, limit=cp.tree_size)
            async for e in stub.TailEntries(req, **call):
                entries.append(e.entry_json.encode())
                leaves.append(e.leaf_hash)
        return cp, entries, leaves
