"""Issue 13's authorization as a hostile caller tries it, over real nodes and mutual TLS: each
test takes a way around a protection (another field of the request, another call, a policy
narrowed meanwhile, a certificate the deployment does not expect) and checks that it is
refused cleanly, changes nothing, and is a transfer-log entry against the users it names."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from residency.server.core import codec
from residency.server.deployment import PRIMARY
from residency.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    consent_pb2,
    consent_pb2_grpc,
    disclosure_pb2,
    disclosure_pb2_grpc,
    records_pb2,
    records_pb2_grpc,
    translog_pb2,
    translog_pb2_grpc,
)
from tests.conftest import APPROVER, COOKIES, Cluster, ctx, values
from tests.test_access import denied, entries, permission_of, until
from tests.test_tls import revocation_list

SG = "ap-southeast-1"
BILLING = f"spiffe://residency/service/{PRIMARY}/billing"
PAYMENTS = "essential.service.payment_processing"
# billing may state payments only; every other service every purpose.
NARROWED = f"""
services:
  - identity: {BILLING}
    purposes: [{PAYMENTS}]
  - identity: spiffe://residency/service/*/*
    purposes: ["*"]
"""


def court_order(user: str, purpose: str) -> disclosure_pb2.RequestDisclosureRequest:
    return disclosure_pb2.RequestDisclosureRequest(
        context=ctx(PRIMARY, purpose),
        user_id=user,
        ground=disclosure_pb2.DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST,
        third_party="Haidian District Court",
        destination_country="CN",
        reference="R-9",
    )


def refuses_billing(c: Cluster, user: str) -> Callable[[], Awaitable[bool]]:
    """A check that billing's read of `user` for payments is refused (once a policy reread narrows it)."""
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", PRIMARY, "billing"))

    async def refused() -> bool:
        try:
            await stub.GetRecord(
                records_pb2.GetRecordRequest(context=ctx("", PAYMENTS), user_id=user), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.PERMISSION_DENIED
        return False

    return refused


def consents_stub(c: Cluster, name: str | None = None, location: str = PRIMARY):
    return consent_pb2_grpc.ConsentServiceStub(c.channel(PRIMARY, "service", location, name))


def consent(user: str, purpose: str, recipient: str = "") -> consent_pb2.Consent:
    return consent_pb2.Consent(user_id=user, purpose=purpose, recipient=recipient, evidence="web form")


async def standing(
    c: Cluster, user: str, name: str | None = None, purpose: str = "essential.service"
) -> set[tuple[str, str]]:
    """(purpose, recipient) of the user's standing consents, as a service lists them (default:
    the test suite's, which may state every purpose)."""
    reply = await consents_stub(c, name).ListConsents(
        consent_pb2.ListConsentsRequest(context=ctx(PRIMARY, purpose), user_id=user), timeout=10
    )
    return {(x.purpose, x.recipient) for x in reply.consents if not x.HasField("withdrawn_at")}


async def test_a_service_records_withdraws_or_lists_no_consent_for_a_purpose_its_policy_does_not_allow(
    idle_cluster: Cluster,
):
    c = idle_cluster
    (c.dir / "access.yaml").write_text(NARROWED)
    await c.start(PRIMARY)
    await c.put("k-1", {"email": "k@example.cn"})
    await c.accept_cookies("k-1")
    billing = consents_stub(c, "billing")
    # The lie: a purpose billing may state in the context, another in the consent it records.
    grant = billing.GrantConsents(
        consent_pb2.GrantConsentsRequest(
            context=ctx(PRIMARY, PAYMENTS),
            consents=[consent("k-1", "marketing.communications", "ie-affiliate")],
        ),
        timeout=10,
    )
    assert permission_of(await denied(grant)) == "purpose marketing.communications"
    # ... nor withdraws one (a withdrawn cookie consent would erase the user's cookie fields).
    withdraw = billing.WithdrawConsents(
        consent_pb2.WithdrawConsentsRequest(
            context=ctx(PRIMARY, PAYMENTS), consents=[consent("k-1", COOKIES)]
        ),
        timeout=10,
    )
    assert permission_of(await denied(withdraw)) == f"purpose {COOKIES}"
    assert await standing(c, "k-1") == {(COOKIES, "")}
    refusals = await entries(c, kind="access", subject="k-1", outcome="denied")
    assert [(r["actor"], r["purpose"]) for r in refusals] == [
        (BILLING, "marketing.communications"),
        (BILLING, COOKIES),
    ]
    # ... nor reads those it may not state: the cookie consent is not billing's to see.
    assert await standing(c, "k-1", "billing", PAYMENTS) == set()


async def test_an_approved_disclosure_is_not_released_once_the_policy_no_longer_allows_its_purpose(
    idle_cluster: Cluster,
):
    c = idle_cluster
    (c.dir / "access.yaml").write_text(NARROWED)
    await c.start(PRIMARY)
    await c.put("d-1", {"name": "Li Wei", "email": "li@example.cn"})
    billing = c.disclosures("service", "billing")
    asked = await billing.RequestDisclosure(court_order("d-1", PAYMENTS), timeout=10)
    await c.disclosures("approver", APPROVER).ApproveDisclosure(
        disclosure_pb2.ApproveDisclosureRequest(id=asked.id), timeout=10
    )
    # The operator narrows billing to nothing (say it was compromised) and the node rereads it.
    (c.dir / "access.yaml").write_text("services: []\n")
    c.dep.procs[PRIMARY].send_signal(signal.SIGHUP)
    await until(refuses_billing(c, "d-1"), "the reread policy refuses billing")
    e = await denied(
        billing.ReleaseDisclosure(disclosure_pb2.ReleaseDisclosureRequest(id=asked.id), timeout=10)
    )
    assert permission_of(e) == f"purpose {PAYMENTS}" and "Li Wei" not in e.details()
    release = [
        x for x in await entries(c, kind="disclosure", subject="d-1") if x["disclosure"]["step"] == "release"
    ]
    assert [(x["actor"], x["outcome"]) for x in release] == [(BILLING, "denied")]
    assert "Li Wei" not in json.dumps(release)


async def test_a_lied_location_is_logged_against_every_user_the_call_names(module_cluster: Cluster):
    c = module_cluster
    liar = f"spiffe://residency/service/{SG}/test-suite"
    users = ["l-1", "l-2"]
    records = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", SG))
    put = records.PutRecords(
        records_pb2.PutRecordsRequest(
            context=ctx(PRIMARY, "essential.service"),
            records=[
                records_pb2.Record(user_id=u, fields={"email": codec.to_value(f"{u}@example.cn")})
                for u in users
            ],
        ),
        timeout=10,
    )
    assert permission_of(await denied(put)) == f"location {PRIMARY}"
    grant = consents_stub(c, location=SG).GrantConsents(
        consent_pb2.GrantConsentsRequest(
            context=ctx(PRIMARY, "essential.service"), consents=[consent(u, COOKIES) for u in users]
        ),
        timeout=10,
    )
    await denied(grant)
    listed = consents_stub(c, location=SG).ListConsents(
        consent_pb2.ListConsentsRequest(context=ctx(PRIMARY, "essential.service"), user_id="l-1"), timeout=10
    )
    await denied(listed)
    lies = [(x["subject"], x["outcome"]) for x in await entries(c, kind="remote_read", actor=liar)]
    assert lies == [("l-1", "denied"), ("l-2", "denied")] * 2 + [("l-1", "denied")]


async def test_a_certificate_of_a_region_the_deployment_does_not_have_is_refused_and_logged(
    module_cluster: Cluster,
):
    c = module_cluster
    await c.put("m-1", {"email": "m@example.cn"})
    mars = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", "mars"))
    e = await denied(
        mars.GetRecord(
            records_pb2.GetRecordRequest(context=ctx("", "essential.service"), user_id="m-1"), timeout=10
        )
    )
    assert "m@example.cn" not in e.details()
    (refusal,) = await entries(c, subject="m-1", actor="spiffe://residency/service/mars/test-suite")
    assert refusal["outcome"] == "denied" and refusal["destination_region"] == "mars"


def grants_stub(c: Cluster) -> consent_pb2_grpc.GrantServiceStub:
    return consent_pb2_grpc.GrantServiceStub(c.channel(PRIMARY, "operator"))


def grant_of(user: str, ends_in: float, grant_id: str = "") -> consent_pb2.CreateGrantRequest:
    return consent_pb2.CreateGrantRequest(
        context=ctx(PRIMARY, "essential.service"),
        grant=consent_pb2.Grant(
            id=grant_id,
            recipient="sg-affiliate",
            purpose="essential.service",
            categories=["user.behavior.browsing_history"],
            user_ids=[user],
            ends_at=codec.timestamp(time.time() + ends_in),
        ),
    )


async def listed_grant(c: Cluster, grant_id: str) -> consent_pb2.Grant:
    reply = await grants_stub(c).ListGrants(
        consent_pb2.ListGrantsRequest(context=ctx(PRIMARY, "essential.service")), timeout=10
    )
    (found,) = [g for g in reply.grants if g.id == grant_id]
    return found


async def test_revoking_a_grant_that_already_ended_is_no_act_and_says_so(module_cluster: Cluster):
    c = module_cluster
    made = await grants_stub(c).CreateGrant(grant_of("h-1", 1.0), timeout=10)

    async def ended() -> bool:
        return any("ended" in x["reason"] for x in await entries(c, kind="grant", subject="h-1"))

    await until(ended, "the policy sweep ends the grant")
    reply = await grants_stub(c).RevokeGrant(
        consent_pb2.RevokeGrantRequest(context=ctx(PRIMARY, "essential.service"), id=made.id), timeout=10
    )
    # Nothing was revoked (the grant had ended): the reply says so, as ListGrants does.
    assert not reply.revoked
    assert (await listed_grant(c, made.id)).state == consent_pb2.GRANT_STATE_ENDED


async def test_a_credential_check_from_abroad_is_refused_and_logged_against_the_user(module_cluster: Cluster):
    c = module_cluster
    await c.put("v-1", {"email": "v@example.cn", "password": "correct horse battery"})
    abroad = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", SG))
    check = abroad.VerifyCredential(
        records_pb2.VerifyCredentialRequest(
            context=ctx("", "essential.service"),
            user_id="v-1",
            field="password",
            secret="correct horse battery",
        ),
        timeout=10,
    )
    e = await denied(check)
    assert "horse" not in e.details()
    (refusal,) = await entries(c, subject="v-1", actor=f"spiffe://residency/service/{SG}/test-suite")
    assert refusal["outcome"] == "denied" and "horse" not in json.dumps(refusal)


async def test_a_revocation_list_missing_at_sighup_keeps_its_serials_and_the_access_policy_is_still_reread(
    idle_cluster: Cluster,
):
    c = idle_cluster
    (c.dir / "access.yaml").write_text(NARROWED)
    revoked = revocation_list(c)
    await c.start(PRIMARY)
    await c.put("s-1", {"email": "s@example.cn"})
    await records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", PRIMARY, "billing")).GetRecord(
        records_pb2.GetRecordRequest(context=ctx("", PAYMENTS), user_id="s-1"), timeout=10
    )
    # The operator narrows billing while the revocation list is being replaced (moved away).
    revoked.rename(revoked.with_name("revoked.txt.old"))
    (c.dir / "access.yaml").write_text("services: []\n")
    c.dep.procs[PRIMARY].send_signal(signal.SIGHUP)
    await until(
        refuses_billing(c, "s-1"), "the access policy is reread though the revocation list is missing"
    )
    assert c.dep.procs[PRIMARY].poll() is None


