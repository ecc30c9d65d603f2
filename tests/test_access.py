"""Authorization by role, in one place (`server/api/access.py`), and services held to the
purposes the access policy lets them state: each caller who asks for more than its role or its
policy gives is refused PERMISSION_DENIED naming the missing permission, and a refusal that
concerns a user's data is a transfer-log entry naming the caller."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from residency.server.api.access import METHODS, ROLES, refusal, subjects
from residency.server.config.access import load_access
from residency.server.core import codec
from residency.server.core.errors import ConfigError
from residency.server.deployment import EXAMPLE_ACCESS, PRIMARY
from residency.server.keys.pki import Identity
from residency.server.node import SERVICES
from residency.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    consent_pb2,
    records_pb2,
    records_pb2_grpc,
    replica_pb2,
    replica_pb2_grpc,
    translog_pb2,
    translog_pb2_grpc,
)
from tests.conftest import Cluster, ctx, values

SG, IE = "ap-southeast-1", "eu-west-1"


def who(role: str, region: str = PRIMARY, name: str = "x") -> Identity:
    return Identity("residency", role, region, name)


# ---- the table ---------------------------------------------------------------------------


def test_every_method_of_the_api_has_a_permission_and_every_permission_a_role():
    pool = descriptor_pool.Default()
    served = {f"/{s}/{m.name}" for s in SERVICES for m in pool.FindServiceByName(s).methods}
    assert len(served) >= 27
    assert served <= set(METHODS), f"methods without a permission: {sorted(served - set(METHODS))}"
    held = set().union(*ROLES.values())
    assert set(METHODS.values()) <= held


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (
            "service",
            {
                "PutRecord",
                "GetRecord",
                "DeleteRecord",
                "VerifyCredential",
                "ExportSubject",
                "GrantConsents",
                "Disclose",
                "RequestDisclosure",
                "ReleaseDisclosure",
            },
        ),
        (
            "operator",
            {
                "ExportSubject",
                "ApplyRules",
                "PauseReplication",
                "GetNodeStatus",
                "CreateGrant",
                "RevokeGrant",
                "Disclose",
                "RequestDisclosure",
                "ReleaseDisclosure",
            },
        ),
        ("reviewer", {"Query", "TailEntries", "SubjectReport", "GetCheckpoint"}),
        ("approver", {"ApproveDisclosure", "DenyDisclosure"}),
        ("recipient", {"GetRecord"}),
        ("node", {"ApplyCopies"}),
    ],
)
def test_each_role_may_call_exactly_its_own_methods(role: str, allowed: set[str]):
    probe = {
        "PutRecord": "Record",
        "GetRecord": "Record",
        "DeleteRecord": "Record",
        "VerifyCredential": "Record",
        "ExportSubject": "Record",
        "GrantConsents": "Consent",
        "Disclose": "Disclosure",
        "RequestDisclosure": "Disclosure",
        "ReleaseDisclosure": "Disclosure",
        "ApproveDisclosure": "Disclosure",
        "DenyDisclosure": "Disclosure",
        "ApplyRules": "Admin",
        "PauseReplication": "Admin",
        "GetNodeStatus": "Admin",
        "CreateGrant": "Grant",
        "RevokeGrant": "Grant",
        "Query": "TransferLog",
        "TailEntries": "TransferLog",
        "SubjectReport": "TransferLog",
        "GetCheckpoint": "TransferLog",
        "ApplyCopies": "Replica",
    }
    ident = who(role)
    for method, service in probe.items():
        denied = refusal(ident, f"/residency.v1.{service}Service/{method}", PRIMARY)
        assert (denied is None) == (method in allowed), (role, method, denied)
    for open_to_all in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"):
        assert refusal(ident, open_to_all, PRIMARY) is None


def test_a_refusal_names_the_missing_permission_and_who_holds_it():
    permission, why = refusal(who("service"), "/residency.v1.AdminService/ApplyRules", PRIMARY)
    assert permission == "admin.rules"
    assert (
        why
        == "spiffe://residency/service/cn-north/x lacks permission admin.rules (roles holding it: operator)"
    )
    # A method the table does not list is closed, whoever calls it.
    assert refusal(who("operator"), "/residency.v1.AdminService/Shutdown", PRIMARY)[0] == "unknown"


def test_copies_are_taken_only_from_the_home_regions_node():
    apply = "/residency.v1.ReplicaService/ApplyCopies"
    assert refusal(who("node", PRIMARY, "primary"), apply, PRIMARY) is None
    for liar in (who("node", SG, "region"), who("node", IE, "primary"), who("operator"), who("service")):
        assert refusal(liar, apply, PRIMARY)[0] == "replica.apply"


def test_an_operator_administers_the_node_of_its_own_region_only():
    admin = "/residency.v1.AdminService/"
    own_region = {
        f"{admin}ApplyRules": "admin.rules",
        f"{admin}PauseReplication": "admin.replication",
        f"{admin}RetryDeadLetters": "admin.replication",
        f"{admin}ReplicationStatus": "admin.replication",
        f"{admin}ExplainTransfer": "admin.explain",
        f"{admin}RotateKeys": "admin.keys",
        "/residency.v1.GrantService/CreateGrant": "grants.write",
        "/residency.v1.GrantService/ListGrants": "grants.read",
    }
    for method, permission in own_region.items():
        assert refusal(who("operator"), method, PRIMARY, PRIMARY) is None
        assert refusal(who("operator", SG), method, SG, SG) is None
        # An affiliate's operator at the home region's node, and the home's at an affiliate's.
        for ident, region in ((who("operator", SG), PRIMARY), (who("operator"), SG)):
            missing, why = refusal(ident, method, PRIMARY, region)
            assert missing == permission and region in why, (method, why)
    # What names no user stays open to every operator: a node's status.
    assert refusal(who("operator", SG), f"{admin}GetNodeStatus", PRIMARY, PRIMARY) is None


def test_the_users_a_request_names_are_its_subjects():
    put = records_pb2.PutRecordsRequest(
        records=[records_pb2.Record(user_id=u) for u in ("u-1", "u-2", "u-1", "bad id!")]
    )
    assert subjects(put) == ["u-1", "u-2"]
    grant = consent_pb2.CreateGrantRequest(grant=consent_pb2.Grant(user_ids=[f"g-{i}" for i in range(300)]))
    assert len(subjects(grant)) == 100
    assert subjects(admin_pb2.PauseReplicationRequest(region=SG)) == []


# ---- the access policy file ----------------------------------------------------------------


def write_policy(path: Path, text: str):
    path.write_text(text)
    return load_access(path)


def test_the_first_matching_entry_decides_and_a_purpose_allows_its_narrower_ones(tmp_path: Path):
    policy = write_policy(
        tmp_path / "access.yaml",
        """
