"""Replication end to end: what reaches each region is exactly what the rules allow."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime

import grpc
import pytest

from residency.server.config.rules import load_rules
from residency.server.config.schema import load_schema
from residency.server.core.rules import Allowed, Permits
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import admin_pb2, replica_pb2
from tests.conftest import BACKENDS, Cluster, values
from tests.test_keys_node import until


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


FULL = {
    "name": "Li Wei",
    "phone": "+86 13800000000",
    "email": "li.wei@example.cn",
    "address": "1 Changan Avenue, Beijing",
    "national_id": "11010519491231002X",
    "password": "correct horse battery staple",
    "ip_address": "10.1.2.3",
    "browser_type": "Firefox 145",
    "language": "zh-CN",
    "visit_time": datetime(2026, 11, 27, 8, 30, tzinfo=UTC),
    "hardware_software": "Android 16; Pixel 10",
    "pages_visited": ["/item/1", "/item/2"],
    "cookie_id": "ck-0001",
    "partner_profile": "frequent traveller",
    "search_keywords": ["tea", "lamp"],
    "published_content": "Works as described.",
    "transactions": ["order-1"],
    "violation_records": ["2026-10: spam"],
}


def allowed_fields(cluster: Cluster, region: str) -> set[str]:
    """What the rules send `region` for a user who accepted cookies and nothing else."""
    rules = load_rules(cluster.dir / "rules.yaml", load_schema(cluster.dir / "schema.yaml"))
    plan = rules.plan(region, None, Permits(cookies=True))
    return {n for n, d in plan.decisions.items() if isinstance(d, Allowed)}


async def test_each_region_holds_exactly_the_fields_its_rules_allow(cluster: Cluster):
    await cluster.accept_cookies("u-1")
    await cluster.put("u-1", FULL)
    await cluster.replicated()
    seen = {}
    for region in AFFILIATES:
        reply = await cluster.held("u-1", region)  # local reads at the region node
        got = values(reply)
        expected = allowed_fields(cluster, region)
        assert set(got) == expected, region
        assert got == {n: FULL[n] for n in expected}
        seen[region] = set(got)
    # The two affiliates receive different subsets, and the home-only data goes nowhere.
    assert seen["ap-southeast-1"] != seen["eu-west-1"]
    for region_fields in seen.values():
        assert not region_fields & {"password", "national_id", "search_keywords"}


async def test_replication_is_logged_per_record_and_region_with_rule_and_withheld(cluster: Cluster):
    await cluster.accept_cookies("u-2")
    await cluster.put("u-2", FULL)
    await cluster.replicated()
    entries = [json.loads(e) for _, e, _ in await cluster.log()]
    repl = {
        e["destination_region"]: e for e in entries if e["kind"] == "replication" and e["subject"] == "u-2"
    }
    assert set(repl) == set(AFFILIATES)
    sg = repl["ap-southeast-1"]
    assert sg["outcome"] == "allowed" and sg["recipient"] == "sg-affiliate"
    assert {f["name"] for f in sg["fields"]} == allowed_fields(cluster, "ap-southeast-1")
    assert all(f["rule"] == "sg-service" and f["legal_basis"] == "contract" for f in sg["fields"])
    withheld = {w["name"]: w["reason"] for w in sg["withheld"]}
    assert withheld["national_id"] == "never_transfer"
    assert withheld["password"] == "credential"
    assert withheld["address"] == "excluded"
    assert sg["rules_version"] and sg["record_version"] == 1
    # No value of any field is in the log.
    text = json.dumps(entries)
    assert not any(isinstance(v, str) and v in text for v in FULL.values() if len(str(v)) > 4)


async def test_updates_replicate_newest_version_and_versions_only_increase(cluster: Cluster):
    assert await cluster.put("u-3", {"email": "a@example.cn", "name": "A"}) == 1
    assert await cluster.put("u-3", {"email": "b@example.cn"}) == 2
    assert await cluster.put("u-3", {"language": "en-SG"}) == 3
    await cluster.replicated()
    home = await cluster.get("u-3")
    assert values(home) == {"email": "b@example.cn", "name": "A", "language": "en-SG"}
    sg = await cluster.get("u-3", region="ap-southeast-1")
    assert sg.record.version == 3
    assert values(sg) == {"email": "b@example.cn", "name": "A", "language": "en-SG"}


async def test_replaying_an_older_copy_never_goes_back_in_time(cluster: Cluster):
    await cluster.put("u-4", {"email": "new@example.cn"})
    await cluster.put("u-4", {"email": "newer@example.cn"})
    await cluster.replicated()
    stale = replica_pb2.SealedCopy(user_id="u-4", version=1, deleted=True, reason="erasure")
    # Issue 14.3: a replay is refused, not skipped (tests/test_signed_copies.py replays signed ones).
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.replica("ap-southeast-1").ApplyCopies(
            replica_pb2.ApplyCopiesRequest(source_region=PRIMARY, copies=[stale]), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "copies[0].version: is older than the version this node holds" in (e.value.details() or "")
    got = await cluster.get("u-4", region="ap-southeast-1")
    assert values(got)["email"] == "newer@example.cn" and got.record.version == 2


async def test_erasure_propagates_to_every_region_and_is_logged(cluster: Cluster):
    await cluster.accept_cookies("u-5")
    await cluster.put("u-5", FULL)
    await cluster.replicated()
    version = await cluster.delete("u-5")
    assert version == 2
    await cluster.replicated()
    for region in (PRIMARY, *AFFILIATES):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cluster.get("u-5", region=region)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    entries = [json.loads(e) for _, e, _ in await cluster.log()]
    erased = {
        e["destination_region"]
        for e in entries
        if e["kind"] == "erasure" and e["subject"] == "u-5" and e["actor"] == "replicator"
    }
    assert erased == set(AFFILIATES)
    for region in AFFILIATES:
        status = await cluster.status(region)
        assert status.tombstones >= 1
    # Erasing again: nothing to erase.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.delete("u-5")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_region_that_was_down_catches_up_and_does_not_hold_back_the_other(cluster: Cluster):
    cluster.stop("eu-west-1")
    for i in range(20):
        await cluster.put(f"down-{i}", {"email": f"d{i}@example.cn", "language": "zh-CN"})
    # ap-southeast-1 is served while eu-west-1 is down.
    deadline = time.monotonic() + 30
    while True:
        reply = await cluster.admin().ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
        status = {d.region: d for d in reply.destinations}
        if status["ap-southeast-1"].pending == 0:
            break
        assert time.monotonic() < deadline, "ap-southeast-1 did not catch up while eu-west-1 was down"
        await asyncio.sleep(0.05)
    assert status["eu-west-1"].pending > 0
    assert status["eu-west-1"].last_error
    await cluster.start("eu-west-1")
    await cluster.replicated()
    for i in range(20):
        got = await cluster.held(f"down-{i}", "eu-west-1")
        assert values(got) == {"email": f"d{i}@example.cn", "language": "zh-CN"}


async def test_acknowledged_writes_survive_sigkill_of_the_primary(cluster: Cluster):
    acked = {}
    for i in range(50):
        email = f"k{i}@example.cn"
        acked[f"k-{i}"] = (await cluster.put(f"k-{i}", {"email": email, "name": f"K {i}"}), email)
    assert cluster.stop(PRIMARY, signal.SIGKILL) == -signal.SIGKILL
    await cluster.start(PRIMARY)
    await cluster.replicated()
    for user, (version, email) in acked.items():
        home = await cluster.get(user)
        assert home.record.version == version
        for region in AFFILIATES:
            copy = await cluster.held(user, region)
            assert copy.record.version == version
            assert values(copy)["email"] == email


async def test_a_write_in_flight_at_sigterm_is_stored_if_it_was_acknowledged(cluster: Cluster):
    """Eight writers keep writing while the primary drains: each write is acknowledged and
    stored, or refused with a status that says to send it again; never refused yet stored."""
    acked: dict[str, int] = {}
    refused: dict[str, grpc.StatusCode] = {}

    async def writer(w: int) -> None:
        for i in range(10_000):
            user = f"s-{w}-{i}"
            try:
                acked[user] = await cluster.put(user, {"email": f"{user}@example.cn", "name": user})
            except grpc.aio.AioRpcError as e:
                refused[user] = e.code()
                return

    writers = [asyncio.ensure_future(writer(w)) for w in range(8)]
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:  # writes under way, then the signal
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(cluster.stop, PRIMARY) == 0
    await asyncio.gather(*writers)
    assert len(refused) == 8 and set(refused.values()) <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }, refused
    await cluster.start(PRIMARY)

    async def reconnected() -> bool:  # a writer's channel opened while the node was down backs off
        try:
            await cluster.get(next(iter(acked)))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    await until(reconnected)
    for user, version in acked.items():
        assert (await cluster.get(user)).record.version == version


async def test_sigterm_drains_and_exits_zero(cluster: Cluster):
    await cluster.put("t-1", {"email": "t@example.cn"})
    for region in (PRIMARY, *AFFILIATES):
        assert cluster.stop(region) == 0


async def test_an_affiliate_added_later_gets_every_copy_the_rules_allow(tmp_path):
    """eu-west-1 joins after 40 users were written, replicated to ap-southeast-1 and trimmed from
    the outbox: the restarted primary sends it every live record's copy, then follows as usual."""
    import yaml

    cluster = Cluster(tmp_path / "deployment")
    primary = cluster.dep.configs[PRIMARY]
    full = yaml.safe_load(primary.read_text())
    alone = {**full, "affiliates": [a for a in full["affiliates"] if a["region"] == AFFILIATES[0]]}
    primary.write_text(yaml.safe_dump(alone, sort_keys=False))
    eu = AFFILIATES[1]
    try:
        await cluster.start(PRIMARY, AFFILIATES[0])
        users = [f"late-{i}" for i in range(40)]
        for u in users:
            await cluster.put(u, {"email": f"{u}@example.cn", "pages_visited": ["/p"]})
        await cluster.delete(users[0])  # erased before eu-west-1 joined: never sent there
        await cluster.replicated()
        assert (
            await cluster.admin().ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
        ).head_sequence
        cluster.stop(PRIMARY)
        primary.write_text(yaml.safe_dump(full, sort_keys=False))
        await cluster.start(PRIMARY)  # eu-west-1's node still down: the re-send waits, and says so
        status = (await cluster.replication())[eu]
        assert status.key_state == "sending every live record's copy: a destination new to this store"
        await cluster.start(eu)
        await cluster.put("late-after", {"email": "after@example.cn", "pages_visited": ["/q"]})
        await cluster.replicated()
        status = await cluster.status(eu)
        assert status.records == len(users)  # 39 written before (one erased) and one after
        for u in [*users[1:], "late-after"]:
            held = await cluster.held(u, eu)
            assert held.record.user_id == u
        # Followed as usual afterwards: a change reaches it, once.
        await cluster.put(users[1], {"email": "changed@example.cn", "pages_visited": ["/r"]})
        await cluster.replicated()
        assert (await cluster.held(users[1], eu)).record.version == 2
    finally:
        await cluster.close()