async def test_the_approver_cannot_approve_what_it_asked_for_under_its_name_in_other_letters(
    module_cluster: Cluster,
):
    c = module_cluster
    await c.put("w-1", {"name": "Wang Fang", "email": "w@example.cn"})
    asking = c.disclosures("service", APPROVER.upper())
    asked = await asking.RequestDisclosure(
        court_order("w-1", "third_party_sharing.legal_obligation"), timeout=10
    )
    approve = c.disclosures("approver", APPROVER).ApproveDisclosure(
        disclosure_pb2.ApproveDisclosureRequest(id=asked.id), timeout=10
    )
    assert "two-person rule" in (await denied(approve)).details()
    steps = [x["disclosure"]["step"] for x in await entries(c, kind="disclosure", subject="w-1")]
    assert steps == ["request", "approve"]
    (approval,) = [
        x for x in await entries(c, kind="disclosure", subject="w-1") if x["disclosure"]["step"] == "approve"
    ]
    assert approval["outcome"] == "denied"


async def test_an_access_policy_reread_on_sighup_is_a_transfer_log_entry(idle_cluster: Cluster):
    c = idle_cluster
    (c.dir / "access.yaml").write_text(NARROWED)
    await c.start(PRIMARY)
    await c.put("t-1", {"email": "t@example.cn"})
    # Whoever widens or narrows what services may do leaves a trace, as a rules change does.
    (c.dir / "access.yaml").write_text("services: []\n")
    c.dep.procs[PRIMARY].send_signal(signal.SIGHUP)
    await until(refuses_billing(c, "t-1"), "the reread policy refuses billing")
    (reread,) = [x for x in await entries(c, kind="admin") if "access.yaml" in x["reason"]]
    assert reread["actor"] == "sighup" and reread["outcome"] == "allowed"
    assert "0 entries" in reread["reason"]


