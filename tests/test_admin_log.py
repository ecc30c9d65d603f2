"""Every administrative act is a transfer-log entry naming the authenticated actor (issue 13,
point 5): pause, resume and dead-letter retry (kind `admin`), rules apply, grant create and
revoke, on real nodes over mutual TLS; a header or a flag that names someone else changes
nothing. (Key commands: tests/test_keys_node.py; retry with real dead letters:
tests/test_replicator.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from residency.server.core import codec
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import admin_pb2, admin_pb2_grpc, consent_pb2, consent_pb2_grpc, translog_pb2
from tests.conftest import Cluster, ctx

EU = "eu-west-1"
ALICE = "spiffe://residency/operator/cn-north/alice"
# What a caller who lies says about itself: no header names anyone any more.
LIE = (("x-residency-identity", "spiffe://residency/operator/cn-north/operator"),)


def residency(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "residency.cli.main", *args], capture_output=True, text=True, timeout=60
    )


async def entries(cluster: Cluster, after: int = 0, region: str = PRIMARY, **match: str) -> list[dict]:
    """The entries of `region`'s log after sequence `after` that have the values of `match`."""
    found = [json.loads(e) for seq, e, _ in await cluster.log(region) if seq > after]
    return [e for e in found if all(e.get(k) == v for k, v in match.items())]


async def head(cluster: Cluster) -> int:
    return max((seq for seq, _, _ in await cluster.log()), default=0)


async def test_pause_resume_and_retry_are_logged_under_the_certificates_identity(cluster: Cluster):
    admin = admin_pb2_grpc.AdminServiceStub(cluster.channel(PRIMARY, "operator", PRIMARY, name="alice"))
    start = await head(cluster)
    await admin.PauseReplication(admin_pb2.PauseReplicationRequest(region=EU), metadata=LIE, timeout=10)
    await admin.ResumeReplication(admin_pb2.ResumeReplicationRequest(region=EU), metadata=LIE, timeout=10)
    await admin.RetryDeadLetters(admin_pb2.RetryDeadLettersRequest(region=EU), metadata=LIE, timeout=10)
    reply = await admin.RetryDeadLetters(admin_pb2.RetryDeadLettersRequest(), timeout=10)  # every destination
    assert reply.marked == 0
    acts = await entries(cluster, start, kind="admin")
    assert [(e["destination_region"], e["reason"]) for e in acts] == [
        (EU, "paused: replication held until resumed"),
        (EU, "resumed: replication goes on"),
        (EU, "retried: 0 dead letters marked to be sent again"),
        *((r, "retried: 0 dead letters marked to be sent again") for r in AFFILIATES),
    ]
    for e in acts:
        assert e["actor"] == ALICE and e["outcome"] == "allowed" and e["source_region"] == PRIMARY
        assert e["subject"] == "" and not e["fields"]
    # Refused acts change nothing and are not logged.
    seen = await head(cluster)
    for call, request in (
        (admin.PauseReplication, admin_pb2.PauseReplicationRequest(region="mars-1")),
        (admin.RetryDeadLetters, admin_pb2.RetryDeadLettersRequest(region="mars-1")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "mars-1" in e.value.details()
    assert await head(cluster) == seen
    # At a region node: the home's operator may not act there; its own has nothing to pause.
    home_op = admin_pb2_grpc.AdminServiceStub(
        cluster.channel(AFFILIATES[0], "operator", PRIMARY, name="alice")
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await home_op.PauseReplication(admin_pb2.PauseReplicationRequest(region=EU), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    sg = admin_pb2_grpc.AdminServiceStub(
        cluster.channel(AFFILIATES[0], "operator", AFFILIATES[0], name="bob")
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sg.PauseReplication(admin_pb2.PauseReplicationRequest(region=EU), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not await entries(cluster, region=AFFILIATES[0], kind="admin")

    # The operator's command: its own certificate is the actor. Reviewers find the acts with
    # a kind filter, and an exported log holding them verifies offline.
    r = residency("replication", "pause", *cluster.target(), "--region", EU)
    assert r.returncode == 0, r.stderr
    (paused,) = await entries(cluster, seen, kind="admin")
    assert paused["actor"] == "spiffe://residency/operator/cn-north/operator"
    found = [
        json.loads(e.entry_json)
        async for page in cluster.transfer_log().Query(translog_pb2.QueryRequest(kind="admin"), timeout=10)
        for e in page.entries
    ]
    assert found == [*acts, paused]
    out = cluster.dir / "export"
    r = residency("log", "export", *cluster.target("reviewer"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = residency("log", "verify", str(out), "--key", str(cluster.dir / "keys" / PRIMARY / "log.pub"))
    assert r.returncode == 0, r.stderr
    r = residency(
        "log", "report", "--bundle", str(out), "--key", str(cluster.dir / "keys" / PRIMARY / "log.pub"),
        "--format", "jsonl", "--out", str(out / "report.jsonl"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    reported = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert sum(1 for e in reported if e.get("kind") == "admin") == len(found)


async def test_rules_apply_and_grants_name_the_certificate_not_what_the_caller_says(
    cluster: Cluster, tmp_path: Path
):
    alice = cluster.channel(PRIMARY, "operator", PRIMARY, name="alice")
    start = await head(cluster)
    rules = (cluster.dir / "rules.yaml").read_text()
    applied = await admin_pb2_grpc.AdminServiceStub(alice).ApplyRules(
        admin_pb2.ApplyRulesRequest(rules_yaml=rules + "\n# reviewed\n"), metadata=LIE, timeout=30
    )
    (change,) = await entries(cluster, start, kind="rules_change")
    assert change["actor"] == ALICE and change["rules_version"] == applied.version

    await cluster.put("g-1", {"email": "g@example.cn", "pages_visited": ["/a"]})
    grants = consent_pb2_grpc.GrantServiceStub(alice)
    grant = consent_pb2.Grant(
        recipient="sg-affiliate",
        purpose="essential.service",
        categories=["user.behavior.browsing_history"],
        user_ids=["g-1"],
        ends_at=codec.timestamp(time.time() + 3600),
    )
    # A caller who states a location its certificate does not name is refused; no grant.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await grants.CreateGrant(
            consent_pb2.CreateGrantRequest(context=ctx(EU, "essential.service"), grant=grant), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not await entries(cluster, start, kind="grant")
    c = ctx(PRIMARY, "essential.service")
    created = await grants.CreateGrant(consent_pb2.CreateGrantRequest(context=c, grant=grant), metadata=LIE)
    revoked = await grants.RevokeGrant(consent_pb2.RevokeGrantRequest(context=c, id=created.id), metadata=LIE)
    assert revoked.revoked
    logged = await entries(cluster, start, kind="grant", subject="g-1")
    assert [e["reason"].split(" (grant ")[1] for e in logged] == [f"{created.id})"] * 2
    assert [e["actor"] for e in logged] == [ALICE, ALICE]