services:
  - identity: spiffe://residency/service/cn-north/billing
    purposes: [essential.service.payment_processing]
  - identity: spiffe://residency/service/*/news-*
    purposes: [marketing]
""",
    )
    billing = "spiffe://residency/service/cn-north/billing"
    assert policy.allows(billing, "essential.service.payment_processing")
    assert not policy.allows(billing, "essential.service")  # broader than granted
    assert not policy.allows(billing, "marketing.communications")
    assert policy.allows("spiffe://residency/service/eu-west-1/news-daily", "marketing.communications")
    # '*' stays inside one part of the identity; an unmatched service may state nothing.
    assert not policy.allows("spiffe://residency/service/eu-west-1/x/news-a", "marketing")
    assert not policy.allows("spiffe://residency/service/cn-north/other", "essential.service")


def test_inits_policy_lets_every_service_state_every_purpose(tmp_path: Path):
    policy = write_policy(tmp_path / "access.yaml", EXAMPLE_ACCESS)
    assert policy.allows("spiffe://residency/service/eu-west-1/any", "marketing.communications")
    assert policy.allows("spiffe://residency/service/cn-north/any", "essential.service")


def test_a_bad_access_policy_names_the_file_and_the_entry(tmp_path: Path):
    path = tmp_path / "access.yaml"
    path.write_text(
        """
services:
  - identity: spiffe://residency/operator/cn-north/x
    purposes: [essential.service]
  - identity: spiffe://residency/service/cn-north/y
    purposes: [essential.serivce]
  - identity: spiffe://residency/service/cn-north/z
    purposes: []