async def test_rules_naming_another_home_region_or_dropping_a_destination_are_refused_and_change_nothing(
    module_cluster: Cluster,
):
    c = module_cluster
    await c.put("x-1", {"email": "x@example.cn", "national_id": "110105194912310021"})
    text = (c.dir / "rules.yaml").read_text()
    before = (await c.status(PRIMARY)).rules_version
    operator = admin_pb2_grpc.AdminServiceStub(c.channel(PRIMARY, "operator"))
    # A node refuses to start on either: the first would make ap-southeast-1 "home", where
    # every field goes; the second leaves a replication destination without any recipient.
    for lie in (
        text.replace(f"home_region: {PRIMARY}", f"home_region: {SG}"),
        "home_region: 1e999\n",
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await operator.ApplyRules(admin_pb2.ApplyRulesRequest(rules_yaml=lie), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert (await c.status(PRIMARY)).rules_version == before
    assert (c.dir / "rules.yaml").read_text() == text
    assert set(values(await c.get("x-1", region=PRIMARY, location=SG))) <= {"email"}


async def test_a_location_that_is_no_region_is_a_lie_too(module_cluster: Cluster):
    c = module_cluster
    put = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY)).PutRecord(
        records_pb2.PutRecordRequest(
            context=ctx("mars-1", "essential.service"),
            record=records_pb2.Record(user_id="nr-1", fields={"email": codec.to_value("w@example.cn")}),
        ),
        timeout=10,
    )
    e = await denied(put)
    # The caller's words are not repeated: not to it, not in the log, which keeps them for good.
    assert permission_of(e) == "location"
    assert "mars-1" not in e.details() and "w@example.cn" not in e.details()
    (lie,) = await entries(c, subject="nr-1")
    assert (lie["kind"], lie["outcome"], lie["destination_region"]) == ("remote_read", "denied", PRIMARY)
    assert "mars-1" not in json.dumps(lie)
    with pytest.raises(grpc.aio.AioRpcError) as nf:
        await c.get("nr-1")
    assert nf.value.code() == grpc.StatusCode.NOT_FOUND


