"""Malformed requests over real gRPC: unreadable bytes and numbers out of range are
INVALID_ARGUMENT naming the field on every call, violations are capped to fit the trailers,
and an unexpected failure is INTERNAL with an error id that only the node's log explains."""

from __future__ import annotations

import math
import random
import re
import sqlite3
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import (  # noqa: F401 - admin and disclosure: their services join the descriptor pool
    admin_pb2,
    common_pb2,
    consent_pb2,
    consent_pb2_grpc,
    disclosure_pb2,
    records_pb2,
    replica_pb2,
    translog_pb2,
)
from tests.conftest import Cluster, ctx
from tests.test_records import record, violations

SG = AFFILIATES[0]
INT64_MAX = 2**63 - 1


async def served_methods(cluster: Cluster) -> list:
    """Every method of every service the primary lists by reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(cluster.channel(PRIMARY))
    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names |= {s.name for s in reply.list_services_response.service}
    pool = descriptor_pool.Default()
    return [m for n in sorted(names) for m in pool.FindServiceByName(n).methods]


def undecodable(rng: random.Random, message_class) -> bytes:
    """Random bytes that are not a serialized `message_class` (checked with the real parser)."""
    while True:
        data = rng.randbytes(rng.randint(1, 64))
        try:
            message_class.FromString(data)
        except DecodeError:
            return data


async def call_raw(ch: grpc.aio.Channel, method, data: bytes) -> grpc.aio.AioRpcError:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    call = getattr(ch, kind)(path, request_serializer=None, response_deserializer=None)
    request = iter([data]) if method.client_streaming else data
    with pytest.raises(grpc.aio.AioRpcError) as e:
        if method.server_streaming:
            async for _ in call(request, timeout=30):
                pass
        else:
            await call(request, timeout=30)
    return e.value


async def test_undecodable_bytes_to_every_rpc_of_every_service_are_invalid_argument(module_cluster: Cluster):
    methods = await served_methods(module_cluster)
    assert {m.name for m in methods} >= {
        "PutRecord",
        "PutRecords",
        "ApplyCopies",
        "TailEntries",
        "Check",
        "Watch",
    }
    rng = random.Random(13)
    each = math.ceil(300 / len(methods))
    ch = module_cluster.channel(PRIMARY)
    sent = 0
    for method in methods:
        request_class = GetMessageClass(method.input_type)
        for _ in range(each):
            e = await call_raw(ch, method, undecodable(rng, request_class))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, e.code(), e.details())
            assert violations(e) == {"request": f"not a serialized {method.input_type.full_name}"}
            sent += 1
    assert sent >= 300
    health = health_pb2_grpc.HealthStub(ch)
    assert (
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    ).status == health_pb2.HealthCheckResponse.SERVING
    await module_cluster.put("fz-1", {"email": "fz@example.cn"})
    assert (await module_cluster.get("fz-1")).record.version == 1


@pytest.mark.parametrize(
    "version", [2**63, 2**64 - 1], ids=["2^63", "-1"]
)  # -1 as int64 is 2^64-1 on the wire
async def test_a_copy_version_the_store_cannot_hold_is_refused_and_nothing_applied(
    module_cluster: Cluster, version: int
):
    await module_cluster.replicated()  # an earlier test's write must not land in between
    before = await module_cluster.status(SG)
    copies = [
        replica_pb2.SealedCopy(user_id="ov-1", version=3, deleted=True),
        replica_pb2.SealedCopy(user_id="ov-2", version=version, deleted=True),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await module_cluster.replica(SG).ApplyCopies(
            replica_pb2.ApplyCopiesRequest(copies=copies), timeout=30
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"copies[1].version": f"must be at most {INT64_MAX} (2^63-1)"}
    after = await module_cluster.status(SG)
    assert (after.records, after.tombstones, after.log_entries) == (
        before.records,
        before.tombstones,
        before.log_entries,
    )


async def test_log_positions_beyond_the_store_are_invalid_argument_naming_the_field(module_cluster: Cluster):
    log = module_cluster.transfer_log()

    async def refused(call) -> dict[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            reply = call()
            if hasattr(reply, "__aiter__"):
                async for _ in reply:
                    pass
            else:
                await reply
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        return violations(e.value)

    huge = f"must be at most {INT64_MAX} (2^63-1)"
    assert await refused(lambda: log.TailEntries(translog_pb2.TailEntriesRequest(after_sequence=2**63))) == {
        "after_sequence": huge
    }
    assert await refused(
        lambda: log.ProveInclusion(translog_pb2.ProveInclusionRequest(leaf_index=2**64 - 1, tree_size=2**63))
    ) == {"leaf_index": huge, "tree_size": huge}
    assert await refused(
        lambda: log.ProveConsistency(translog_pb2.ProveConsistencyRequest(from_size=2**63))
    ) == {"from_size": huge}
    assert await refused(lambda: log.Query(translog_pb2.QueryRequest(page_token="9" * 20))) == {
        "page_token": "not a token this service issued"
    }
    since = Timestamp(seconds=2**62)
    assert await refused(lambda: log.Query(translog_pb2.QueryRequest(since=since))) == {
        "since": "must be a time from 0001-01-01 to 9999-12-31 UTC"
    }
    # The largest limit a uint32 holds is a limit like any other.
    entries = [e async for e in log.TailEntries(translog_pb2.TailEntriesRequest(limit=2**32 - 1), timeout=30)]
    assert [e.sequence for e in entries] == list(range(1, len(entries) + 1))


async def test_times_out_of_range_are_refused_and_nothing_written(module_cluster: Cluster):
    grants = consent_pb2_grpc.GrantServiceStub(module_cluster.channel(PRIMARY, "operator"))
    listed = await grants.ListGrants(consent_pb2.ListGrantsRequest(context=ctx(PRIMARY, "essential.service")))
    grant = consent_pb2.Grant(
        recipient="sg-affiliate",
        purpose="essential.service",
        user_ids=["tr-1"],
        ends_at=Timestamp(seconds=253_402_300_800),
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await grants.CreateGrant(
            consent_pb2.CreateGrantRequest(context=ctx(PRIMARY, "essential.service"), grant=grant),
            timeout=30,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"grant.ends_at": "must be a time from 0001-01-01 to 9999-12-31 UTC"}
    again = await grants.ListGrants(consent_pb2.ListGrantsRequest(context=ctx(PRIMARY, "essential.service")))
    assert again == listed
    # A field value is the schema's to check, the same in PutRecord and PutRecords.
    rec = record("tr-1", email="tr@example.cn")
    rec.fields["visit_time"].CopyFrom(common_pb2.Value(timestamp_value=Timestamp(seconds=-(2**40))))
    for call, request, where in (
        (module_cluster.records().PutRecord, records_pb2.PutRecordRequest(record=rec), "record"),
        (module_cluster.records().PutRecords, records_pb2.PutRecordsRequest(records=[rec]), "records[0]"),
    ):
        request.context.CopyFrom(ctx(PRIMARY, "essential.service"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(e.value) == {
            f"{where}.fields[visit_time]": "must be a time from 0001-01-01 to 9999-12-31 UTC"
        }
    with pytest.raises(grpc.aio.AioRpcError) as nf:
        await module_cluster.get("tr-1")
    assert nf.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ten_thousand_unknown_fields_give_the_first_hundred_then_how_many_more(module_cluster: Cluster):
    rec = record("uf-1", email="uf@example.cn")
    for i in range(10_000):
        rec.fields[f"x{i}"].string_value = "v"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await module_cluster.records().PutRecord(
            records_pb2.PutRecordRequest(context=ctx(PRIMARY, "essential.service"), record=rec),
            timeout=30,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(e.value)
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    shown = [(v.field, v.description) for v in bad.field_violations]
    assert len(shown) == 101
    assert all(d == "unknown field: not declared in the schema" for _, d in shown[:100])
    assert shown[-1] == ("request", "and 9900 more")
    # With a margin under gRPC's default 8 KiB limit on a response's metadata.
    trailers = dict(e.value.trailing_metadata())
    assert len(trailers["grpc-status-details-bin"]) + len(trailers.get("grpc-message", "")) < 7.5 * 1024
    with pytest.raises(grpc.aio.AioRpcError) as nf:
        await module_cluster.get("uf-1")
    assert nf.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_unexpected_failure_is_internal_with_an_id_only_the_log_explains(module_cluster: Cluster):
    """A real fault: the stored row of a record is damaged on disk (as a failing disk or a
    hand edit would), so reading it fails in a way no domain error describes."""
    await module_cluster.put("dm-1", {"email": "dm@example.cn"})
    db = module_cluster.data_dir(PRIMARY) / "node.db"
    with sqlite3.connect(db, timeout=30) as c:
        c.execute("UPDATE records SET blob = x'ff' WHERE user_id = 'dm-1'")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await module_cluster.get("dm-1")
    assert e.value.code() == grpc.StatusCode.INTERNAL
    found = re.fullmatch(
        r"internal error ([0-9a-f]{12}); the node's log has its details under this id", e.value.details()
    )
    assert found, e.value.details()
    assert "Decode" not in e.value.details() and "parsing" not in e.value.details()
    log = (module_cluster.data_dir(PRIMARY) / "node.log").read_text(errors="replace")
    at = log.index(f"internal error {found[1]} in RecordService.GetRecord")
    assert "Traceback" in log[at:] and "DecodeError" in log[at:]


def _plants(descriptor, depth: int = 0) -> list[tuple[str, Callable[[Any], None]]]:
    """(path, how to plant it) for every number a message of `descriptor` can hold that the
    store or the domain cannot (a uint64 above 2^63-1, a time past 9999), down to three levels."""
    from residency.server.api.requests import _U64, _checks

    def at(name: str, inner: Callable[[Any], Any], plant: Callable[[Any], None]) -> Callable[[Any], None]:
        return lambda m: plant(inner(getattr(m, name)))

    out: list[tuple[str, Callable[[Any], None]]] = []
    for f in _checks(descriptor, {}):
        n = f.name
        if f.type in _U64 and f.is_repeated:
            out.append((f"{n}[1]", lambda m, n=n: getattr(m, n).extend([1, 2**63])))
        elif f.type in _U64:
            out.append((n, lambda m, n=n: setattr(m, n, 2**64 - 1)))
        elif f.message_type.full_name == "google.protobuf.Timestamp" and not f.is_repeated:
            out.append((n, lambda m, n=n: setattr(getattr(m, n), "seconds", 2**40)))
        elif depth < 3:
            if f.message_type.GetOptions().map_entry:
                inner, where = f.message_type.fields_by_name["value"].message_type, f"{n}[k]"
                get = lambda v: v["k"]  # noqa: E731
            elif f.is_repeated:
                inner, where, get = f.message_type, f"{n}[0]", lambda v: v.add()
            else:
                inner, where, get = f.message_type, n, lambda v: v
            out += [(f"{where}.{p}", at(n, get, plant)) for p, plant in _plants(inner, depth + 1)]
    return out


def test_every_number_out_of_range_is_found_in_every_request_type():
    """The reader's check made once per type finds what its walk finds: a number out of range
    at any depth of any request (and of a region's copies, which it reads from their bytes),
    each alone, and nothing in a request without one."""
    from residency.server.api.requests import out_of_range

    pool = descriptor_pool.Default()
    services = ("Record", "Consent", "Grant", "Admin", "Disclosure", "Replica", "TransferLog")
    types = {
        m.input_type for s in services for m in pool.FindServiceByName(f"residency.v1.{s}Service").methods
    }
    types.add(replica_pb2.SealedCopy.DESCRIPTOR)
    planted = 0
    for t in sorted(types, key=lambda t: t.full_name):
        assert out_of_range(GetMessageClass(t)()) == [], t.full_name
        for path, plant in _plants(t):
            message = GetMessageClass(t)()
            plant(message)
            assert [p for p, _ in out_of_range(message)] == [path], (t.full_name, path)
            planted += 1
    assert planted >= 20  # versions, sequences, tree sizes, times, a copy's policies' ends


async def test_a_domain_error_without_a_status_of_its_own_is_internal_and_its_text_is_kept_out(
    caplog: pytest.LogCaptureFixture,
):
    """An error of this code that no call is meant to raise (a bundle's, read by a reviewer's
    tool) must not reach a caller with its text, should it ever escape a servicer."""
    from residency.server.api.errors import rpc
    from residency.server.vault.bundle import BundleError

    class Servicer:
        @rpc
        async def Call(self, request, context):
            raise BundleError("the bundle at /srv/secret/path is damaged")

    class Context:
        status = None

        async def abort_with_status(self, status):
            Context.status = status

    await Servicer().Call(None, Context())
    assert Context.status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in Context.status.details and "internal error" in Context.status.details
    assert "the bundle at /srv/secret/path is damaged" in caplog.text


def test_the_largest_valid_request_of_each_bulky_method_is_read_not_refused_for_its_size():
    """Review: the per-method request bounds must not refuse a request the node itself would
    take: 1,000 consents with 2,000 characters of three-byte evidence each, a grant of 10,000
    user ids of 128 characters, 1,000 records of 64 KiB. Each is over 64 KiB, so it is read once
    the caller passes (`Pending`), and reads as its message; 1 byte over its bound is not."""
    from residency.server.api.requests import LARGER_REQUESTS, LARGEST_REQUEST, Pending, Refused, _reader

    consents = consent_pb2.GrantConsentsRequest(context=ctx(PRIMARY, "essential.service"))
    for i in range(1000):
        consents.consents.add(
            user_id=f"u-{i}".ljust(128, "x"), purpose="marketing.communications", evidence="語" * 2000
        )
    many = consents.consents
    grant = consent_pb2.CreateGrantRequest(context=ctx(PRIMARY, "essential.service"))
    grant.grant.user_ids.extend(f"u-{i}".ljust(128, "x") for i in range(10_000))
    bulk = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
    for i in range(1000):
        bulk.records.add(user_id=f"u-{i}").fields["name"].string_value = "x" * (64 * 1024 - 64)
    cases = [
        ("/residency.v1.ConsentService/GrantConsents", consents),
        ("/residency.v1.ConsentService/WithdrawConsents", consent_pb2.WithdrawConsentsRequest(consents=many)),
        ("/residency.v1.GrantService/CreateGrant", grant),
        ("/residency.v1.RecordService/PutRecords", bulk),
    ]
    for method, message in cases:
        data = message.SerializeToString()
        read = _reader(method, type(message).FromString)
        pending = read(data)
        assert isinstance(pending, Pending), (method, len(data))
        assert pending.read() == message, method
        bound = LARGER_REQUESTS.get(method, LARGEST_REQUEST)
        over = data + b"\x00" * (bound - len(data) + 1)
        assert len(data) <= bound and isinstance(read(over).read(), Refused)
