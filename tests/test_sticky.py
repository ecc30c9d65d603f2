"""Policy 2a, 2b at the destination: each field of a copy travels with the policy it was sent
under, and the region node enforces it itself (purpose, grant recipient, retention), logs every
read and every copy applied or deleted, and deletes lapsed fields even with the primary down."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from residency.replicator.copies import CopyKeys, build_copy
from residency.server.config.rules import load_rules
from residency.server.config.schema import load_schema
from residency.server.core import codec
from residency.server.core.policy.erasure import DAY
from residency.server.core.policy.sticky import ANY_READER, FieldPolicy, deadline, lapsed, readable
from residency.server.core.rules import NO_PERMITS, Grant, Permits
from residency.server.deployment import EXAMPLE_RULES, EXAMPLE_SCHEMA, PRIMARY
from residency.server.keys.cache import KeyCache
from residency.server.keys.keyring import Keyring
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.region import RegionKey
from residency.server.storage.sqlite import SqliteStore
from residency.server.vault.copies import apply_copies, incoming, prepare_copy_keys
from residency.server.vault.copy_policy import policies_of
from residency.server.vault.inbound import Sender
from residency.server.vault.policy import Policy
from residency.server.vault.records import Caller, Opened, Records
from residency.v1 import admin_pb2, records_pb2, records_pb2_grpc, replica_pb2
from tests.conftest import Cluster, ctx, values

SG, EU = "ap-southeast-1", "eu-west-1"
NOW = 1_790_000_000.0
SENDER = Sender("spiffe://residency/node/cn-north/primary", PRIMARY)

# ---- the decision (pure) ---------------------------------------------------------------------

SUPPORT = FieldPolicy("ie-support", ("essential.service.operations.support",), "contract", "ie-affiliate")
ANALYTICS = FieldPolicy("ie-analytics", ("analytics.reporting",), "contract", "ie-affiliate", False, NOW + 10)
GRANTED = FieldPolicy("grant:helpdesk", ("essential.service",), "contract", "sg-affiliate", True, NOW + 10)


def reasons(withheld: dict) -> dict[str, str]:
    return {n: w.reason for n, w in withheld.items()}


def test_a_field_is_read_only_for_a_purpose_its_rule_covers_narrower_ones_included():
    policies = {"email": SUPPORT, "pages_visited": ANALYTICS}
    allowed, withheld = readable(policies, "analytics.reporting", None, NOW)
    assert set(allowed) == {"pages_visited"} and reasons(withheld) == {"email": "no_rule"}
    narrower = readable(policies, "essential.service.operations.support.optimization", None, NOW)[0]
    assert set(narrower) == {"email"}
    # A broader purpose is not one the rule allows: the caller who asks for "everything" gets nothing.
    allowed, withheld = readable(policies, "essential.service", None, NOW)
    assert allowed == {} and reasons(withheld) == {"email": "no_rule", "pages_visited": "no_rule"}
    assert readable(policies, "marketing.communications", None, NOW)[0] == {}


def test_a_grants_field_is_read_by_its_recipient_alone_and_the_recipient_reads_nothing_else():
    policies = {"email": SUPPORT, "address": GRANTED}
    for liar in (None, "ie-affiliate", "sg-affiliate.evil", ""):  # a service, another recipient
        allowed, withheld = readable(policies, "essential.service", liar, NOW)
        assert "address" not in allowed and withheld["address"].reason == "no_rule", liar
    allowed, withheld = readable(policies, "essential.service", "sg-affiliate", NOW)
    assert set(allowed) == {"address"}
    # As at the primary, a recipient reads under its own grants only, not under the rules.
    allowed, withheld = readable(policies, "essential.service.operations.support", "sg-affiliate", NOW)
    assert set(allowed) == {"address"} and reasons(withheld) == {"email": "no_rule"}


def test_a_lapsed_policy_withholds_its_field_before_any_sweep_with_the_primarys_reasons():
    policies = {"email": SUPPORT, "pages_visited": ANALYTICS, "address": GRANTED}
    assert lapsed(policies, NOW) == []
    assert lapsed(policies, NOW + 10) == ["address", "pages_visited"]
    w = readable(policies, "analytics.reporting", None, NOW + 10)[1]
    assert w["pages_visited"].reason == "retention_expired"
    w = readable(policies, "essential.service", "sg-affiliate", NOW + 10)[1]
    assert w["address"].reason == "grant_ended"
    assert set(readable(policies, None, ANY_READER, NOW + 10)[0]) == {"email"}


def test_a_copy_sent_before_policies_travelled_is_read_for_nothing():
    allowed, withheld = readable({"email": None}, "essential.service.operations.support", None, NOW)
    assert allowed == {} and reasons(withheld) == {"email": "policy_missing"}
    assert "sends it again" in withheld["email"].detail
    assert lapsed({"email": None}, NOW + 1e9) == []


def test_the_deadline_is_the_rules_retention_from_the_last_write_or_the_grants_end_if_earlier():
    assert deadline(NOW, 180, None) == NOW + 180 * DAY
    assert deadline(NOW, 180, NOW + 5) == NOW + 5
    assert deadline(NOW, 1, NOW + 2 * DAY) == NOW + DAY
    assert deadline(NOW, 0, NOW + 5) == NOW + 5
    assert deadline(NOW, None, None) is None and deadline(NOW, 0, None) is None


purposes = st.sampled_from(
    ["essential.service", "essential.service.operations.support", "analytics.reporting", "marketing"]
)
readers = st.sampled_from([None, ANY_READER, "sg-affiliate", "ie-affiliate"])
policy = st.builds(
    FieldPolicy,
    st.just("r"),
    st.lists(purposes, max_size=2).map(tuple),
    st.just("contract"),
    st.sampled_from(["sg-affiliate", "ie-affiliate"]),
    st.booleans(),
    st.one_of(st.none(), st.floats(NOW - 10, NOW + 10)),
)


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), policy)), purposes, readers)
def test_no_field_is_ever_read_past_its_deadline_by_another_reader_or_for_another_purpose(
    policies: dict, purpose: str, reader: str | None
):
    allowed, withheld = readable(policies, purpose, reader, NOW)
    assert set(allowed) | set(withheld) == set(policies) and not set(allowed) & set(withheld)
    for name, p in allowed.items():
        assert policies[name] is p and not p.expired(NOW)
        assert any(purpose == q or purpose.startswith(q + ".") for q in p.purposes)
        assert reader == ANY_READER or (reader == p.recipient if p.grant else reader is None)


# ---- a region node's store, in process, with the clock moved on ------------------------------


@pytest.fixture
def region(tmp_path: Path):
    """A home that builds copies (no store) and an eu-west-1 region with its own store and key."""
    (tmp_path / "schema.yaml").write_text(EXAMPLE_SCHEMA)
    (tmp_path / "rules.yaml").write_text(EXAMPLE_RULES)
    rules = load_rules(tmp_path / "rules.yaml", load_schema(tmp_path / "schema.yaml"))
    provider = LocalProvider.create(tmp_path / "keys", b"test passphrase")
    key = RegionKey.generate(EU, tmp_path / "keys", provider)
    home = Records(PRIMARY, True, rules.schema, rules, keyring=None, store=None)  # type: ignore[arg-type]
    store = SqliteStore(tmp_path / "node.db")
    eu = Records(EU, False, rules.schema, rules, Keyring(EU, provider, tmp_path / "keys"), store)
    yield home, CopyKeys(key.recipient, KeyCache()), eu
    store.close()


def built(home: Records, keys: CopyKeys, user: str, fields: dict, permits: Permits = NO_PERMITS):
    values_ = {n: codec.to_value(v) for n, v in fields.items()}
    return build_copy(home, keys, Opened(user, 3, "registration", PRIMARY, NOW, NOW, values_), permits, NOW)[
        0
    ]


def ship(home: Records, keys: CopyKeys, eu: Records, user: str, fields: dict):
    """A copy built by the home and applied by the region, as replication does."""
    copy = built(home, keys, user, fields)
    copies = [incoming(copy)]
    prepare_copy_keys(eu, copies, [])  # the keys commit first, as the node's apply does
    with eu.store.transaction():
        apply_copies(eu, copies, SENDER, [])
    return copy


def local(purpose: str) -> Caller:
    return Caller(f"spiffe://residency/service/{EU}/app", EU, purpose, "service", "app")


RECORD = {"email": "li@example.cn", "pages_visited": ["/a"], "language": "zh-CN", "name": "Li Wei"}


def test_a_copy_carries_each_fields_rule_purposes_basis_recipient_and_deadline(region):
    home, keys, eu = region
    copy = ship(home, keys, eu, "u-1", RECORD)
    assert set(copy.sealed_fields) == set(copy.policies) == {"email", "pages_visited", "language"}
    p = copy.policies["pages_visited"]
    assert (p.rule, list(p.purposes), p.legal_basis, p.recipient, p.grant) == (
        "ie-analytics",
        ["analytics.reporting"],
        "contract",
        "ie-affiliate",
        False,
    )
    assert (p.retention_days, p.HasField("ends_at")) == (180, False)  # from the copy's updated_at
    assert codec.seconds(copy.updated_at) == NOW and copy.policies["email"].retention_days == 365
    policies = policies_of(copy)
    assert policies["pages_visited"] == FieldPolicy(
        "ie-analytics", ("analytics.reporting",), "contract", "ie-affiliate", False, NOW + 180 * DAY
    )


def test_a_field_sent_under_a_grant_carries_the_grants_recipient_and_end(region):
    home, keys, eu = region
    grant = Grant(
        "helpdesk", "ie-affiliate", "essential.service", "contract", ("user.contact.address",), NOW + 60
    )
    copy = built(home, keys, "u-3", {"address": "1 Changan Avenue"}, Permits(active_grants=(grant,)))
    p = copy.policies["address"]
    assert (p.rule, p.grant, p.recipient, codec.seconds(p.ends_at)) == (
        "grant:helpdesk",
        True,
        "ie-affiliate",
        NOW + 60,
    )
    assert policies_of(copy)["address"].expires_at == NOW + 60


def test_a_region_withholds_what_retention_ended_and_its_sweep_deletes_it_and_logs_it(region):
    home, keys, eu = region
    ship(home, keys, eu, "u-1", RECORD)
    policy = Policy(eu)
    with eu.store.transaction():
        got = policy.read_copy("u-1", local("analytics.reporting"), now=NOW + 1)
    assert set(got.record.fields) == {"pages_visited", "language"}
    later = NOW + 200 * DAY  # past ie-analytics' 180 days, not ie-support's 365
    with eu.store.transaction():
        expired = policy.read_copy("u-1", local("analytics.reporting"), now=later)
    assert expired.denied and expired.record.fields == {}
    assert reasons(expired.withheld) == {
        "pages_visited": "retention_expired",
        "language": "retention_expired",
        "email": "no_rule",
    }
    with eu.store.transaction():
        assert policy.sweep_copies(now=later) == ("", 1)
    with eu.store.transaction():
        assert policy.sweep_copies(now=later + 60) == ("", 0)  # once
    with eu.store.transaction():
        left = policy.read_copy("u-1", local("essential.service.operations.support"), now=later)
    assert set(left.record.fields) == {"email"} and "pages_visited" not in left.withheld
    with eu.store.transaction():
        assert policy.sweep_copies(now=NOW + 400 * DAY) == ("", 1)
    assert eu.store.rows(["u-1"])["u-1"].deleted and eu.store.data_keys(["u-1"]) == {}
    erased = [e for e in log(eu) if e["kind"] == "erasure"]
    swept = [sorted(f["name"] for f in e["fields"]) for e in erased]
    assert swept == [["language", "pages_visited"], ["email"]]
    assert all(e["actor"] == "retention-sweep" and e["reason"].startswith("retention") for e in erased)
    assert erased[0]["fields"][0] | {"name": ""} == {
        "name": "",
        "category": "user.demographic.language",
        "rule": "ie-analytics",
        "legal_basis": "contract",
        "purposes": ["analytics.reporting"],
    }
    assert erased[-1]["reason"].endswith("the copy is deleted")


def test_every_copy_applied_is_one_entry_in_the_regions_own_log_naming_its_fields_and_rules(region):
    home, keys, eu = region
    ship(home, keys, eu, "u-1", RECORD)
    (entry,) = [e for e in log(eu) if e["kind"] == "replication"]
    assert entry["subject"] == "u-1" and entry["actor"] == "spiffe://residency/node/cn-north/primary"
    assert (entry["source_region"], entry["destination_region"], entry["record_version"]) == (PRIMARY, EU, 3)
    assert {f["name"]: f["rule"] for f in entry["fields"]} == {
        "email": "ie-support",
        "language": "ie-analytics",
        "pages_visited": "ie-analytics",
    }
    assert entry["recipient"] == "ie-affiliate" and "li@example.cn" not in json.dumps(entry)
    # Tombstones: one for the copy held here is its withdrawal; one for a copy never held is no event.
    tombs = [
        replica_pb2.SealedCopy(user_id=u, version=4, deleted=True, reason="withdrawn", home_region=PRIMARY)
        for u in ("u-1", "u-9")
    ]
    with eu.store.transaction():
        assert apply_copies(eu, [incoming(t) for t in tombs], SENDER, []) == (2, 0, [])
    (gone,) = [e for e in log(eu) if e["kind"] == "erasure"]
    assert (gone["subject"], gone["record_version"]) == ("u-1", 4) and gone["reason"].startswith("withdrawn")


def test_a_copy_sent_without_policies_is_held_but_read_for_nothing(region):
    home, keys, eu = region
    old = built(home, keys, "u-2", RECORD)
    old.ClearField("policies")  # as a primary sent copies before policies travelled
    copies = [incoming(old)]
    prepare_copy_keys(eu, copies, [])
    with eu.store.transaction():
        apply_copies(eu, copies, SENDER, [])
        got = Policy(eu).read_copy("u-2", local("analytics.reporting"), now=NOW)
    assert got.denied and set(reasons(got.withheld).values()) == {"policy_missing"}


def log(records: Records) -> list[dict]:
    return [json.loads(data) for _, data, _ in records.store.log_after(0, 1000)]


# ---- over real nodes ---------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def region_log(cluster: Cluster, region: str, **match) -> list[dict]:
    entries = [json.loads(e) for _, e, _ in await cluster.log(region)]
    return [e for e in entries if all(e.get(k) == v for k, v in match.items())]


async def read_at(
    cluster: Cluster, user: str, region: str, purpose: str, role: str = "service", name: str = ""
) -> records_pb2.GetRecordResponse:
    """A read at `region`'s node by the holder of spiffe://residency/ROLE/REGION/NAME."""
    stub = records_pb2_grpc.RecordServiceStub(cluster.channel(region, role, region, name or None))
    request = records_pb2.GetRecordRequest(context=ctx(region, purpose), user_id=user)
    return await stub.GetRecord(request, timeout=10)


