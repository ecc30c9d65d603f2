"""Rule changes across a primary's restart (review finding 2), with real nodes: a rules file
changed while the primary was stopped is logged as a change at start and re-projected, so the
regions' copies lose what the new rules no longer allow, or keep only its form; and a
re-projection that a SIGKILL cut short resumes where it was after the restart."""

from __future__ import annotations

import json
import signal
import time

import yaml

from residency.server.core import codec
from residency.server.deployment import EXAMPLE_RULES, PRIMARY
from residency.v1 import admin_pb2, records_pb2
from tests.conftest import Cluster, ctx, values
from tests.harness import eventually
from tests.test_policy import copy_fields, log_entries

SG, EU = "ap-southeast-1", "eu-west-1"
PHONE = "13800132795"
# ie-analytics stops receiving purchase history (transactions); e-mail still goes to eu-west-1.
NO_TRANSACTIONS = EXAMPLE_RULES.replace(
    "categories: [user.contact.email, user.behavior.purchase_history]", "categories: [user.contact.email]"
)


async def restart_primary_with(cluster: Cluster, rules: str) -> tuple[str, str]:
    """Stops the primary, writes `rules` as its rules file, starts it; returns the rules
    versions before and after."""
    before = (await cluster.status(PRIMARY)).rules_version
    assert cluster.stop(PRIMARY) == 0
    (cluster.dir / "rules.yaml").write_text(rules)
    await cluster.start(PRIMARY)
    after = (await cluster.status(PRIMARY)).rules_version
    assert after != before
    return before, after


async def a_change_at_start(cluster: Cluster, before: str, after: str) -> dict:
    changes = await log_entries(cluster, kind="rules_change")
    assert changes, "no rules_change entry after a start under another rules file"
    last = changes[-1]
    assert last["actor"] == "node" and last["rules_version"] == after
    assert before in last["reason"] and after in last["reason"], last["reason"]
    return last


async def test_a_field_the_rules_file_no_longer_allows_leaves_the_region_when_the_primary_starts(
    cluster: Cluster,
):
    users = [f"r-{i}" for i in range(20)]
    for u in users:
        await cluster.put(u, {"email": f"{u}@example.cn", "transactions": ["o-1"]})
    await cluster.replicated()
    assert await copy_fields(cluster, "r-0", EU) == {"email", "transactions"}
    before, after = await restart_primary_with(cluster, NO_TRANSACTIONS)
    await a_change_at_start(cluster, before, after)

    async def withdrawn() -> bool:
        await cluster.replicated()
        return all([await copy_fields(cluster, u, EU) == {"email"} for u in users])

    await eventually(withdrawn, "eu-west-1's copies lose transactions", deadline=60)
    # A second start under the same file is no change: nothing more is logged or re-projected.
    count = len(await log_entries(cluster, kind="rules_change"))
    assert cluster.stop(PRIMARY) == 0
    await cluster.start(PRIMARY)
    assert len(await log_entries(cluster, kind="rules_change")) == count


async def test_a_field_the_rules_file_now_masks_is_held_only_masked_after_the_primary_starts(
    cluster: Cluster,
):
    await cluster.put("m-1", {"name": "Li Wei", "phone": PHONE})
    await cluster.replicated()
    assert values(await cluster.get("m-1", region=SG))["phone"] == PHONE
    doc = yaml.safe_load(EXAMPLE_RULES)
    for r in doc["rules"]:
        if r["id"] == "sg-service":
            r["transform"] = {"phone": {"mask": 4}}
    before, after = await restart_primary_with(cluster, yaml.safe_dump(doc, sort_keys=False))
    await a_change_at_start(cluster, before, after)

    async def masked() -> bool:
        await cluster.replicated()
        reply = await cluster.get("m-1", region=SG)
        return values(reply)["phone"] == "*******2795" and dict(reply.forms) == {"phone": "mask:4"}

    await eventually(masked, "ap-southeast-1 holds the phone only as mask:4", deadline=60)


def saved_reprojection(cluster: Cluster) -> tuple[str, str | None, int, int]:
    (row,) = cluster.query(PRIMARY, "SELECT version, after, done, total FROM rules_state")
    return row


