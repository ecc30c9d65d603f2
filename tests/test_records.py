"""RecordService over real gRPC: validation, cross-location reads, credentials, encryption at rest."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from residency.server.core import codec
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import admin_pb2, common_pb2, records_pb2
from tests.conftest import BACKENDS, Cluster, ctx, values


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


def violations(e: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(e)
    assert status is not None, "no rich status attached"
    out = {}
    for d in status.details:
        br = error_details_pb2.BadRequest()
        assert d.Unpack(br)
        out |= {v.field: v.description for v in br.field_violations}
    return out


async def put_raw(
    cluster: Cluster,
    record: records_pb2.Record,
    location=PRIMARY,
    purpose="essential.service",
):
    return await cluster.records().PutRecord(
        records_pb2.PutRecordRequest(context=ctx(location, purpose), record=record),
        timeout=30,
    )


def record(user_id: str, **fields) -> records_pb2.Record:
    r = records_pb2.Record(user_id=user_id)
    for n, v in fields.items():
        r.fields[n].CopyFrom(codec.to_value(v))
    return r


@pytest.mark.parametrize(
    ("rec", "location", "purpose", "field"),
    [
        (record("v-1", shoe_size=42), PRIMARY, "essential.service", "record.fields[shoe_size]"),
        (record("v-1", email=42), PRIMARY, "essential.service", "record.fields[email]"),
        (record("v-1", phone="1" * 33), PRIMARY, "essential.service", "record.fields[phone]"),
        (record("bad id!", email="a@b.c"), PRIMARY, "essential.service", "record.user_id"),
        (record("v-1", email="a@b.c"), PRIMARY, "selling.everything", "context.purpose"),
    ],
    ids=["unknown-field", "wrong-type", "oversize", "malformed-user-id", "unknown-purpose"],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
    cluster: Cluster, rec, location, purpose, field
):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await put_raw(cluster, rec, location, purpose)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(e.value)
    status = await cluster.status(PRIMARY)
    assert status.records == 0
    replication = await cluster.admin().ReplicationStatus(admin_pb2.ReplicationStatusRequest())
    assert replication.head_sequence == 0


async def test_a_batch_with_one_bad_record_writes_none_of_it(cluster: Cluster):
    req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    req.records.append(record("b-1", email="ok@example.cn"))
    req.records.append(record("b-2", email=7))
    req.records.append(record("b-3", email="ok3@example.cn"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.records().PutRecords(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(e.value)) == {"records[1].fields[email]"}
    for user in ("b-1", "b-3"):
        with pytest.raises(grpc.aio.AioRpcError) as nf:
            await cluster.get(user)
        assert nf.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_batch_of_more_than_1000_records_is_refused(cluster: Cluster):
    req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    for i in range(1001):
        req.records.append(record(f"n-{i}", email="x@example.cn"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.records().PutRecords(req, timeout=30)
    assert "records" in violations(e.value)


async def test_put_records_writes_a_batch_atomically_with_versions_in_order(cluster: Cluster):
    req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    for i in range(1000):
        req.records.append(record(f"m-{i}", email=f"m{i}@example.cn"))
    req.records.append(record("m-0", language="zh-CN"))  # the same user twice: two versions
    with pytest.raises(grpc.aio.AioRpcError):  # 1001 records: refused
        await cluster.records().PutRecords(req, timeout=30)
    del req.records[999]
    reply = await cluster.records().PutRecords(req, timeout=30)
    assert [r.version for r in reply.results[:2]] == [1, 1]
    assert reply.results[-1].user_id == "m-0" and reply.results[-1].version == 2
    assert values(await cluster.get("m-0")) == {"email": "m0@example.cn", "language": "zh-CN"}


def large_batch(bad_at: int | None = None) -> records_pb2.PutRecordsRequest:
    """400 records of 10 fields: large enough to be checked in the node's helper process."""
    req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    for i in range(400):
        req.records.append(
            record(
                f"l-{i}",
                name=f"Li Wei {i}",
                phone=f"+86 138{i:08d}",
                email=f"l{i}@example.cn" if i != bad_at else 7,
                address=f"{i} Changan Avenue, Beijing",
                ip_address="10.0.0.1",
                browser_type="Firefox 145",
                language="zh-CN",
                hardware_software="Android 16",
                published_content=f"Review {i}: works as described.",
                password=f"secret-{i}-secret",
            )
        )
    return req