async def test_consents_are_not_listed_to_a_service_abroad(module_cluster: Cluster):
    c = module_cluster
    await consents_stub(c).GrantConsents(
        consent_pb2.GrantConsentsRequest(
            context=ctx(PRIMARY, "essential.service"), consents=[consent("lc-1", COOKIES)]
        ),
        timeout=10,
    )
    abroad = consents_stub(c, location=SG).ListConsents(
        consent_pb2.ListConsentsRequest(context=ctx("", "essential.service"), user_id="lc-1"), timeout=10
    )
    e = await denied(abroad)
    assert permission_of(e) == f"consents.read in {PRIMARY}" and "web form" not in e.details()
    (refusal,) = await entries(c, subject="lc-1", actor=f"spiffe://residency/service/{SG}/test-suite")
    assert (refusal["kind"], refusal["outcome"]) == ("remote_read", "denied")
    assert await standing(c, "lc-1") == {(COOKIES, "")}  # at home, listed as before


async def test_a_wrong_role_is_refused_for_its_role_even_with_a_number_out_of_range(module_cluster: Cluster):
    c = module_cluster
    # A reviewer may not create grants: that it also sent an out-of-range time changes nothing.
    request = grant_of("g-9", 60)
    request.grant.ends_at.seconds = 10**12
    reviewer = consent_pb2_grpc.GrantServiceStub(c.channel(PRIMARY, "reviewer"))
    e = await denied(reviewer.CreateGrant(request, timeout=10))
    assert permission_of(e) == "grants.write"
    (refusal,) = await entries(c, subject="g-9")
    assert (refusal["kind"], refusal["outcome"]) == ("access", "denied")
    # The operator, who may, is told what is wrong with the request.
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await grants_stub(c).CreateGrant(request, timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grant.ends_at" in bad.value.details()


async def test_a_refused_transfer_log_query_is_logged_against_the_subject_it_names(module_cluster: Cluster):
    c = module_cluster
    log = translog_pb2_grpc.TransferLogServiceStub(c.channel(PRIMARY, "operator"))
    e = await denied(log.SubjectReport(translog_pb2.SubjectReportRequest(subject="sr-1"), timeout=10))
    assert permission_of(e) == "translog.read"
    (refusal,) = await entries(c, subject="sr-1")
    assert (refusal["kind"], refusal["outcome"]) == ("access", "denied")


async def test_a_refused_call_writes_its_purpose_to_the_log_only_if_it_is_a_data_use(module_cluster: Cluster):
    c = module_cluster
    # A reviewer (no records.read) states a "purpose" that is 58 KB of someone's data.
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "reviewer"))
    words = "Zhang Wei 110105194912310021 " * 2_000  # 58 KB: read for the log (over 64 KiB: not)
    for user, purpose in (("pw-1", words), ("pw-2", "essential.service")):
        request = records_pb2.GetRecordRequest(context=ctx(PRIMARY, purpose), user_id=user)
        call = stub.GetRecord(request, timeout=10)
        assert permission_of(await denied(call)) == "records.read"
    (words_refused,) = await entries(c, subject="pw-1")
    (use_refused,) = await entries(c, subject="pw-2")
    assert (words_refused["outcome"], words_refused["purpose"]) == ("denied", "")
    assert "110105" not in json.dumps(words_refused)
    assert use_refused["purpose"] == "essential.service"