async def test_a_reprojection_killed_midway_resumes_and_completes_after_the_restart(cluster: Cluster):
    n = 6000
    for start in range(0, n, 500):
        request = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"))
        for i in range(start, start + 500):
            rec = request.records.add(user_id=f"k-{i:05d}", source="registration")
            rec.fields["email"].CopyFrom(codec.to_value(f"k{i}@example.cn"))
            rec.fields["transactions"].CopyFrom(codec.to_value(["o-1"]))
        await cluster.records().PutRecords(request, timeout=60)
    await cluster.replicated(timeout=600)
    assert (await cluster.status(EU)).field_counts["transactions"] == n
    applied = await cluster.admin().ApplyRules(
        admin_pb2.ApplyRulesRequest(rules_yaml=NO_TRANSACTIONS), timeout=30
    )
    assert applied.records_to_reproject == n
    end = time.monotonic() + 60
    while True:  # under way: some pages done, not all
        s = await cluster.status(PRIMARY)
        if 0 < s.rules_backfill_done < s.rules_backfill_total:
            break
        assert s.rules_backfill_done < n and time.monotonic() < end, "not seen under way"
    cluster.stop(PRIMARY, signal.SIGKILL)
    version, after, done, total = saved_reprojection(cluster)
    assert version == applied.version and after is not None and 0 < done < total == n, (after, done, total)
    await cluster.start(PRIMARY)

    async def completed() -> bool:
        s = await cluster.status(PRIMARY)
        return s.rules_backfill_total == n and s.rules_backfill_done == n

    await eventually(completed, "the re-projection resumes and completes", deadline=120)
    await cluster.replicated(timeout=600)
    assert (await cluster.status(EU)).field_counts.get("transactions", 0) == 0
    assert (await cluster.status(EU)).field_counts["email"] == n
    # The restart under the same rules logged no second change.
    changes = [json.loads(e) for _, e, _ in await cluster.log() if '"rules_change"' in e]
    assert [c["rules_version"] for c in changes] == [applied.version]
    assert saved_reprojection(cluster)[1:] == (None, n, n)


def test_a_store_from_before_the_rules_state_takes_its_newest_entrys_rules_version(tmp_path):
    """A store an older release made has no `rules_state` row: the rules version its newest log
    entry names is the one last applied, so a start under other rules is still a change."""
    from residency.server.config.rules import parse_rules
    from residency.server.config.schema import load_schema
    from residency.server.core import translog
    from residency.server.deployment import EXAMPLE_SCHEMA
    from residency.server.keys.keyring import Keyring
    from residency.server.keys.providers.local import LocalProvider
    from residency.server.storage.sqlite import SqliteStore
    from residency.server.vault.policy import Policy
    from residency.server.vault.records import Records

    (tmp_path / "schema.yaml").write_text(EXAMPLE_SCHEMA)
    schema = load_schema(tmp_path / "schema.yaml")
    rules = parse_rules(yaml.safe_load(NO_TRANSACTIONS), schema, "rules.yaml", "v-new")
    store = SqliteStore(tmp_path / "node.db")
    old = translog.entry(
        "replication", subject="u-1", source_region=PRIMARY, destination_region=EU,
        outcome="allowed", actor="replicator", rules_version="v-old",
    )  # fmt: skip
    with store.transaction():
        store.log_append([old, {**old, "rules_version": ""}])
    keyring = Keyring(PRIMARY, LocalProvider.create(tmp_path / "k", b"test passphrase"), tmp_path / "k")
    policy = Policy(Records(PRIMARY, True, schema, rules, keyring, store))
    with store.transaction():
        state = policy.rules_at_start("node")
    assert state is not None and (state.version, state.after) == ("v-new", "")
    change = json.loads(store.log_after(2, 10)[0][1])
    assert (change["kind"], change["actor"]) == ("rules_change", "node")
    assert change["reason"].startswith("rules v-old -> v-new")
    with store.transaction():
        assert policy.reproject(500).after is None  # no records: complete at once
    with store.transaction():
        assert policy.rules_at_start("node") is None  # the same rules again: no change
    assert len(store.log_after(0, 10)) == 3
    store.close()