async def test_a_large_batch_is_checked_whole_in_a_helper_and_written_whole(cluster: Cluster):
    async def refused() -> dict[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cluster.records().PutRecords(large_batch(bad_at=321), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return violations(e.value)

    # The first large request starts the node's helper (it is checked in-process meanwhile).
    assert await refused() == {"records[321].fields[email]": "expected a string value, got int"}
    log = cluster.data_dir(PRIMARY) / "node.log"
    deadline = time.monotonic() + 60
    while "request-checking helper process(es) ready" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the node's request-checking helper did not start"
        await asyncio.sleep(0.05)
    assert await refused() == {"records[321].fields[email]": "expected a string value, got int"}
    with pytest.raises(grpc.aio.AioRpcError) as nf:
        await cluster.get("l-0")
    assert nf.value.code() == grpc.StatusCode.NOT_FOUND
    reply = await cluster.records().PutRecords(large_batch(), timeout=30)
    assert [(r.user_id, r.version) for r in reply.results] == [(f"l-{i}", 1) for i in range(400)]
    got = await cluster.get("l-399")
    assert values(got)["email"] == "l399@example.cn" and "password" not in got.record.fields
    ask = records_pb2.VerifyCredentialRequest(context=ctx(PRIMARY, "essential.service"), user_id="l-7")
    ask.field, ask.secret = "password", "secret-7-secret"
    check = await cluster.records().VerifyCredential(
        ask,
        timeout=30,
    )
    assert check.match  # the password went through the helper and was hashed by the node


async def test_put_records_bytes_that_are_no_request_are_invalid_argument(cluster: Cluster):
    call = cluster.channel(PRIMARY).unary_unary(
        "/residency.v1.RecordService/PutRecords",
        request_serializer=None,
        response_deserializer=records_pb2.PutRecordsResponse.FromString,
    )
    for size in (10, 100_000):  # checked in-process, and by a helper
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"\xff" * size, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a serialized residency.v1.PutRecordsRequest" in violations(e.value)["request"]


async def test_cross_location_read_returns_allowed_fields_and_lists_withheld(cluster: Cluster):
    await cluster.put(
        "r-1",
        {
            "name": "Li Wei",
            "email": "li@example.cn",
            "national_id": "110105194912310021",
            "address": "1 Changan Avenue",
            "search_keywords": ["tea"],
        },
    )
    reply = await cluster.get("r-1", location="ap-southeast-1", purpose="essential.service")
    assert values(reply) == {"name": "Li Wei", "email": "li@example.cn"}
    assert {(w.field, w.reason) for w in reply.withheld} == {
        ("national_id", "never_transfer"),
        ("address", "excluded"),
        ("search_keywords", "never_transfer"),
    }
    assert all(w.detail for w in reply.withheld)
    log = {seq: json.loads(e) for seq, e, _ in await cluster.log()}
    entry = log[reply.log_sequence]
    assert entry["kind"] == "remote_read" and entry["outcome"] == "allowed"
    assert (
        entry["destination_region"] == "ap-southeast-1"
        and entry["actor"] == "spiffe://residency/service/ap-southeast-1/test-suite"
    )
    assert entry["purpose"] == "essential.service"
    assert {f["name"] for f in entry["fields"]} == {"name", "email"}
    assert {w["name"] for w in entry["withheld"]} == {"national_id", "address", "search_keywords"}


async def test_a_read_nothing_may_answer_is_permission_denied_and_logged(cluster: Cluster):
    await cluster.put("r-2", {"name": "Li Wei", "email": "li@example.cn"})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.get("r-2", location="eu-west-1", purpose="marketing.communications")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    entries = [json.loads(x) for _, x, _ in await cluster.log()]
    denied = [x for x in entries if x["kind"] == "remote_read" and x["subject"] == "r-2"]
    assert len(denied) == 1 and denied[0]["outcome"] == "denied"
    assert denied[0]["fields"] == [] and denied[0]["reason"]


async def test_home_reads_are_not_logged_as_transfers(cluster: Cluster):
    await cluster.put("r-3", {"email": "li@example.cn"})
    await cluster.replicated()
    before = len(await cluster.log())
    reply = await cluster.get("r-3")
    assert reply.log_sequence == 0 and values(reply) == {"email": "li@example.cn"}
    assert len(await cluster.log()) == before


async def test_a_region_node_logs_every_read_and_passes_no_copy_on_to_another_region(cluster: Cluster):
    await cluster.put("r-4", {"email": "li@example.cn", "name": "Li"})
    await cluster.replicated()
    local = await cluster.get("r-4", region="ap-southeast-1")
    assert values(local) == {"email": "li@example.cn", "name": "Li"}
    # A caller in eu-west-1 reads eu-west-1's own copy, not ap-southeast-1's: what was sent to
    # ap-southeast-1 was sent for its recipient only (issue 14: the policy travels with it).
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.get(
            "r-4",
            region="ap-southeast-1",
            location="eu-west-1",
            purpose="essential.service.operations.support",
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "li@" not in e.value.details()
    log = {seq: json.loads(e) for seq, e, _ in await cluster.log("ap-southeast-1")}
    assert log[local.log_sequence]["kind"] == "local_read"
    (remote,) = [x for x in log.values() if x["kind"] == "remote_read"]
    assert (remote["source_region"], remote["destination_region"], remote["outcome"]) == (
        "ap-southeast-1",
        "eu-west-1",
        "denied",
    )


async def test_region_nodes_refuse_writes(cluster: Cluster):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.records("ap-southeast-1").PutRecord(
            records_pb2.PutRecordRequest(
                context=ctx("ap-southeast-1", "essential.service"), record=record("w-1", email="a@b.c")
            ),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_passwords_are_never_returned_nor_replicated(cluster: Cluster):
    await cluster.put("p-1", {"email": "p@example.cn", "password": "hunter2-hunter2"})
    await cluster.replicated()
    home = await cluster.get("p-1")
    assert "password" not in home.record.fields
    assert [(w.field, w.reason) for w in home.withheld] == [("password", "credential")]
    for region in AFFILIATES:
        assert "password" not in (await cluster.held("p-1", region)).record.fields


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_no_plaintext_field_value_exists_in_any_data_dir(
    cluster: Cluster, store_backend: str, request: pytest.FixtureRequest
):
    sentinel = "SENTINEL-7f3a9c-plaintext"
    fields = {
        "name": sentinel,
        "email": f"{sentinel}@example.cn",
        "phone": sentinel[:32],
        "address": sentinel,
        "national_id": sentinel,
        "password": sentinel,
        "ip_address": sentinel,
        "browser_type": sentinel,
        "language": sentinel[:32],
        "hardware_software": sentinel,
        "pages_visited": [sentinel],
        "cookie_id": sentinel,
        "partner_profile": sentinel,
        "search_keywords": [sentinel],
        "published_content": sentinel,
        "transactions": [sentinel],
        "violation_records": [sentinel],
    }
    await cluster.accept_cookies([f"s-{i}" for i in range(20)])
    for i in range(20):
        await cluster.put(f"s-{i}", fields)
    await cluster.replicated()
    # The values are really there: each region answers them back, opened.
    assert values(await cluster.get("s-0"))["name"] == sentinel
    assert values(await cluster.get("s-0", region="ap-southeast-1"))["name"] == sentinel
    assert values(await cluster.get("s-0", region="eu-west-1", purpose="analytics.reporting"))[
        "pages_visited"
    ] == [sentinel]
    await cluster.get("s-1", location="ap-southeast-1")  # a logged cross-location read
    for region in (PRIMARY, *AFFILIATES):
        assert cluster.stop(region) == 0  # flush the WAL into the database files
    roots = [cluster.data_dir(r) for r in (PRIMARY, *AFFILIATES)]
    if store_backend == "postgres":  # the primary's store is the server's data folder, WAL included
        assert not any(roots[0].rglob("node.db"))
        roots.append(request.getfixturevalue("postgres_server").data)
    assert all(any(r.rglob("node.db")) for r in roots[1:3])
    # The scan itself finds plaintext where there is some.
    probe = roots[0] / "probe.txt"
    probe.write_text(f"x{sentinel}x")
    assert files_containing(roots[0], sentinel.encode()) == [probe]
    probe.unlink()
    for root in roots:
        for needle in (sentinel.encode(), sentinel[:16].encode(), sentinel.encode("utf-16-le")):
            assert files_containing(root, needle) == [], root


async def test_get_record_for_unknown_user_is_not_found(cluster: Cluster):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.get("nobody")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_values_of_every_type_round_trip(cluster: Cluster):
    from datetime import UTC, datetime

    t = datetime(2026, 11, 27, 8, 30, 15, 250000, tzinfo=UTC)
    await cluster.put("ty-1", {"visit_time": t, "pages_visited": ["/a", "/b"], "email": "e@example.cn"})
    assert values(await cluster.get("ty-1")) == {
        "visit_time": t,
        "pages_visited": ["/a", "/b"],
        "email": "e@example.cn",
    }
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await put_raw(cluster, records_pb2.Record(user_id="ty-2", fields={"email": common_pb2.Value()}))
    assert "record.fields[email]" in violations(e.value)
