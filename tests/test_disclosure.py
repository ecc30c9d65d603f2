"""Disclosure under the two-person rule (policy 3, issue 13), over real nodes and mutual TLS:
one identity asks, a different identity holding the `approver` role approves, and only then
does the one who asked receive the fields; every step, taken or refused, is a transfer-log
entry naming its actor. Each test plays the caller who lies and checks that it fails."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from residency.server.deployment import PRIMARY
from residency.v1 import disclosure_pb2
from tests.conftest import APPROVER, Cluster, ctx

SERVICE = f"spiffe://residency/service/{PRIMARY}/test-suite"
APPROVER_URI = f"spiffe://residency/approver/{PRIMARY}/{APPROVER}"
JUDICIAL = disclosure_pb2.DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST
COURT = {"third_party": "Haidian District Court", "destination_country": "CN", "reference": "R-7"}
LI = {"name": "Li Wei", "email": "li@example.cn", "password": "hunter2-hunter2"}


async def ask(cluster: Cluster, user: str, ground: int = JUDICIAL, **kw) -> str:
    """The test suite's service asks; the request's id."""
    req = disclosure_pb2.RequestDisclosureRequest(
        context=ctx(PRIMARY, "third_party_sharing.legal_obligation"),
        user_id=user,
        ground=ground,
        **(kw or COURT),
    )
    return (await cluster.disclosures().RequestDisclosure(req, timeout=10)).id


async def approve(
    cluster: Cluster, request_id: str, role: str = "approver", name: str | None = APPROVER
) -> int:
    reply = await cluster.disclosures(role, name).ApproveDisclosure(
        disclosure_pb2.ApproveDisclosureRequest(id=request_id), timeout=10
    )
    return reply.log_sequence


async def release(
    cluster: Cluster, request_id: str, role: str = "service", name: str | None = None
) -> disclosure_pb2.ReleaseDisclosureResponse:
    return await cluster.disclosures(role, name).ReleaseDisclosure(
        disclosure_pb2.ReleaseDisclosureRequest(id=request_id), timeout=10
    )


async def refused(call, code: grpc.StatusCode) -> str:
    """Awaits `call`, which must fail with `code`; its details."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, (e.value.code(), e.value.details())
    return e.value.details()


async def steps(cluster: Cluster, user: str) -> list[dict]:
    """The user's disclosure entries, in log order."""
    entries = [json.loads(e) for _, e, _ in await cluster.log()]
    return [e for e in entries if e["kind"] == "disclosure" and e["subject"] == user]


