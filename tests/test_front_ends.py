"""Several front ends of one primary region (issue 17, point 3): two `residency serve` processes
on one PostgreSQL store serve reads and writes together, write one transfer log, and what one
of them erases the other stops serving at once."""

from __future__ import annotations

import time

import grpc
import pytest

from residency.server.core import translog
from residency.server.deployment import PRIMARY
from residency.v1 import records_pb2, translog_pb2, translog_pb2_grpc
from tests.conftest import Cluster, ctx, values
from tests.harness import eventually


@pytest.fixture
def store_backend() -> str:
    return "postgres"


async def _log(c: Cluster, front: str) -> list[tuple[bytes, bytes]]:
    stub = translog_pb2_grpc.TransferLogServiceStub(c.channel(front, "reviewer", PRIMARY))
    return [
        (e.entry_json.encode(), e.chain_hash)
        async for e in stub.TailEntries(translog_pb2.TailEntriesRequest(), timeout=30)
    ]


async def test_two_front_ends_serve_one_store_and_an_erasure_through_one_holds_at_the_other(
    idle_cluster: Cluster,
):
    c = idle_cluster
    b = c.add_front_end("b")
    await c.start(PRIMARY, b, "ap-southeast-1", "eu-west-1")
    fronts = {PRIMARY: c.records(PRIMARY, PRIMARY), b: c.records(b, PRIMARY)}

    async def put(front: str, user: str, name: str) -> int:
        rec = records_pb2.Record(user_id=user, source="registration")
        rec.fields["name"].string_value = name
        reply = await fronts[front].PutRecord(
            records_pb2.PutRecordRequest(context=ctx(PRIMARY, "essential.service"), record=rec), timeout=30
        )
        return reply.version

    async def get(front: str, user: str) -> records_pb2.GetRecordResponse:
        return await fronts[front].GetRecord(
            records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id=user), timeout=30
        )

    for i in range(20):  # interleaved: each front end's writes land between the other's
        await put(PRIMARY, f"fa-{i}", f"A {i}")
        await put(b, f"fb-{i}", f"B {i}")
    assert values(await get(b, "fa-3"))["name"] == "A 3"
    assert values(await get(PRIMARY, "fb-7"))["name"] == "B 7"
    assert await put(b, "fa-3", "A 3 again") > (await get(PRIMARY, "fa-4")).record.version
    assert values(await get(PRIMARY, "fa-3"))["name"] == "A 3 again"

    # Both in-process workers compete for the destinations' leases; every write arrives once.
    await c.replicated()
    assert values(await c.held("fb-7", "ap-southeast-1"))["name"] == "B 7"

    # An erasure through one front end: the other serves the user no more within 1 s.
    await fronts[b].DeleteRecord(
        records_pb2.DeleteRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="fa-5"), timeout=30
    )
    erased_at = time.monotonic()

    async def gone() -> bool:
        try:
            await get(PRIMARY, "fa-5")
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(gone, "the other front end stops serving the erased user", deadline=1.0)
    assert time.monotonic() - erased_at < 1.0

    # One log: both front ends serve the same gap-free chain, with every front end's entries.
    a_log, b_log = await _log(c, PRIMARY), await _log(c, b)
    assert a_log == b_log and translog.verify_chain(a_log) is None
    assert b'"fb-7"' in b"".join(e for e, _ in a_log)