async def test_a_rules_swap_holds_only_once_it_commits_and_a_rerun_logs_old_to_new(tmp_path, monkeypatch):
    """Review 17: the rules were swapped in memory before their transaction committed. A swap
    the database gave up left the node under rules nobody had logged, and run again it logged
    `v-new -> v-new`."""
    import pytest

    from residency.server.config.rules import parse_rules
    from residency.server.config.schema import load_schema
    from residency.server.core.errors import TransactionConflict
    from residency.server.deployment import EXAMPLE_SCHEMA
    from residency.server.keys.keyring import Keyring
    from residency.server.keys.providers.local import LocalProvider
    from residency.server.storage.sqlite import SqliteStore
    from residency.server.storage.thread import StoreThread
    from residency.server.vault.policy import Policy
    from residency.server.vault.records import Records

    (tmp_path / "schema.yaml").write_text(EXAMPLE_SCHEMA)
    schema = load_schema(tmp_path / "schema.yaml")
    old = parse_rules(yaml.safe_load(EXAMPLE_RULES), schema, "rules.yaml", "v-old")
    new = parse_rules(yaml.safe_load(NO_TRANSACTIONS), schema, "rules.yaml", "v-new")
    store = SqliteStore(tmp_path / "node.db")
    keyring = Keyring(PRIMARY, LocalProvider.create(tmp_path / "k", b"test passphrase"), tmp_path / "k")
    policy = Policy(Records(PRIMARY, True, schema, old, keyring, store))
    db = StoreThread(store)
    db.start()
    real, conflicts, shared = store._commit, [3], []

    def commit() -> None:  # what distributed SQL answers under contention
        if conflicts[0]:
            conflicts[0] -= 1
            raise TransactionConflict("restart transaction")
        real()

    monkeypatch.setattr(store, "_commit", commit)
    with pytest.raises(TransactionConflict):  # three times in a row: given up
        await policy.swap_rules(db, new, "operator", lambda: shared.append("v-new"))
    assert policy.records.rules is old and not store.log_after(0, 10)
    conflicts[0] = 1  # once, then through
    assert await policy.swap_rules(db, new, "operator", lambda: shared.append("v-new")) == "v-old"
    assert policy.records.rules is new
    (change,) = [json.loads(e) for _, e, _ in store.log_after(0, 10)]
    assert change["kind"] == "rules_change" and change["reason"] == "rules v-old -> v-new"
    await db.drain()
    store.close()


async def test_a_front_end_starting_takes_a_change_another_applied_since_it_read_the_rules(tmp_path):
    """Review 17: a front end that read the store's rules (v2) at start, while another applied
    v3 before it shared its own, logged `v3 -> v2` as a change found at start and shared v2:
    every front end went back to v2. Read, logged and shared in one transaction, it takes v3."""
    import asyncio
    import functools

    from residency.server.config.node import load_config
    from residency.server.config.rules import rules_from_bytes
    from residency.server.config.schema import load_schema
    from residency.server.deployment import init_deployment
    from residency.server.keys.keyring import Keyring
    from residency.server.keys.providers import open_provider
    from residency.server.storage.rules_state import RulesState
    from residency.server.storage.stores import open_store
    from residency.server.storage.thread import StoreThread
    from residency.server.vault.policy import Policy
    from residency.server.vault.records import Records
    from residency.server.vault.shared_rules import SharedRules

    c = load_config(init_deployment(tmp_path / "deployment")[PRIMARY])
    schema = load_schema(c.schema)
    own = c.rules.read_bytes()
    v2 = rules_from_bytes(own, schema, "rules.yaml")  # what this front end read at start
    store = open_store(c)
    records = Records(c.region, True, schema, v2, Keyring(c.region, open_provider(c.keys), c.keys_dir), store)
    db = StoreThread(store)
    db.start()
    text3 = NO_TRANSACTIONS.encode()
    v3 = rules_from_bytes(text3, schema, "the other front end's")

    def the_other_applies() -> None:  # what its swap commits: the state to re-project, the text
        store.set_rules_state(RulesState(v3.version, "", 0, 0))
        store.set_rules_text(v3.version, text3)

    await db.write(the_other_applies)
    shared = SharedRules(c, schema, records, db, asyncio.Lock())
    start = functools.partial(Policy(records).rules_at_start, "node")
    state = await shared.at_start(start, own, shared=True)  # as on a store front ends share
    assert records.rules.version == v3.version and store.rules_text() == (v3.version, text3)
    assert c.rules.read_bytes() == text3  # its file follows, as on a notice
    assert not [e for _, e, _ in store.log_after(0, 10) if '"rules_change"' in e]  # no change of its own
    assert state is not None and state.version == v3.version  # the other's re-projection goes on here
    await db.drain()
    store.close()
