"""Blind indexes and `RecordService.FindRecords` (issue 18, points 1 and 5): finds by e-mail and
phone however they are written, under exactly the read rules of GetRecord (a caller whose rules
do not allow the field gets nothing about it), logged like reads; erasure removes the index;
the index key rotates while finds go on; a region node finds by the fields it holds; index
values appear in plaintext nowhere; lying callers are refused."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Awaitable

import grpc
import pytest
from pydantic import ValidationError

from residency.server.config.schema import FieldFile
from residency.server.core import report
from residency.server.core.lookup import normalize
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import admin_pb2, admin_pb2_grpc, records_pb2, records_pb2_grpc, translog_pb2
from tests.conftest import Cluster, ctx, values
from tests.harness import eventually

SG, EU = AFFILIATES
SERVICE = "essential.service"


async def find(
    cluster: Cluster,
    field: str,
    value: str,
    *,
    region: str = PRIMARY,
    location: str | None = None,
    purpose: str = SERVICE,
    role: str = "service",
    limit: int = 0,
    page_token: str = "",
) -> records_pb2.FindRecordsResponse:
    stub = records_pb2_grpc.RecordServiceStub(cluster.channel(region, role, location))
    request = records_pb2.FindRecordsRequest(
        context=ctx(location or region, purpose), field=field, value=value, limit=limit, page_token=page_token
    )
    return await stub.FindRecords(request, timeout=30)


def found(reply: records_pb2.FindRecordsResponse) -> list[str]:
    return [r.record.user_id for r in reply.results]


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value


async def entries(cluster: Cluster, region: str = PRIMARY) -> list[dict]:
    return [json.loads(e) for _, e, _ in await cluster.log(region)]


def index_rows(cluster: Cluster, region: str = PRIMARY) -> list[tuple[int, str, bytes, str]]:
    return cluster.query(region, "SELECT key_version, field, hmac, user_id FROM lookup_index")


# ---- normalisation and the schema (pure) ------------------------------------------------------


def test_normalisations_make_the_forms_of_one_value_alike():
    assert normalize("email", "  Li.Wei@Example.CN ") == normalize("email", "li.wei@example.cn")
    spaced, packed, dashed = "+86 138 0013 8000", "+8613800138000", "(+86) 138-0013-8000"
    assert {normalize("e164", v) for v in (spaced, packed, dashed)} == {"+8613800138000"}
    # Without a country code no country is assumed: its digits, however they are grouped.
    assert normalize("e164", "138-0013-8000") == normalize("e164", "13800138000") == "13800138000"
    assert normalize("lower", " ABC ") == "abc" and normalize("none", " ABC ") == " ABC "
    assert normalize("e164", "+86 138 0013 8000") != normalize("e164", "+86 138 0013 8001")


@pytest.mark.parametrize(
    "spec, why",
    [
        ({"category": "user.contact.email", "type": "list", "lookup": True}, "needs a string field"),
        ({"category": "user.authorization.password", "type": "string", "lookup": True}, "credential"),
        ({"category": "user.contact.email", "type": "string", "normalize": "email"}, "lookup: true"),
        ({"category": "user.contact.email", "type": "string", "lookup": True, "normalize": "upper"}, "email"),
    ],
)
def test_a_schema_with_a_bad_lookup_declaration_fails_at_load(spec, why):
    with pytest.raises(ValidationError, match=why):
        FieldFile.model_validate(spec)


# ---- the primary ---------------------------------------------------------------------------


async def test_find_by_email_and_phone_in_any_form(module_cluster: Cluster):
    c = module_cluster
    await c.put("f-1", {"name": "Li Wei", "email": "Li.Wei@Example.CN", "phone": "+86 138 0013 8000"})
    await c.put("f-2", {"name": "Wang Fang", "email": "wang@example.cn", "phone": "+86 139 0000 0000"})
    for value in ("li.wei@example.cn", "  LI.WEI@EXAMPLE.CN  ", "Li.Wei@Example.CN"):
        reply = await find(c, "email", value)
        assert found(reply) == ["f-1"], value
        assert values(reply.results[0])["name"] == "Li Wei"
    for value in ("+8613800138000", "+86-138-0013-8000", "(+86) 138 0013 8000"):
        assert found(await find(c, "phone", value)) == ["f-1"], value
    assert found(await find(c, "email", "nobody@example.cn")) == []
    # An update moves the index with the value; the old value finds nobody any more.
    await c.put("f-1", {"email": "li.wei@example.org"})
    assert found(await find(c, "email", "li.wei@example.cn")) == []
    assert found(await find(c, "email", "LI.WEI@example.org")) == ["f-1"]
    # An update that leaves the lookup values as they were (the same e-mail in another form,
    # another field changed) keeps their rows, and they still find the user.
    before = sorted(r for r in index_rows(c) if r[3] == "f-1")
    await c.put("f-1", {"email": "  Li.Wei@EXAMPLE.org", "name": "Li Wei (updated)"})
    assert sorted(r for r in index_rows(c) if r[3] == "f-1") == before
    assert found(await find(c, "email", "li.wei@example.org")) == ["f-1"]
    assert found(await find(c, "phone", "+8613800138000")) == ["f-1"]
    # One batch changing a user twice: the last value is the one indexed.
    batch = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, SERVICE))
    for email in ("first@example.cn", "second@example.cn"):
        batch.records.add(user_id="f-2").fields["email"].string_value = email
    await c.records().PutRecords(batch, timeout=30)
    assert found(await find(c, "email", "first@example.cn")) == []
    assert found(await find(c, "email", "second@example.cn")) == ["f-2"]
    # A value with nothing left once normalised clears the field's rows: it finds nobody.
    await c.put("f-2", {"email": "   "})
    assert found(await find(c, "email", "second@example.cn")) == []
    assert not [r for r in index_rows(c) if r[1:4:2] == ("email", "f-2")]
    # The CLI says the same.
    out = subprocess.run(
        [
            "residency",
            "records",
            "find",
            *c.target("service"),
            "--purpose",
            SERVICE,
            "phone",
            "+86 1380013 8000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert [r["user_id"] for r in json.loads(out.stdout)["results"]] == ["f-1"]


async def test_bad_finds_are_refused_with_a_clear_status_and_change_nothing(module_cluster: Cluster):
    c = module_cluster
    await c.put("b-1", {"email": "b@example.cn", "address": "Beijing"})
    before = len(index_rows(c))
    for field, value, extra, code, says in [
        ("address", "Beijing", {}, grpc.StatusCode.INVALID_ARGUMENT, "not a lookup field"),
        ("nosuch", "x", {}, grpc.StatusCode.INVALID_ARGUMENT, "not a lookup field"),
        ("email", "", {}, grpc.StatusCode.INVALID_ARGUMENT, "value"),
        ("email", "x" * 321, {}, grpc.StatusCode.INVALID_ARGUMENT, "value"),
        ("email", "b@example.cn", {"limit": 101}, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        ("phone", "no digits at all", {}, grpc.StatusCode.INVALID_ARGUMENT, "normalised as e164"),
        ("email", "b@example.cn", {"page_token": "../x y"}, grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ]:
        e = await refused(find(c, field, value, **extra))
        assert e.code() == code and says in e.details(), (field, e.details())
        assert "Beijing" not in e.details() and "b@example.cn" not in e.details()
    assert len(index_rows(c)) == before


async def test_results_are_bounded_and_paged(module_cluster: Cluster):
    c = module_cluster
    users = [f"pg-{i:02d}" for i in range(12)]
    for u in users:  # a value many users share (a shared family address, a typo'd import)
        await c.put(u, {"email": "family@example.cn"})
    first = await find(c, "email", "family@example.cn", limit=5)
    assert found(first) == users[:5] and first.next_page_token
    second = await find(c, "email", "family@example.cn", limit=5, page_token=first.next_page_token)
    third = await find(c, "email", "family@example.cn", limit=5, page_token=second.next_page_token)
    assert found(second) == users[5:10] and found(third) == users[10:] and not third.next_page_token
    assert len(found(await find(c, "email", "family@example.cn"))) == 10  # the default


async def test_a_caller_whose_rules_do_not_allow_the_field_gets_nothing_about_it(module_cluster: Cluster):
    c = module_cluster
    await c.put("r-1", {"name": "Zhao Lei", "email": "zhao@example.cn", "phone": "+86 137 0000 0001"})
    # Singapore's service reads contact fields for essential.service (rule sg-service): found,
    # and logged as a cross-location read naming the field searched, not the value.
    reply = await find(c, "email", "ZHAO@example.cn", location=SG)
    assert found(reply) == ["r-1"] and reply.results[0].log_sequence
    assert set(values(reply.results[0])) == {"name", "email", "phone"}
    log = await entries(c)
    read = next(e for e in log if e["sequence"] == reply.results[0].log_sequence)
    assert (read["kind"], read["outcome"], read["subject"], read["found_by"]) == (
        "remote_read",
        "allowed",
        "r-1",
        "email",
    )
    # Ireland may read no e-mail for essential.service, Singapore nothing for analytics: refused
    # before any lookup, whether or not the value exists (no existence signal), and logged.
    for location, purpose in ((EU, SERVICE), (SG, "analytics.reporting")):
        for value in ("zhao@example.cn", "nobody-at-all@example.cn"):
            e = await refused(find(c, "email", value, location=location, purpose=purpose))
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "zhao" not in e.details() and "nobody" not in e.details()
    denied = [e for e in await entries(c) if e.get("found_by") == "email" and e["outcome"] == "denied"]
    assert len(denied) == 4 and all(e["subject"] == "" for e in denied)
    # Ireland may read phone for marketing only with the user's consent (rule ie-marketing): the
    # field may be searched, but a user without that consent is left out as if not matching,
    # and the withheld match is logged against the user (in the find's one entry).
    assert (
        found(await find(c, "phone", "+8613700000001", location=EU, purpose="marketing.communications")) == []
    )
    last = [e for e in await entries(c) if "found_by" in e][-1]
    assert (last["subject"], last["subjects"], last["outcome"], last["found_by"], last["fields"]) == (
        "",
        ["r-1"],
        "denied",
        "phone",
        [],
    )
    # A recipient reads under its own grants only: granted the name but not the e-mail, a find by
    # e-mail answers nothing about the user (not even that the name it may read exists).
    await c.put("r-2", {"name": "Gao Min", "email": "gao@example.cn"})
    await c.grant(["r-2"], ["user.name"], recipient="sg-affiliate")
    recipient = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "recipient", SG, "sg-affiliate"))
    ask = records_pb2.FindRecordsRequest(context=ctx(SG, SERVICE), field="email", value="gao@example.cn")
    assert found(await recipient.FindRecords(ask, timeout=30)) == []
    last = [e for e in await entries(c) if "found_by" in e][-1]
    assert (last["subject"], last["subjects"], last["outcome"], last["found_by"], last["fields"]) == (
        "",
        ["r-2"],
        "denied",
        "email",
        [],
    )
    await c.grant(["r-2"], ["user.contact.email"], recipient="sg-affiliate")
    reply = await recipient.FindRecords(ask, timeout=30)
    assert found(reply) == ["r-2"] and set(values(reply.results[0])) == {"name", "email"}
    await c.consent("r-1", "marketing.communications", "ie-affiliate")
    reply = await find(c, "phone", "+8613700000001", location=EU, purpose="marketing.communications")
    assert found(reply) == ["r-1"] and set(values(reply.results[0])) == {"name", "phone"}


MARKETING = "marketing.communications"


async def sequence_now(cluster: Cluster) -> int:
    """The log sequence a caller can see: the one its refused find is told (a probe)."""
    e = await refused(find(cluster, "email", "probe@example.cn", location=EU))
    return int(re.search(r"transfer-log entry (\d+)", e.details() or "")[1])


async def test_a_find_uses_log_sequences_only_for_what_it_answers(module_cluster: Cluster):
    c = module_cluster
    # Ireland reads phone for marketing only with the user's consent (rule ie-marketing): each
    # phone below has one consenting user, or none, and 0 to 7 users who did not consent.
    groups = {"+86 132 0000 0001": (1, 0), "+86 132 0000 0002": (1, 7), "+86 132 0000 0003": (0, 3)}
    for n, (phone, (consenting, others)) in enumerate(groups.items()):
        users = [f"sq-{n}-{i}" for i in range(consenting + others)]
        for u in users:
            await c.put(u, {"name": u, "phone": phone})
        if consenting:
            await c.consent(users[:consenting], MARKETING, "ie-affiliate")
    await c.replicated()  # no replication entry falls between the probes below
    for n, (phone, (consenting, others)) in enumerate([*groups.items(), ("+86 132 0000 0009", (0, 0))]):
        before = await sequence_now(c)
        reply = await find(c, "phone", phone, location=EU, purpose=MARKETING)
        after = await sequence_now(c)
        assert found(reply) == [f"sq-{n}-{i}" for i in range(consenting)]
        # The answered reads and one entry for the find: the same whatever the hidden matches.
        assert after - before - 1 == consenting + 1, (phone, after - before)
        (entry,) = [e for e in await entries(c) if before < e["sequence"] < after and e["subject"] == ""]
        hidden = [f"sq-{n}-{i}" for i in range(consenting, consenting + others)]
        assert (entry["found_by"], entry["outcome"], entry.get("subjects", [])) == (
            "phone",
            "denied" if hidden else "allowed",
            hidden,
        )
        assert entry["fields"] == [] and entry["sequence"] == after - 1
    # A reviewer's subject report lists that entry under each user it withheld.
    find_entry = next(e for e in await entries(c) if e.get("subjects") == [f"sq-1-{i}" for i in range(1, 8)])
    for u in ("sq-1-1", "sq-1-7"):
        r = await c.transfer_log().SubjectReport(translog_pb2.SubjectReportRequest(subject=u), timeout=30)
        assert find_entry["sequence"] in [json.loads(e.entry_json)["sequence"] for e in r.entries]
        lines = report.render("jsonl", [e.encode() for _, e, _ in await c.log()], {}, None, subject=u)  # type: ignore[arg-type]
        assert find_entry["sequence"] in [json.loads(x)["sequence"] for x in lines.splitlines()]
        csv_rows = report.render("csv", [e.encode() for _, e, _ in await c.log()], {}, None, subject=u)  # type: ignore[arg-type]
        assert f"{find_entry['sequence']}," in csv_rows and "sq-1-1;sq-1-2" in csv_rows
    # A subject's own export leaves it out: it names other users too.
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "operator", PRIMARY))
    ask = records_pb2.ExportSubjectRequest(context=ctx("", "essential.legal_obligation"), user_id="sq-1-1")
    exported = [
        json.loads(e.entry_json) async for m in stub.ExportSubject(ask, timeout=30) for e in m.entries
    ]
    assert exported and all(e["subject"] == "sq-1-1" and "subjects" not in e for e in exported)


async def test_paging_goes_past_the_examined_window_with_tokens_that_name_nobody(module_cluster: Cluster):
    c = module_cluster
    users = [f"pw-{i:04d}" for i in range(1003)]
    for batch in (users[:1000], users[1000:]):
        req = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, SERVICE))
        for u in batch:
            req.records.add(user_id=u, source="registration").fields[
                "phone"
            ].string_value = "+86 133 0000 7777"
        await c.records().PutRecords(req, timeout=60)
    visible = ["pw-0001", "pw-1001", "pw-1002"]
    await c.consent(visible, MARKETING, "ie-affiliate")
    # The first call examines 1,000 matches and answers one: its token goes on past them.
    first = await find(c, "phone", "+8613300007777", location=EU, purpose=MARKETING)
    assert found(first) == ["pw-0001"] and first.next_page_token
    assert "pw-" not in first.next_page_token
    second = await find(
        c, "phone", "+8613300007777", location=EU, purpose=MARKETING, page_token=first.next_page_token
    )
    assert found(second) == ["pw-1001", "pw-1002"] and not second.next_page_token
    # Every token is sealed: a changed one, another find's, or a user id is refused.
    token = first.next_page_token
    last = "A" if token[-5] != "A" else "B"
    forged = [
        token[:-5] + last + token[-4:],
        token.split(".")[0] + "." + token.split(".")[1][::-1],
        "pw-0999",
    ]
    other = await find(c, "phone", "+8613300007777", limit=1)  # the same value, another caller
    forged.append(other.next_page_token)
    for bad in forged:
        e = await refused(find(c, "phone", "+8613300007777", location=EU, purpose=MARKETING, page_token=bad))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in (e.details() or ""), bad


async def test_liars_are_refused(module_cluster: Cluster):
    c = module_cluster
    await c.put("l-1", {"email": "liar-target@example.cn"})
    # Roles without records.read, and a location the certificate does not name.
    for role, location in (("node", PRIMARY), ("reviewer", PRIMARY), ("operator", PRIMARY), ("node", SG)):
        e = await refused(find(c, "email", "liar-target@example.cn", role=role, location=location))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, role
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", EU))
    lie = records_pb2.FindRecordsRequest(
        context=ctx(PRIMARY, SERVICE), field="email", value="liar-target@example.cn"
    )
    e = await refused(stub.FindRecords(lie, timeout=30))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "certificate names eu-west-1" in e.details()
    # A region node passes no copy on: a caller located elsewhere is refused there, and logged.
    e = await refused(find(c, "email", "liar-target@example.cn", region=SG, location=PRIMARY))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_erasure_removes_the_index_everywhere(module_cluster: Cluster):
    c = module_cluster
    await c.put("e-1", {"name": "Sun Li", "email": "erase-me@example.cn", "phone": "+86 136 0000 0009"})
    await c.replicated()
    assert found(await find(c, "email", "erase-me@example.cn", region=SG)) == ["e-1"]
    assert {u for *_, u in index_rows(c, SG)} >= {"e-1"}
    await c.delete("e-1")
    assert found(await find(c, "email", "erase-me@example.cn")) == []
    assert found(await find(c, "phone", "+8613600000009")) == []
    assert "e-1" not in {u for *_, u in index_rows(c)}
    await c.replicated()
    assert found(await find(c, "email", "erase-me@example.cn", region=SG)) == []
    assert "e-1" not in {u for *_, u in index_rows(c, SG)}


# ---- region nodes --------------------------------------------------------------------------


async def test_a_region_node_finds_by_the_fields_it_holds_under_its_own_key(module_cluster: Cluster):
    c = module_cluster
    await c.put(
        "g-1", {"name": "Qian Yu", "email": "qian@example.cn", "phone": "+86 135 0000 0002", "language": "zh"}
    )
    await c.replicated()
    # Singapore holds e-mail and phone (sg-service, essential.service).
    for field, value in (("email", " QIAN@example.cn"), ("phone", "+86 135-0000-0002")):
        reply = await find(c, field, value, region=SG)
        assert found(reply) == ["g-1"] and values(reply.results[0])["name"] == "Qian Yu"
    local = [e for e in await entries(c, SG) if "found_by" in e and e["subject"]][-1]
    assert (local["kind"], local["outcome"], local["found_by"]) == ("local_read", "allowed", "phone")
    # Ireland holds e-mail (ie-support) but no phone (ie-marketing needs consent): a find by
    # phone finds nothing there; a find by e-mail only for the purpose e-mail went for.
    support = "essential.service.operations.support"
    assert (
        found(await find(c, "phone", "+8613500000002", region=EU, purpose="marketing.communications")) == []
    )
    assert found(await find(c, "email", "qian@example.cn", region=EU, purpose=support)) == ["g-1"]
    # ... and not for analytics, though the language it holds may be read for that.
    assert found(await find(c, "email", "qian@example.cn", region=EU, purpose="analytics.reporting")) == []
    last = [e for e in await entries(c, EU) if "found_by" in e][-1]
    assert (last["subject"], last["subjects"], last["outcome"], last["found_by"]) == (
        "",
        ["g-1"],
        "denied",
        "email",
    )
    # Its own operator rotates its index key; it reindexes the copies it holds under the new one.
    sg_admin = admin_pb2_grpc.AdminServiceStub(c.channel(SG, "operator", SG))
    before = (await sg_admin.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=30)).index_key_version
    await sg_admin.RotateIndexKey(admin_pb2.RotateIndexKeyRequest(from_version=before), timeout=30)

    async def rotated() -> bool:
        s = await sg_admin.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=30)
        return s.index_key_version == before + 1 and not s.index_rebuild_version

    await eventually(rotated, "the region node's new index key is active")
    assert found(await find(c, "email", "qian@example.cn", region=SG)) == ["g-1"]
    assert {v for v, *_ in index_rows(c, SG)} == {before + 1}
    # Each node keys its index with its own key: the same value, different hashes.
    primary = {h for _, f, h, u in index_rows(c) if (f, u) == ("email", "g-1")}
    sg = {h for _, f, h, u in index_rows(c, SG) if (f, u) == ("email", "g-1")}
    assert primary and sg and not primary & sg


# ---- the index key ---------------------------------------------------------------------------


async def test_rotating_the_index_key_rebuilds_while_finds_go_on(module_cluster: Cluster):
    c = module_cluster
    users = [f"rot-{i:04d}" for i in range(1000)]
    rec = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, SERVICE))
    for u in users:
        rec.records.add(user_id=u, source="registration").fields["email"].string_value = f"{u}@example.cn"
    await c.records().PutRecords(rec, timeout=60)
    status = await c.status(PRIMARY)
    assert status.index_key_version >= 1
    # A caller that names a version that is not the active one is refused, nothing done.
    stale = admin_pb2.RotateIndexKeyRequest(from_version=status.index_key_version + 7)
    e = await refused(c.admin().RotateIndexKey(stale, timeout=30))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await c.status(PRIMARY)).index_key_version == status.index_key_version
    # A service, and an operator of another region, may not rotate it.
    e = await refused(
        c.admin()
        .__class__(c.channel(PRIMARY, "operator", SG))
        .RotateIndexKey(admin_pb2.RotateIndexKeyRequest(from_version=status.index_key_version), timeout=30)
    )
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    old = status.index_key_version
    # Finds run from before the rotation until after its switch, back to back with the rebuild's
    # pages on the node's store thread; every one must find its user.
    stop, finds, seen = asyncio.Event(), [0], set()

    async def finding() -> None:
        while not stop.is_set():
            u = users[finds[0] % len(users)]
            assert found(await find(c, "email", f" {u.upper()}@example.cn")) == [u]
            finds[0] += 1

    finder = asyncio.create_task(finding())
    reply = await c.admin().RotateIndexKey(admin_pb2.RotateIndexKeyRequest(from_version=old), timeout=30)
    assert reply.version == old + 1 and reply.records_to_index >= len(users)
    # Another rotation from the version it saw is refused while this one builds (or once done).
    again = admin_pb2.RotateIndexKeyRequest(from_version=old)
    assert (
        await refused(c.admin().RotateIndexKey(again, timeout=30))
    ).code() == grpc.StatusCode.FAILED_PRECONDITION

    async def switched() -> bool:
        assert not finder.done() or finder.exception() is None
        s = await c.status(PRIMARY)
        if s.index_rebuild_version:
            seen.add((s.index_rebuild_done, s.index_rebuild_total))
        return s.index_key_version == old + 1 and not s.index_rebuild_version

    await eventually(switched, "the new index key is active", deadline=300)
    stop.set()
    await finder
    # Writes during and after the rebuild are found under the new key; the old rows are gone.
    await c.put("rot-late", {"email": "late@example.cn"})
    assert found(await find(c, "email", "late@example.cn")) == ["rot-late"]
    assert {v for v, *_ in index_rows(c)} == {old + 1}
    log = (c.data_dir(PRIMARY) / "node.log").read_text()
    progress = re.findall(rf"index key {old + 1}: (\d+) of (\d+) records indexed", log)
    assert len(progress) >= 3 and int(progress[-1][0]) >= len(users)
    events = [e["reason"] for e in await entries(c) if e["kind"] == "key_event"]
    assert any(r.startswith("index_rotated") for r in events) and any(
        r.startswith("index_rebuilt") for r in events
    )
    # The operator's command does the same, from the version the node reports.
    out = subprocess.run(
        ["residency", "keys", "rotate-index", *c.target(), "--region", PRIMARY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == old + 2

    async def switched_again() -> bool:
        s = await c.status(PRIMARY)
        return s.index_key_version == old + 2 and not s.index_rebuild_version

    await eventually(switched_again, "the index key rotated by the command is active", deadline=300)
    assert found(await find(c, "email", "LATE@example.cn")) == ["rot-late"]
    print(
        f"FIGURES finds during the rebuild: {finds[0]}; progress seen: {sorted(seen)}; lines: {len(progress)}"
    )


async def test_index_values_appear_in_plaintext_nowhere(module_cluster: Cluster):
    c = module_cluster
    sentinel = "Sentinel-Lookup-9d2e@Example.CN"
    await c.put("s-1", {"email": sentinel, "phone": "+86 131 7777 6666"})
    assert found(await find(c, "email", sentinel.lower(), location=SG)) == ["s-1"]
    await refused(find(c, "email", sentinel, location=EU))
    await c.replicated()
    assert found(await find(c, "email", sentinel, region=SG)) == ["s-1"]
    needles = [sentinel, sentinel.lower(), "sentinel-lookup-9d2e", "+8613177776666", "131 7777 6666"]
    for path in c.dir.rglob("*"):  # every data folder, key folder, node log
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in data, (needle, path)
    for region in (PRIMARY, *AFFILIATES):
        text = json.dumps(await entries(c, region))
        assert not any(n in text for n in needles)