"""
    )
    with pytest.raises(ConfigError) as e:
        load_access(path)
    text = str(e.value)
    assert str(path) in text
    for where in (
        "services[0].identity",
        "services[1].purposes",
        "essential.serivce",
        "services[2].purposes",
    ):
        assert where in text, (where, text)


# ---- over mutual TLS -----------------------------------------------------------------------


def permission_of(error: grpc.aio.AioRpcError) -> str:
    """The permission a PERMISSION_DENIED status's ErrorInfo names."""
    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.metadata["permission"]
    return ""


async def denied(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
    return e.value


async def entries(c: Cluster, **match) -> list[dict]:
    found = [json.loads(e) for _, e, _ in await c.log()]
    return [e for e in found if all(e.get(k) == v for k, v in match.items())]


async def test_a_service_cannot_administer_review_or_ship_copies(module_cluster: Cluster):
    c = module_cluster
    admin = admin_pb2_grpc.AdminServiceStub(c.channel(PRIMARY, "service"))
    rules = admin.ApplyRules(admin_pb2.ApplyRulesRequest(rules_yaml="never_transfer: []"), timeout=10)
    assert permission_of(await denied(rules)) == "admin.rules"
    pause = admin.PauseReplication(admin_pb2.PauseReplicationRequest(region=SG), timeout=10)
    assert permission_of(await denied(pause)) == "admin.replication"
    log = translog_pb2_grpc.TransferLogServiceStub(c.channel(PRIMARY, "service"))
    assert permission_of(
        await denied(log.GetCheckpoint(translog_pb2.GetCheckpointRequest(), timeout=10))
    ) == ("translog.read")
    copies = replica_pb2_grpc.ReplicaServiceStub(c.channel(SG, "service", PRIMARY))
    forged = replica_pb2.ApplyCopiesRequest(copies=[replica_pb2.SealedCopy(user_id="f-1", version=999999)])
    assert permission_of(await denied(copies.ApplyCopies(forged, timeout=10))) == "replica.apply"
    # Nothing changed: replication is not paused, and the forged copy is not in ap-southeast-1.
    assert not (await c.replication())[SG].paused
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.get("f-1", region=SG)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # The refused copy named a user: ap-southeast-1's log has it, with the caller.
    refused = [json.loads(x) for _, x, _ in await c.log(SG) if json.loads(x)["kind"] == "access"]
    assert refused[-1]["subject"] == "f-1" and refused[-1]["outcome"] == "denied"
    assert refused[-1]["actor"] == "spiffe://residency/service/cn-north/test-suite"


async def test_a_region_node_takes_copies_from_no_identity_but_its_primarys(module_cluster: Cluster):
    c = module_cluster
    forged = replica_pb2.ApplyCopiesRequest(copies=[replica_pb2.SealedCopy(user_id="n-1", version=2**40)])
    for role, location in (("node", SG), ("node", IE), ("operator", PRIMARY), ("recipient", PRIMARY)):
        stub = replica_pb2_grpc.ReplicaServiceStub(c.channel(SG, role, location, "primary"))
        assert permission_of(await denied(stub.ApplyCopies(forged, timeout=10))) == "replica.apply"
    # The primary's own node identity is let through (an empty batch changes nothing).
    reply = await c.replica(SG).ApplyCopies(replica_pb2.ApplyCopiesRequest(), timeout=10)
    assert (reply.applied, reply.skipped) == (0, 0)


async def test_operators_and_reviewers_read_no_record_and_the_refusal_is_logged(module_cluster: Cluster):
    c = module_cluster
    await c.put("r-1", {"email": "r@example.cn", "national_id": "110105194912310021"})
    for role in ("operator", "reviewer", "approver", "node"):
        stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, role, PRIMARY, "nosy"))
        call = stub.GetRecord(
            records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="r-1"), timeout=10
        )
        e = await denied(call)
        assert permission_of(e) == "records.read" and "110105" not in e.details()
    refusals = await entries(c, kind="access", subject="r-1")
    assert [r["actor"].split("/")[3] for r in refusals] == ["operator", "reviewer", "approver", "node"]
    assert all(r["outcome"] == "denied" and r["fields"] == [] for r in refusals)
    assert "110105" not in json.dumps(refusals)
    # ... nor write one: the operator's put is refused and changes nothing.
    put = records_pb2.PutRecordRequest(
        context=ctx(PRIMARY, "essential.service"),
        record=records_pb2.Record(user_id="r-1", fields={"email": codec.to_value("evil@example.com")}),
    )
    operator = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "operator", PRIMARY, "nosy"))
    assert permission_of(await denied(operator.PutRecord(put, timeout=10))) == "records.write"
    assert values(await c.get("r-1"))["email"] == "r@example.cn"