async def test_an_erasure_or_a_consent_from_abroad_is_refused_logged_and_changes_nothing(
    module_cluster: Cluster,
):
    c = module_cluster
    await c.put("ab-1", {"email": "ab@example.cn"})
    abroad = f"spiffe://residency/service/{SG}/test-suite"
    records = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", SG))
    erase = records.DeleteRecord(
        records_pb2.DeleteRecordRequest(context=ctx("", "essential.service"), user_id="ab-1"), timeout=10
    )
    assert permission_of(await denied(erase)) == f"records.write in {PRIMARY}"
    grant = consents_stub(c, location=SG).GrantConsents(
        consent_pb2.GrantConsentsRequest(
            context=ctx("", "essential.service"), consents=[consent("ab-1", "marketing.advertising")]
        ),
        timeout=10,
    )
    assert permission_of(await denied(grant)) == f"consents.write in {PRIMARY}"
    # The record is there, with no consent recorded, and both refusals are in the log.
    assert values(await c.get("ab-1"))["email"] == "ab@example.cn"
    assert ("marketing.advertising", "") not in await standing(c, "ab-1")
    refusals = await entries(c, subject="ab-1", actor=abroad)
    assert [(x["kind"], x["outcome"]) for x in refusals] == [("access", "denied")] * 2


async def test_an_affiliates_operator_cannot_administer_the_home_regions_node(module_cluster: Cluster):
    c = module_cluster
    theirs = f"spiffe://residency/operator/{SG}/test-suite"
    admin = admin_pb2_grpc.AdminServiceStub(c.channel(PRIMARY, "operator", SG))
    rules = admin.ApplyRules(admin_pb2.ApplyRulesRequest(rules_yaml="never_transfer: []"), timeout=10)
    assert permission_of(await denied(rules)) == "admin.rules"
    pause = admin.PauseReplication(admin_pb2.PauseReplicationRequest(region=SG), timeout=10)
    assert permission_of(await denied(pause)) == "admin.replication"
    explain = admin.ExplainTransfer(admin_pb2.ExplainTransferRequest(user_id="ao-1", to=SG), timeout=10)
    assert permission_of(await denied(explain)) == "admin.explain"
    grants = consent_pb2_grpc.GrantServiceStub(c.channel(PRIMARY, "operator", SG))
    request = grant_of("ao-1", 60)
    request.context.location = ""
    assert permission_of(await denied(grants.CreateGrant(request, timeout=10))) == "grants.write"
    # Nothing changed, every refusal is logged with the operator as actor, and its status
    # (which names no user) is still answered.
    assert not (await c.replication())[SG].paused
    assert [x["outcome"] for x in await entries(c, subject="ao-1", actor=theirs)] == ["denied"] * 2
    assert (await admin.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)).region == PRIMARY


async def test_a_disclosure_is_requested_at_home_only_and_its_texts_are_bounded(module_cluster: Cluster):
    c = module_cluster
    await c.put("dq-1", {"email": "dq@example.cn"})
    abroad = disclosure_pb2_grpc.DisclosureServiceStub(c.channel(PRIMARY, "service", SG))
    request = court_order("dq-1", "essential.legal_obligation")
    request.context.location = ""
    e = await denied(abroad.RequestDisclosure(request, timeout=10))
    assert permission_of(e) == f"disclosures.request in {PRIMARY}"
    # At home, a third party's name the length of a document is refused before anything is logged.
    home = disclosure_pb2_grpc.DisclosureServiceStub(c.channel(PRIMARY, "service"))
    long = court_order("dq-1", "essential.legal_obligation")
    long.third_party = "x" * 501
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await home.RequestDisclosure(long, timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "third_party" in bad.value.details()
    assert [x["kind"] for x in await entries(c, subject="dq-1") if x["kind"] == "disclosure"] == []