async def explain(cluster: Cluster, region: str, user: str, purpose: str, to: str = "") -> dict:
    reply = await cluster.admin(region).ExplainTransfer(
        admin_pb2.ExplainTransferRequest(user_id=user, to=to or region, purpose=purpose), timeout=10
    )
    return {f.field: (f.rule if f.transferred else f.reason) for f in reply.fields}


EU_RECORD = {
    "name": "Li Wei",
    "phone": "+86 1380000",
    "email": "li@example.cn",
    "pages_visited": ["/a"],
    "visit_time": datetime(2026, 11, 27, 8, 30, tzinfo=UTC),
}


async def test_a_region_node_serves_each_field_only_for_its_rules_purpose_and_logs_every_read(
    cluster: Cluster,
):
    """The issue's eu-west-1: email sent for support, pages_visited and visit_time for analytics."""
    await cluster.put("s-1", EU_RECORD)
    await cluster.replicated()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await read_at(cluster, "s-1", EU, "marketing.communications")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "li@" not in e.value.details()
    analytics = await read_at(cluster, "s-1", EU, "analytics.reporting")
    assert set(values(analytics)) == {"pages_visited", "visit_time"}
    assert {w.field: w.reason for w in analytics.withheld} == {"email": "no_rule"}
    support = await read_at(cluster, "s-1", EU, "essential.service.operations.support")
    assert values(support) == {"email": "li@example.cn"}
    # A caller located elsewhere (its certificate says ap-southeast-1) gets nothing from EU's copy.
    stub = records_pb2_grpc.RecordServiceStub(cluster.channel(EU, "service", SG))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetRecord(
            records_pb2.GetRecordRequest(context=ctx(SG, "analytics.reporting"), user_id="s-1"), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reads = await region_log(cluster, EU, subject="s-1")
    local = [(r["purpose"], r["outcome"]) for r in reads if r["kind"] == "local_read"]
    assert local == [
        ("marketing.communications", "denied"),
        ("analytics.reporting", "allowed"),
        ("essential.service.operations.support", "allowed"),
    ]
    (remote,) = [r for r in reads if r["kind"] == "remote_read"]
    assert (remote["outcome"], remote["destination_region"], remote["actor"]) == (
        "denied",
        SG,
        f"spiffe://residency/service/{SG}/test-suite",
    )
    allowed = [r for r in reads if r["kind"] == "local_read" and r["outcome"] == "allowed"][0]
    assert {f["name"]: f["rule"] for f in allowed["fields"]} == {
        "pages_visited": "ie-analytics",
        "visit_time": "ie-analytics",
    }
    # `rules explain` against the region node answers from its copy, as the reads did.
    assert await explain(cluster, EU, "s-1", "marketing.communications") == {
        "email": "no_rule",
        "pages_visited": "no_rule",
        "visit_time": "no_rule",
    }
    assert await explain(cluster, EU, "s-1", "analytics.reporting") == {
        "email": "no_rule",
        "pages_visited": "ie-analytics",
        "visit_time": "ie-analytics",
    }
    assert set((await explain(cluster, EU, "s-1", "", to=SG)).values()) == {"no_rule"}
    for to, purpose in (("mars-1", ""), (EU, "not.a.purpose")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await explain(cluster, EU, "s-1", purpose, to=to)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (to, purpose)
    # The region's log also holds the copy as it arrived, and its erasure.
    await cluster.delete("s-1")
    await cluster.replicated()
    kinds = [(r["kind"], r["outcome"]) for r in await region_log(cluster, EU, subject="s-1")]
    assert kinds[0] == ("replication", "allowed") and kinds[-1] == ("erasure", "allowed")


async def test_a_field_sent_under_a_grant_is_served_at_the_region_to_that_recipient_alone(cluster: Cluster):
    await cluster.put("s-2", {"email": "g@example.cn", "pages_visited": ["/a"]})
    await cluster.grant(["s-2"], ["user.behavior.browsing_history"], grant_id="helpdesk")
    await cluster.replicated()
    mine = await read_at(cluster, "s-2", SG, "essential.service", "recipient", "sg-affiliate")
    assert values(mine) == {"pages_visited": ["/a"]}
    service = await read_at(cluster, "s-2", SG, "essential.service", "service", "sg-affiliate")
    assert values(service) == {"email": "g@example.cn"}  # a service named like the recipient is not it
    assert {w.field: w.reason for w in service.withheld} == {"pages_visited": "no_rule"}
    for role, name in (("recipient", "ie-affiliate"), ("recipient", "sg-affiliate2")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read_at(cluster, "s-2", SG, "essential.service", role, name)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    assert (await explain(cluster, SG, "s-2", "essential.service"))["pages_visited"] == "grant:helpdesk"
    actors = [r["actor"] for r in await region_log(cluster, SG, kind="local_read", outcome="denied")]
    assert actors == [f"spiffe://residency/recipient/{SG}/{n}" for n in ("ie-affiliate", "sg-affiliate2")]


def set_sweep(cluster: Cluster, region: str, seconds: float) -> None:
    path = cluster.dep.configs[region]
    config = yaml.safe_load(path.read_text())
    config["policy_sweep_seconds"] = seconds
    path.write_text(yaml.safe_dump(config, sort_keys=False))


async def held(cluster: Cluster, region: str) -> dict[str, int]:
    return dict((await cluster.status(region)).field_counts)


async def test_a_region_withholds_and_then_deletes_a_lapsed_field_while_the_primary_is_down(
    idle_cluster: Cluster,
):
    c = idle_cluster
    set_sweep(c, SG, 3600)  # no sweep until the node is restarted below
    await c.start()
    await c.put("s-3", {"email": "g@example.cn", "pages_visited": ["/a"]})
    await c.put("s-4", {"pages_visited": ["/b"]})
    await c.grant(["s-3", "s-4"], ["user.behavior.browsing_history"], 15, grant_id="helpdesk")
    await c.replicated()
    assert await held(c, SG) == {"email": 1, "pages_visited": 2}
    c.stop(PRIMARY)  # the primary can withdraw nothing now

    async def denied() -> bool:
        try:
            await read_at(c, "s-3", SG, "essential.service", "recipient", "sg-affiliate")
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.PERMISSION_DENIED
        return False

    # Between the deadline and the sweep the field is withheld already, though still held.
    await eventually(denied, "the recipient's read is refused once its grant ended", deadline=60)
    refused = (await region_log(c, SG, kind="local_read", outcome="denied"))[-1]
    assert {w["name"]: w["reason"] for w in refused["withheld"]} == {
        "email": "no_rule",
        "pages_visited": "grant_ended",
    }
    assert await held(c, SG) == {"email": 1, "pages_visited": 2}
    assert await region_log(c, SG, kind="erasure") == []
    c.stop(SG)
    set_sweep(c, SG, 0.3)
    c.dep.start(SG)
    await c.dep.wait_serving()

    async def swept() -> bool:
        return await held(c, SG) == {"email": 1}

    await eventually(swept, "the region's own sweep deletes the lapsed field, primary or not")
    erased = await region_log(c, SG, kind="erasure", actor="retention-sweep")
    assert sorted(e["subject"] for e in erased) == ["s-3", "s-4"]
    assert all([f["name"] for f in e["fields"]] == ["pages_visited"] for e in erased)
    assert all(e["reason"].startswith("retention") for e in erased)
    assert values(await read_at(c, "s-3", SG, "essential.service")) == {"email": "g@example.cn"}
    with pytest.raises(grpc.aio.AioRpcError) as e:  # nothing left of s-4: the copy is gone
        await read_at(c, "s-4", SG, "essential.service", "recipient", "sg-affiliate")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