async def test_asked_approved_by_another_person_then_released_to_the_requester_once(module_cluster: Cluster):
    c = module_cluster
    await c.put("tp-1", LI)
    request_id = await ask(c, "tp-1")
    listed = await c.disclosures("approver", APPROVER).ListDisclosures(
        disclosure_pb2.ListDisclosuresRequest(state=disclosure_pb2.DISCLOSURE_STATE_REQUESTED), timeout=10
    )
    (waiting,) = [d for d in listed.disclosures if d.id == request_id]
    assert waiting.requester == SERVICE and waiting.reference == "R-7" and waiting.ground == JUDICIAL
    assert "li@example.cn" not in str(listed)  # approvers see ids and evidence, never a value
    await approve(c, request_id)
    given = await release(c, request_id)
    assert set(given.fields) == {"name", "email"} and [w.field for w in given.withheld] == ["password"]
    assert given.disclosure.state == disclosure_pb2.DISCLOSURE_STATE_RELEASED
    assert given.disclosure.decided_by == APPROVER_URI
    # Released once: the approval was for one handover.
    says = await refused(release(c, request_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "already released" in says
    logged = await steps(c, "tp-1")
    assert [(e["disclosure"]["step"], e["outcome"], e["actor"]) for e in logged] == [
        ("request", "allowed", SERVICE),
        ("approve", "allowed", APPROVER_URI),
        ("release", "allowed", SERVICE),
        ("release", "denied", SERVICE),
    ]
    for e in logged:  # each entry carries the evidence references
        d = e["disclosure"]
        assert d["request"] == request_id and d["ground"] == "judicial_or_administrative_request"
        assert d["reference"] == "R-7" and d["requester"] == SERVICE
        assert e["recipient"] == "Haidian District Court" and e["destination_country"] == "CN"
    assert logged[2]["disclosure"]["approver"] == APPROVER_URI
    assert [f["name"] for f in logged[2]["fields"]] == ["email", "name"]
    assert not any(e["fields"] for e in logged[:2])  # nothing crossed before the release
    assert "li@example.cn" not in json.dumps(logged) and "Li Wei" not in json.dumps(logged)


async def test_the_requester_cannot_approve_its_own_request_under_any_certificate(module_cluster: Cluster):
    c = module_cluster
    await c.put("tp-2", LI)
    request_id = await ask(c, "tp-2")
    await refused(approve(c, request_id, "service", None), grpc.StatusCode.PERMISSION_DENIED)
    # The same holder with an approver's certificate of its own name is still one person.
    says = await refused(approve(c, request_id, "approver", "test-suite"), grpc.StatusCode.PERMISSION_DENIED)
    assert "two-person rule" in says and "li@" not in says
    await refused(release(c, request_id), grpc.StatusCode.FAILED_PRECONDITION)  # still unapproved
    logged = await steps(c, "tp-2")
    assert [(e["disclosure"]["step"], e["outcome"]) for e in logged][1:2] == [("approve", "denied")]
    assert logged[1]["actor"] == f"spiffe://residency/approver/{PRIMARY}/test-suite"
    # The requester's own certificate was refused by the role table, and that is logged too.
    entries = [json.loads(e) for _, e, _ in await c.log()]
    tried = [e for e in entries if e["kind"] == "access" and e["actor"] == SERVICE]
    assert tried and "lacks permission disclosures.approve" in tried[-1]["reason"]


async def test_a_service_that_is_not_an_approver_cannot_approve(module_cluster: Cluster):
    """Refused by the role table (only `approver` may call ApproveDisclosure)."""
    c = module_cluster
    await c.put("tp-3", LI)
    request_id = await ask(c, "tp-3")
    await refused(approve(c, request_id, "service", "another-service"), grpc.StatusCode.PERMISSION_DENIED)
    await refused(approve(c, request_id, "operator", None), grpc.StatusCode.PERMISSION_DENIED)
    await refused(release(c, request_id), grpc.StatusCode.FAILED_PRECONDITION)


async def test_nobody_but_the_requester_receives_the_fields(module_cluster: Cluster):
    c = module_cluster
    await c.put("tp-4", LI)
    request_id = await ask(c, "tp-4")
    says = await refused(release(c, request_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "ApproveDisclosure" in says  # before approval, not even to the requester
    await approve(c, request_id)
    for role, name in (("service", "another-service"), ("approver", APPROVER), ("operator", None)):
        await refused(release(c, request_id, role, name), grpc.StatusCode.PERMISSION_DENIED)
    # Another region's service of the same name is another identity.
    other = c.disclosures("service", None, "ap-southeast-1")
    await refused(
        other.ReleaseDisclosure(disclosure_pb2.ReleaseDisclosureRequest(id=request_id), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert set((await release(c, request_id)).fields) == {"name", "email"}
    logged = await steps(c, "tp-4")
    refusals = [e for e in logged if e["disclosure"]["step"] == "release" and e["outcome"] == "denied"]
    assert [e["actor"] for e in refusals] == [
        SERVICE,
        f"spiffe://residency/service/{PRIMARY}/another-service",
        f"spiffe://residency/operator/{PRIMARY}/operator",
        "spiffe://residency/service/ap-southeast-1/test-suite",
    ]
    assert not any(e["fields"] for e in refusals)
    # The approver may not receive at all (the role table refuses it, and logs that).
    entries = [json.loads(e) for _, e, _ in await c.log()]
    assert any(e["kind"] == "access" and e["actor"] == APPROVER_URI for e in entries)


async def test_a_denied_request_never_releases(module_cluster: Cluster):
    c = module_cluster
    await c.put("tp-5", LI)
    request_id = await ask(c, "tp-5")
    approver = c.disclosures("approver", APPROVER)
    says = await refused(
        approver.DenyDisclosure(disclosure_pb2.DenyDisclosureRequest(id=request_id, reason=" "), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "reason" in says
    await approver.DenyDisclosure(
        disclosure_pb2.DenyDisclosureRequest(id=request_id, reason="the order names another account"),
        timeout=10,
    )
    assert "was denied" in await refused(release(c, request_id), grpc.StatusCode.FAILED_PRECONDITION)
    await refused(approve(c, request_id), grpc.StatusCode.FAILED_PRECONDITION)  # a denial is final
    logged = await steps(c, "tp-5")
    denial = [e for e in logged if e["disclosure"]["step"] == "deny"]
    assert [(e["outcome"], e["actor"]) for e in denial] == [("denied", APPROVER_URI)]
    assert "the order names another account" in denial[0]["reason"]
    assert not any(e["fields"] for e in logged)


async def test_a_record_erased_after_approval_discloses_nothing(module_cluster: Cluster):
    c = module_cluster
    await c.put("tp-6", LI)
    request_id = await ask(c, "tp-6")
    await approve(c, request_id)
    await c.delete("tp-6")
    await refused(release(c, request_id), grpc.StatusCode.NOT_FOUND)
    (last,) = (await steps(c, "tp-6"))[-1:]
    assert last["disclosure"]["step"] == "release" and last["outcome"] == "denied" and not last["fields"]
    assert last["actor"] == SERVICE


async def test_a_consent_withdrawn_after_approval_stops_a_3a_release(module_cluster: Cluster):
    c = module_cluster
    await c.put("tp-7", LI)
    await c.consent("tp-7", "third_party_sharing", "Acme Insurance")
    request_id = await ask(
        c,
        "tp-7",
        disclosure_pb2.DISCLOSURE_GROUND_CONSENT,
        third_party="Acme Insurance",
        destination_country="SG",
    )
    await approve(c, request_id)
    await c.consent("tp-7", "third_party_sharing", "Acme Insurance", withdraw=True)
    assert "consent" in await refused(release(c, request_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert not any(e["fields"] for e in await steps(c, "tp-7"))


async def test_request_ids_that_were_never_issued_are_refused_cleanly(module_cluster: Cluster):
    c = module_cluster
    approver = c.disclosures("approver", APPROVER)
    for bad in ("", "nonsense", "0" * 33, "DROP TABLE disclosures", "\u00e9" * 32):
        for call in (
            approver.ApproveDisclosure(disclosure_pb2.ApproveDisclosureRequest(id=bad), timeout=10),
            approver.DenyDisclosure(disclosure_pb2.DenyDisclosureRequest(id=bad, reason="no"), timeout=10),
            release(c, bad),
        ):
            assert "id" in await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    unknown = uuid.uuid4().hex
    await refused(approve(c, unknown), grpc.StatusCode.NOT_FOUND)
    await refused(release(c, unknown), grpc.StatusCode.NOT_FOUND)
    await refused(
        approver.ListDisclosures(disclosure_pb2.ListDisclosuresRequest(state=99), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(ask(c, "tp-nobody"), grpc.StatusCode.NOT_FOUND)


async def test_the_one_call_disclose_releases_nothing_and_names_the_new_calls(module_cluster: Cluster):
    c = module_cluster
    await c.put("tp-8", LI)
    old = disclosure_pb2.DiscloseRequest(
        context=ctx(PRIMARY, "third_party_sharing.legal_obligation"),
        user_id="tp-8",
        ground=JUDICIAL,
        approver="legal:wang",  # a name the caller typed: it never approved anything
        **COURT,
    )
    says = await refused(c.disclosures().Disclose(old, timeout=10), grpc.StatusCode.FAILED_PRECONDITION)
    assert all(call in says for call in ("RequestDisclosure", "ApproveDisclosure", "ReleaseDisclosure"))
    assert await steps(c, "tp-8") == []