async def recipient_read(c: Cluster, user: str, region: str, name: str):
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "recipient", region, name))
    return await stub.GetRecord(
        records_pb2.GetRecordRequest(context=ctx("", "essential.service"), user_id=user), timeout=10
    )


async def test_a_recipient_reads_under_its_own_grants_only(module_cluster: Cluster):
    c = module_cluster
    await c.put("p-1", {"email": "p@example.cn", "pages_visited": ["/a"], "address": "Beijing"})
    await c.grant(["p-1"], ["user.behavior.browsing_history"])
    # Its own grant: the granted category and nothing a rule sends to a service there.
    mine = await recipient_read(c, "p-1", SG, "sg-affiliate")
    assert set(mine.record.fields) == {"pages_visited"}
    # Another recipient, a recipient naming itself sg-affiliate from the home region, and one
    # without any grant read nothing, and each refusal is logged.
    for region, name in ((SG, "ie-affiliate"), (PRIMARY, "sg-affiliate"), (IE, "ie-affiliate")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await recipient_read(c, "p-1", region, name)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (region, name)
    reads = await entries(c, kind="remote_read", subject="p-1")
    assert [(r["actor"].split("/", 3)[3], r["outcome"]) for r in reads][-4:] == [
        (f"recipient/{SG}/sg-affiliate", "allowed"),
        (f"recipient/{SG}/ie-affiliate", "denied"),
        (f"recipient/{PRIMARY}/sg-affiliate", "denied"),
        (f"recipient/{IE}/ie-affiliate", "denied"),
    ]


async def until(check, what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < end, f"not within {deadline} s: {what}"
        await asyncio.sleep(0.1)


async def test_a_narrowed_access_policy_holds_a_service_to_its_purposes(idle_cluster: Cluster):
    c = idle_cluster
    (c.dir / "access.yaml").write_text(
        """
services:
  - identity: spiffe://residency/service/cn-north/billing
    purposes: [essential.service.payment_processing]
  - identity: spiffe://residency/service/*/*
    purposes: ["*"]
"""
    )
    await c.start(PRIMARY)
    await c.put("a-1", {"email": "a@example.cn"})
    billing = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", PRIMARY, "billing"))

    def read(purpose: str):
        return billing.GetRecord(
            records_pb2.GetRecordRequest(context=ctx("", purpose), user_id="a-1"), timeout=10
        )

    assert values(await read("essential.service.payment_processing"))["email"] == "a@example.cn"
    e = await denied(read("marketing.communications"))
    assert permission_of(e) == "purpose marketing.communications" and "access.yaml" in e.details()
    (refused,) = await entries(c, kind="access", subject="a-1")
    assert refused["actor"] == "spiffe://residency/service/cn-north/billing"
    assert refused["purpose"] == "marketing.communications" and refused["outcome"] == "denied"
    # SIGHUP rereads the policy: billing loses even its own purpose; a broken file keeps it so.
    (c.dir / "access.yaml").write_text("services: []\n")
    c.dep.procs[PRIMARY].send_signal(signal.SIGHUP)

    async def closed() -> bool:
        try:
            await read("essential.service.payment_processing")
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.PERMISSION_DENIED
        return False

    await until(closed, "the reread policy refuses billing")
    (c.dir / "access.yaml").write_text("services: [{identity: nobody, purposes: []}]\n")
    c.dep.procs[PRIMARY].send_signal(signal.SIGHUP)
    assert await closed()
    assert "access policy reload refused" in (await asyncio.to_thread(node_log, c))


def node_log(c: Cluster) -> str:
    end = time.monotonic() + 20
    while True:
        text = "".join(p.read_text() for p in (c.dir / "data" / PRIMARY).glob("*.log"))
        if "access policy reload refused" in text or time.monotonic() > end:
            return text
        time.sleep(0.1)
