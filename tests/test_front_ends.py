"""Several front ends of one primary region (issue 17, point 3): two `residency serve` processes
on one PostgreSQL store serve reads and writes together, write one transfer log, and what one
of them changes (an erasure, the rules, the region key) the other honours within 1 s."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path

import grpc
import psycopg
import pytest
import yaml

from residency.cli.channel import Credentials
from residency.cli.health import check, server_name
from residency.replicator.destinations import destinations_for
from residency.replicator.loop import Replicator
from residency.server.config.node import load_config
from residency.server.config.rules import load_rules
from residency.server.config.schema import load_schema
from residency.server.core import translog
from residency.server.deployment import PRIMARY, start_node
from residency.server.keys import lifecycle
from residency.server.keys.hashkey import load_hash_keys
from residency.server.keys.keyring import Keyring
from residency.server.keys.providers import open_provider
from residency.server.storage.running import serving_instance
from residency.server.storage.stores import open_store
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records, Write
from residency.server.vault.shared_rules import SharedRules, rules_at_start
from residency.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    records_pb2,
    records_pb2_grpc,
    replica_pb2,
    translog_pb2,
    translog_pb2_grpc,
)
from tests.conftest import COOKIES, Cluster, ctx, values
from tests.harness import eventually
from tests.postgres import Postgres
from tests.test_credentials import exhausted, limits
from tests.test_health import residency_health

SG = "ap-southeast-1"


@pytest.fixture
def store_backend() -> str:
    return "postgres"


@pytest.fixture
def notices() -> str:
    """How front ends hear each other (`store.notices`); tests of it run with both."""
    return "listen"


@pytest.fixture
def primary_store(postgres_server: Postgres, notices: str) -> dict:
    """The region's PostgreSQL store; with `notices` "poll", on a database without NOTIFY
    (as CockroachDB: `Postgres.database(notify=False)`)."""
    dsn = postgres_server.dsn(postgres_server.database(notify=notices == "listen"))
    return {"kind": "postgres", "dsn": dsn} | ({"notices": "poll"} if notices == "poll" else {})


def mirror(src: Path, dst: Path) -> None:
    """`dst` made the same as `src` (an operator's sync: `rsync -a --delete`): a key file the
    source destroyed goes from the copy too."""

    for gone in [p for p in dst.iterdir() if not (src / p.name).exists()]:
        gone.unlink()
    shutil.copytree(src, dst, dirs_exist_ok=True)


def following(dsn: str) -> int:
    """How many connections follow the others' notices on the store's database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'residency-notices'"
        ).fetchone()
    return int(row[0]) if row else 0


async def _log(c: Cluster, front: str) -> list[tuple[bytes, bytes]]:
    stub = translog_pb2_grpc.TransferLogServiceStub(c.channel(front, "reviewer", PRIMARY))
    return [
        (e.entry_json.encode(), e.chain_hash)
        async for e in stub.TailEntries(translog_pb2.TailEntriesRequest(), timeout=30)
    ]


@pytest.mark.parametrize("notices", ["listen", "poll"])
async def test_two_front_ends_serve_one_store_and_an_erasure_or_withdrawal_through_one_holds_at_the_other(
    idle_cluster: Cluster, notices: str
):
    c = idle_cluster
    b = c.add_front_end("b")
    await c.start(PRIMARY, b, "ap-southeast-1", "eu-west-1")
    fronts = {PRIMARY: c.records(PRIMARY, PRIMARY), b: c.records(b, PRIMARY)}

    async def put(front: str, user: str, name: str, **more: str) -> int:
        rec = records_pb2.Record(user_id=user, source="registration")
        rec.fields["name"].string_value = name
        for field, value in more.items():
            rec.fields[field].string_value = value
        reply = await fronts[front].PutRecord(
            records_pb2.PutRecordRequest(context=ctx(PRIMARY, "essential.service"), record=rec), timeout=30
        )
        return reply.version

    async def get(front: str, user: str) -> records_pb2.GetRecordResponse:
        return await fronts[front].GetRecord(
            records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id=user), timeout=30
        )

    for i in range(20):  # interleaved: each front end's writes land between the other's
        await put(PRIMARY, f"fa-{i}", f"A {i}")
        await put(b, f"fb-{i}", f"B {i}")
    assert values(await get(b, "fa-3"))["name"] == "A 3"
    assert values(await get(PRIMARY, "fb-7"))["name"] == "B 7"
    assert await put(b, "fa-3", "A 3 again") > (await get(PRIMARY, "fa-4")).record.version
    assert values(await get(PRIMARY, "fa-3"))["name"] == "A 3 again"

    # Both in-process workers compete for the destinations' leases; every write arrives once.
    await c.replicated()
    assert values(await c.held("fb-7", "ap-southeast-1"))["name"] == "B 7"

    # An erasure through one front end: the other serves the user no more within 1 s.
    await fronts[b].DeleteRecord(
        records_pb2.DeleteRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="fa-5"), timeout=30
    )
    erased_at = time.monotonic()

    async def gone() -> bool:
        try:
            await get(PRIMARY, "fa-5")
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(gone, "the other front end stops serving the erased user", deadline=1.0)
    assert time.monotonic() - erased_at < 1.0
    # The user registers again, through the front end that erased them, under a new data key:
    # the other (which wrote them first, and kept their old key) reads the new record.
    await put(b, "fa-5", "A 5 again")

    async def back() -> bool:
        try:
            return values(await get(PRIMARY, "fa-5"))["name"] == "A 5 again"
        except grpc.aio.AioRpcError as e:  # the old key, kept: it opens nothing of the new
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            return False

    await eventually(back, "the other front end reads the user back, under their new key", deadline=1.0)

    # A consent withdrawn through one front end: the other collects no cookie field after it.
    await c.accept_cookies("fa-9")
    await put(b, "fa-9", "A 9", cookie_id="ck-9")
    await c.consent("fa-9", COOKIES, withdraw=True)
    withdrawn = time.monotonic()

    async def cookie_refused() -> bool:
        try:
            await put(b, "fa-9", "A 9", cookie_id="ck-9b")
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.PERMISSION_DENIED and "cookie" in (e.details() or "")
        return False

    await eventually(cookie_refused, "the other front end honours the withdrawal", deadline=1.0)
    assert time.monotonic() - withdrawn < 1.0
    assert "cookie_id" not in values(await get(b, "fa-9"))

    # One log: both front ends serve the same gap-free chain, with every front end's entries.
    # (The workers may append while the two are read: the later read extends the earlier.)
    a_log, b_log = await _log(c, PRIMARY), await _log(c, b)
    assert b_log[: len(a_log)] == a_log and translog.verify_chain(b_log) is None
    assert b'"fb-7"' in b"".join(e for e, _ in a_log)


@pytest.mark.parametrize("notices", ["listen", "poll"])
async def test_a_rules_change_and_a_key_shred_through_one_front_end_hold_at_the_other_within_1_s(
    idle_cluster: Cluster, notices: str, primary_store: dict
):
    """What a front end keeps in memory follows the store: the rules another applied (also
    written to its own rules file, so a restart keeps them) and the region key another
    shredded, both notified at commit (PostgreSQL LISTEN/NOTIFY), or read from the store's
    notices every 250 ms (`store.notices: poll`, on a database without NOTIFY)."""
    c = idle_cluster
    b = c.add_front_end("b")
    await c.start(PRIMARY, b, "ap-southeast-1", "eu-west-1")
    admin_a, admin_b = c.admin(PRIMARY), admin_pb2_grpc.AdminServiceStub(c.channel(b, "operator", PRIMARY))
    before = (await admin_b.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)).rules_version
    text = (c.dir / "rules.yaml").read_text() + "\n# reviewed again\n"
    applied = await admin_a.ApplyRules(admin_pb2.ApplyRulesRequest(rules_yaml=text), timeout=30)
    assert applied.version != before
    changed = time.monotonic()

    async def b_follows() -> bool:
        status = await admin_b.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)
        return status.rules_version == applied.version

    await eventually(b_follows, "the other front end runs the rules applied through the first", deadline=1.0)
    assert time.monotonic() - changed < 1.0
    b_rules = load_config(c.dep.configs[b]).rules
    assert b_rules.read_text() == text

    # A front end that starts with an older rules file takes the store's instead.
    c.stop(b)
    edited = (c.dir / "rules.yaml").read_text().replace("# reviewed again", "# edited by hand")
    b_rules.write_text(edited)
    c.dep.start(b)
    await c.dep.wait_serving()
    assert await b_follows() and b_rules.read_text() == text
    (kept,) = b_rules.parent.glob(f"{b_rules.name}.*")  # the file it held, kept beside it
    assert kept.read_text() == edited

    await c.put("k-1", {"name": "Li Wei"})
    status = await admin_a.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)
    await admin_a.ShredRegionKey(
        admin_pb2.ShredRegionKeyRequest(key_id=status.region_key_id, reason="test"), timeout=30
    )
    shredded = time.monotonic()
    reads = c.records(b, PRIMARY)

    async def b_refuses() -> bool:
        try:
            await reads.GetRecord(
                records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="k-1"),
                timeout=10,
            )
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.FAILED_PRECONDITION
        return False

    await eventually(b_refuses, "the other front end opens nothing under the shredded key", deadline=1.0)
    assert time.monotonic() - shredded < 1.0
    # Both front ends follow the notices (polling: on a database whose pg_notify fails, which
    # every write above that notifies would have run into); each was a row.
    assert following(primary_store["dsn"]) == 2
    with psycopg.connect(primary_store["dsn"]) as conn:
        kinds = [k for (k,) in conn.execute("SELECT kind FROM store_notices ORDER BY seq").fetchall()]
    assert "rules" in kinds and "keys" in kinds


async def test_a_front_end_whose_keys_folder_lacks_anothers_key_event_opens_nothing_until_it_has_it(
    idle_cluster: Cluster,
):
    """Front ends of a region share its keys folder. One given a copy instead would not see a
    rotation, a retirement or a shred made through another (the event is in the other's
    `keyring.json`): were it to go on, a shred would not hold there. From the notice on, it
    opens nothing and refuses calls on data UNAVAILABLE naming its folder, not ready; once
    the folder holds the events it serves again, records written since included."""

    c = idle_cluster
    b = c.add_front_end("b")
    shared = load_config(c.dep.configs[PRIMARY]).keys_dir
    own = c.dir / "keys-of-b"
    shutil.copytree(shared, own)
    config = yaml.safe_load(c.dep.configs[b].read_text())
    config["keys"] = {**config["keys"], "dir": str(own), "passphrase_file": str(own / "passphrase")}
    c.dep.configs[b].write_text(yaml.safe_dump(config, sort_keys=False))
    await c.start(PRIMARY, b)
    reads_b = c.records(b, PRIMARY)
    admin_b = admin_pb2_grpc.AdminServiceStub(c.channel(b, "operator", PRIMARY))

    async def get_b(user: str) -> records_pb2.GetRecordResponse:
        request = records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id=user)
        return await reads_b.GetRecord(request, timeout=10)

    await c.put("kf-1", {"name": "Li Wei"})
    assert values(await get_b("kf-1"))["name"] == "Li Wei"
    rotated = await c.admin(PRIMARY).RotateKeys(admin_pb2.RotateKeysRequest(from_version="v1"), timeout=60)
    assert rotated.version == "v2"
    await c.put("kf-2", {"name": "Wang Fang"})  # its data key under v2, which b's folder lacks

    refusals: list[str] = []

    async def b_refuses() -> bool:
        try:
            await get_b("kf-1")
        except grpc.aio.AioRpcError as e:
            refusals.append(e.details() or "")
            return e.code() == grpc.StatusCode.UNAVAILABLE
        return False

    await eventually(b_refuses, "the front end without the event opens nothing", deadline=10)
    behind = "keys folder holds 0 key events and the store has logged 2"
    # ... from the notice on: never a record opened meanwhile, each refusal saying why (its
    # folder is named in its log, not to callers).
    assert all(behind in r for r in refusals), refusals
    assert str(own) in c.dep.node_log(b).read_text()

    async def b_not_ready() -> bool:  # readiness follows within a second
        status = await admin_b.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)
        return not status.ready and any(behind in w for w in status.not_ready_because)

    await eventually(b_not_ready, "the front end says it is not ready, and why", deadline=5)
    # Nor does it make key events of its own meanwhile (its event would be counted in the
    # place of the one it lacks, and never logged): refused, nothing destroyed.
    primary_status = await c.admin(PRIMARY).GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)
    shred = admin_pb2.ShredRegionKeyRequest(key_id=primary_status.region_key_id, reason="test")
    for call in (
        admin_b.ShredRegionKey(shred, timeout=30),
        admin_b.RotateKeys(admin_pb2.RotateKeysRequest(from_version="v1"), timeout=30),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert behind in (refused.value.details() or "")
    assert (own / "region.key").exists() and lifecycle.read_events(own) == []
    # The folder given the events (an operator's sync), b serves again: both users open.
    mirror(shared, own)

    async def b_serves() -> bool:
        try:
            return [values(await get_b(u))["name"] for u in ("kf-1", "kf-2")] == ["Li Wei", "Wang Fang"]
        except grpc.aio.AioRpcError:
            return False

    await eventually(b_serves, "the front end serves again once its folder holds the events", deadline=10)
    # A front end started with a folder behind the store's log does not start, saying why.
    c.stop(b)
    await c.admin(PRIMARY).RotateKeys(admin_pb2.RotateKeysRequest(from_version="v2"), timeout=60)
    c.dep.start(b)
    with pytest.raises(RuntimeError) as e:
        await c.dep.wait_serving()
    assert str(own) in str(e.value) and "holds 2 key events and the store has logged 4" in str(e.value)
    c.dep.procs.pop(b)


async def test_a_region_front_end_behind_on_key_events_makes_its_primary_wait_and_catches_up_to_a_rekey(
    idle_cluster: Cluster, postgres_server: Postgres
):
    """Review: a region front end whose keys folder lagged answered `ApplyCopies` as a region
    whose key is shredded, and its primary held the region for good (only a new key ends a
    hold); and one that read a rekey another front end had logged first stayed shredded. Now
    it answers UNAVAILABLE, so the primary sends again, and takes the key's state from every
    event, whoever logged it."""

    c = idle_cluster
    config = yaml.safe_load(c.dep.configs[SG].read_text())
    config["store"] = {"kind": "postgres", "dsn": postgres_server.dsn(postgres_server.database())}
    c.dep.configs[SG].write_text(yaml.safe_dump(config, sort_keys=False))
    other = c.add_front_end("b", SG)  # on the region's keys folder
    shared = load_config(c.dep.configs[SG]).keys_dir
    own = c.dir / "keys-of-sg"  # the front end the primary ships to works on a copy
    shutil.copytree(shared, own)
    config["keys"] = {**config["keys"], "dir": str(own), "passphrase_file": str(own / "passphrase")}
    c.dep.configs[SG].write_text(yaml.safe_dump(config, sort_keys=False))
    await c.start(PRIMARY, SG, other, "eu-west-1")
    admin_b = admin_pb2_grpc.AdminServiceStub(c.channel(other, "operator", SG))
    await c.put("rf-1", {"name": "Li Wei"})
    await c.replicated()

    await admin_b.RotateKeys(admin_pb2.RotateKeysRequest(from_version="v1"), timeout=60)
    await c.put("rf-2", {"name": "Wang Fang"})

    async def refused_unavailable() -> bool:
        status = (await c.replication())[SG]
        assert not status.key_state, status  # never held as a shredded region
        return "UNAVAILABLE" in status.last_error and "keys folder holds" in status.last_error

    await eventually(refused_unavailable, "the lagging region answers the primary UNAVAILABLE", deadline=30)
    mirror(shared, own)
    await c.replicated()
    assert values(await c.held("rf-2", SG))["name"] == "Wang Fang"
    assert not (await c.replication())[SG].key_state

    # A shred, then a rekey, both through the other front end, the folder synced after each.
    status = await admin_b.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)
    await admin_b.ShredRegionKey(
        admin_pb2.ShredRegionKeyRequest(key_id=status.region_key_id, reason="test"), timeout=30
    )
    mirror(shared, own)
    new = (await admin_b.RekeyRegionKey(admin_pb2.RekeyRegionKeyRequest(), timeout=60)).key_id

    async def says_it_is_behind() -> bool:  # not "shredded": a primary would hold the region
        try:
            await c.replica(SG).GetRegionKey(replica_pb2.GetRegionKeyRequest(nonce=b"n"), timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE and "keys folder holds" in (e.details() or "")
        return False

    await eventually(says_it_is_behind, "the front end without the rekey says it is behind", deadline=10)
    mirror(shared, own)

    async def states_the_new_key() -> bool:
        try:
            reply = await c.replica(SG).GetRegionKey(replica_pb2.GetRegionKeyRequest(nonce=b"n"), timeout=10)
        except grpc.aio.AioRpcError:
            return False
        return replica_pb2.RegionKeyStatement.FromString(reply.statement).key_id == new

    await eventually(states_the_new_key, "the front end shipped to opens under the new key", deadline=30)
    # The primary, told the old key is gone at its next copy, learns the new one from the region.
    await c.put("rf-3", {"name": "Zhao Lei"})

    async def arrived() -> bool:
        try:
            return values(await c.held("rf-3", SG))["name"] == "Zhao Lei"
        except grpc.aio.AioRpcError:
            return False

    await eventually(arrived, "a copy sealed to the new key arrives", deadline=60)
    assert (await c.replication())[SG].dead_lettered == 0


async def test_an_index_key_rotation_through_one_front_end_holds_at_the_other(idle_cluster: Cluster):
    """Front ends share the region's `index.key`: a rotation made through one is the other's
    at its next write or find. Otherwise the other, still on the old version, rewrites the
    users it writes under the old version only, and the first no longer finds them."""
    c = idle_cluster
    b = c.add_front_end("b")
    await c.start(PRIMARY, b)
    fronts = {PRIMARY: c.records(PRIMARY, PRIMARY), b: c.records(b, PRIMARY)}
    users = [f"ik-{i}" for i in range(5)]

    async def put_all(front: str, name: str) -> None:
        for u in users:
            rec = records_pb2.Record(user_id=u, source="registration")
            rec.fields["name"].string_value = name
            rec.fields["email"].string_value = f"{u}@example.cn"
            request = records_pb2.PutRecordRequest(context=ctx(PRIMARY, "essential.service"), record=rec)
            await fronts[front].PutRecord(request, timeout=30)

    async def found_by(front: str) -> list[str]:
        out = []
        for u in users:
            request = records_pb2.FindRecordsRequest(
                context=ctx(PRIMARY, "essential.service"), field="email", value=f"{u.upper()}@example.cn"
            )
            out += [r.record.user_id for r in (await fronts[front].FindRecords(request, timeout=30)).results]
        return out

    await put_all(b, "before")
    assert await found_by(PRIMARY) == await found_by(b) == users
    admin_a = c.admin(PRIMARY)
    old = (await admin_a.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)).index_key_version
    await admin_a.RotateIndexKey(admin_pb2.RotateIndexKeyRequest(from_version=old), timeout=30)

    async def switched() -> bool:
        s = await admin_a.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=10)
        return s.index_key_version == old + 1 and not s.index_rebuild_version

    await eventually(switched, "the new index key is active", deadline=120)
    await put_all(b, "after")  # the same e-mails, through the other front end
    assert await found_by(PRIMARY) == users
    assert await found_by(b) == users


async def test_keys_rotated_and_retired_through_one_front_end_leave_every_record_the_other_writes_readable(
    idle_cluster: Cluster,
):
    """The other front end made its wrapping key before the rotation, under the old version,
    and keeps it for minutes. Were it to go on wrapping new users' data keys under it, the
    retire right after the rotation would make those users unreadable: their writes were
    acknowledged and lost. A rotation renews the store's wrapping-key generation instead, and
    the other's next batch runs again under a wrapping key of the new version."""
    c = idle_cluster
    b = c.add_front_end("b")
    await c.start(PRIMARY, b)
    fronts = {PRIMARY: c.records(PRIMARY, PRIMARY), b: c.records(b, PRIMARY)}

    async def put(front: str, user: str) -> None:
        rec = records_pb2.Record(user_id=user, source="registration")
        rec.fields["name"].string_value = f"name of {user}"
        request = records_pb2.PutRecordRequest(context=ctx(PRIMARY, "essential.service"), record=rec)
        await fronts[front].PutRecord(request, timeout=30)

    await put(b, "kr-0")  # the other front end's wrapping key, under v1
    admin_a = c.admin(PRIMARY)
    rotated = await admin_a.RotateKeys(admin_pb2.RotateKeysRequest(from_version="v1"), timeout=60)
    assert rotated.version == "v2" and rotated.data_keys_rewrapped == 1
    await admin_a.RetireKeys(admin_pb2.RetireKeysRequest(), timeout=60)
    users = ["kr-0"] + [f"kr-{i}" for i in range(1, 4)]
    for u in users[1:]:  # acknowledged through the other front end, after the retire
        await put(b, u)
    keys = load_config(c.dep.configs[PRIMARY]).keys_dir
    assert sorted(p.name for p in keys.glob("kek-v*.key")) == ["kek-v2.key"]

    # Every record opens through front ends holding no key in memory (the other, restarted).
    c.stop(b)
    c.dep.start(b)
    await c.dep.wait_serving()
    fronts[b] = c.records(b, PRIMARY)
    for front in (PRIMARY, b):
        for u in users:
            request = records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id=u)
            assert values(await fronts[front].GetRecord(request, timeout=30))["name"] == f"name of {u}"


async def test_the_same_config_served_twice_on_one_host_is_refused_and_the_first_serves_on(
    idle_cluster: Cluster,
):
    """Two front ends of one host and one listen address are two workers only with a data_dir
    each: the same config started again would be one worker owner holding one lease twice."""
    c = idle_cluster
    await c.start(PRIMARY)
    again = start_node(c.dep.configs[PRIMARY])
    assert again.wait(timeout=120) == 2
    log = c.dep.node_log(PRIMARY).read_text()
    assert "already runs on this host" in log and "a data_dir of its own" in log
    assert await c.put("u-twice", {"name": "Twice"}) == 1  # the first serves on
    c.dep.check_running()


async def test_a_copy_applied_under_a_new_key_through_one_region_front_end_opens_at_the_other_within_1_s(
    idle_cluster: Cluster, postgres_server: Postgres
):
    """A region node with two front ends on one PostgreSQL store: a user erased and registered
    again at the home while replication to the region was paused arrives as one copy under a
    new data key, applied through the front end the primary ships to. The other front end,
    which held the old key, drops it at the commit's notice and opens the new copy."""
    c = idle_cluster
    config = yaml.safe_load(c.dep.configs[SG].read_text())
    config["store"] = {"kind": "postgres", "dsn": postgres_server.dsn(postgres_server.database())}
    c.dep.configs[SG].write_text(yaml.safe_dump(config, sort_keys=False))
    other = c.add_front_end("b", SG)
    await c.start(PRIMARY, SG, other, "eu-west-1")
    reads = c.records(other, SG)

    async def name_at_other() -> str:
        request = records_pb2.GetRecordRequest(context=ctx(SG, "essential.service"), user_id="rk-1")
        return values(await reads.GetRecord(request, timeout=10))["name"]

    await c.put("rk-1", {"name": "Old Name"})
    await c.replicated()
    assert await name_at_other() == "Old Name"  # the other front end now holds the old key

    admin = c.admin()
    await admin.PauseReplication(admin_pb2.PauseReplicationRequest(region=SG), timeout=10)
    await c.delete("rk-1")
    await c.put("rk-1", {"name": "New Name"})  # a new user to the keyring: a new data key
    await admin.ResumeReplication(admin_pb2.ResumeReplicationRequest(region=SG), timeout=10)

    async def applied() -> bool:
        return values(await c.get("rk-1", region=SG))["name"] == "New Name"

    await eventually(applied, "the region applies the new copy through the front end shipped to")
    at = time.monotonic()

    async def other_opens() -> bool:
        try:
            return await name_at_other() == "New Name"
        except grpc.aio.AioRpcError:
            return False

    await eventually(other_opens, "the other front end opens the copy under its new key", deadline=1.0)
    assert time.monotonic() - at < 1.0
    # One copy went, no tombstone (whose key destruction would have told the other front end
    # with an `erasure` notice): the region logged the held copy's erasure itself.
    entries = [json.loads(e) for _, e, _ in await c.log(SG)]
    erasures = [e for e in entries if e["kind"] == "erasure" and e["subject"] == "rk-1"]
    assert len(erasures) == 1 and "record of the user was created anew" in erasures[0]["reason"]


async def test_a_front_end_that_stops_hearing_the_others_is_not_ready_until_it_hears_them_again(
    idle_cluster: Cluster, primary_store: dict, postgres_server: Postgres
):
    """Without the store's notifications a front end would serve what another changed (an
    erasure, the rules) as it was: from 1 s after its listening connection is lost it is not
    ready, saying why, refuses calls on data UNAVAILABLE, and is ready again once it listens
    and has caught up."""
    import psycopg
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    c = idle_cluster
    await c.start(PRIMARY)
    health = health_pb2_grpc.HealthStub(c.channel(PRIMARY, "operator"))

    async def readiness_is(status: int) -> bool:
        reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
        return reply.status == status

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await eventually(lambda: readiness_is(serving), "the front end is ready")
    database = primary_store["dsn"].rpartition("dbname=")[2].split()[0]
    with psycopg.connect(postgres_server.dsn(**postgres_server._client_tls()), autocommit=True) as admin:
        # No new connection to the store's database, then the listening one cut.
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            cut = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'residency-notices'",
                (database,),
            ).fetchall()
            assert cut == [(True,)]
            await eventually(lambda: readiness_is(not_serving), "the front end is not ready", deadline=10)
            status = await c.status(PRIMARY)
            assert any(w.startswith("store notifications: not heard since") for w in status.not_ready_because)
            # ... and calls on data are refused meanwhile, naming why; its status still answers.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.get("nobody-1")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "not heard since" in e.value.details()
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    await eventually(lambda: readiness_is(serving), "the front end listens again and is ready", deadline=15)


def test_hearing_is_a_problem_before_the_first_catch_up_and_after_a_second_without_it():
    from residency.server.storage.notices import Hearing

    assert Hearing().problems() == []  # a node on SQLite listens to nobody
    h = Hearing(grace=1.0).use()
    assert h.problems() == ["store notifications: not listening yet (other front ends' changes)"]
    h.listening = True
    h.settle({"rules"})  # listening, but a handler failed: not caught up
    assert h.problems()
    h.settle(set())
    assert h.problems() == []
    h.listening = False
    h.settle(set())
    assert h.problems() == []  # within the grace
    h.down_since, h.down_at = time.monotonic() - 2, "12:00:00"
    assert h.problems() == ["store notifications: not heard since 12:00:00 UTC (other front ends' changes)"]
    # A handler that names why it cannot act (its keys folder behind the store's log, say).
    h.listening, h.why["keys"] = True, "the keys folder K holds 1 key events and the store has logged 2"
    h.settle({"keys"})
    assert h.problems() == [
        "another front end's change cannot be acted on here: the keys folder K holds 1 key events and "
        "the store has logged 2"
    ]


async def test_two_front_ends_on_one_address_share_its_connections_and_each_probe_answers_for_its_own(
    idle_cluster: Cluster,
):
    """Issue 17.3's other layout: two `residency serve` of one host on one listen address, which
    gRPC binds with SO_REUSEPORT, so the kernel hands each new connection to one of them. A
    probe of one config must not be answered by the other: once one is killed, its probe fails
    while the survivor, alone on the address, answers every connection."""
    c = idle_cluster
    b = c.add_front_end("b")
    config = yaml.safe_load(c.dep.configs[b].read_text())
    config["listen"] = c.dep.addresses[b] = c.dep.addresses[PRIMARY]
    c.dep.configs[b].write_text(yaml.safe_dump(config, sort_keys=False))
    await c.start(PRIMARY, b)

    node = load_config(c.dep.configs[PRIMARY])
    creds, target = Credentials(node.tls.cert, node.tls.key, node.tls.ca), c.dep.addresses[PRIMARY]
    name = server_name(node.tls.cert.read_bytes(), target.rpartition(":")[0])
    seen = [(await check(creds, target, name, "readiness", 10))[1] for _ in range(32)]
    names = {serving_instance(load_config(c.dep.configs[f]).data_dir, target) for f in (PRIMARY, b)}
    assert set(seen) == names and len(names) == 2, seen  # each new connection went to one of them
    for u in ("ra-1", "ra-2", "ra-3"):
        assert await c.put(u, {"name": f"name of {u}"}) == 1
        assert values(await c.get(u))["name"] == f"name of {u}"
    for f in (PRIMARY, b):
        probe = await asyncio.to_thread(residency_health, c.dep.configs[f])
        assert (probe.returncode, probe.stdout) == (0, "SERVING\n"), probe.stderr

    c.stop(b, signal.SIGKILL)
    survivor = [(await check(creds, target, name, "readiness", 10))[1] for _ in range(8)]
    assert set(survivor) == names - {serving_instance(load_config(c.dep.configs[b]).data_dir, target)}
    gone = await asyncio.to_thread(residency_health, c.dep.configs[b], "--timeout", "3")
    assert gone.returncode == 1 and "only another process on this address answered" in gone.stderr, gone
    assert "not the node of this config" in gone.stderr and "Traceback" not in gone.stderr
    assert (await asyncio.to_thread(residency_health, c.dep.configs[PRIMARY])).returncode == 0


def test_a_write_through_a_front_end_holding_a_replaced_key_merges_into_the_new_record(
    idle_cluster: Cluster,
):
    """Two front ends' vaults on one PostgreSQL store, before any notice reaches the first (it
    holds the user's data key cached): the second erases the user and registers them again
    under a new key. The first's next write to the user opens the new record under the
    keyring's key instead of failing, and nothing of the erased record comes back."""
    c = load_config(idle_cluster.dep.configs[PRIMARY])
    schema = load_schema(c.schema)
    rules = load_rules(c.rules, schema)
    stores = [open_store(c), open_store(c)]
    try:
        a, b = (
            Records(
                c.region, True, schema, rules, Keyring(c.region, open_provider(c.keys), c.keys_dir), s, False
            )
            for s in stores
        )

        def put(r: Records, **fields: str) -> int:
            record = records_pb2.Record()
            for name, value in fields.items():
                record.fields[name].string_value = value
            writes = [Write("sk-1", "registration", record.SerializeToString())]
            r.prepare_keys(writes)
            with r.store.transaction():
                return r.put(writes)[0]

        put(a, name="Old Name", email="old@example.cn")
        old_mark = a.open_row(a.store.rows(["sk-1"])["sk-1"]).key_mark  # cached by a
        with b.store.transaction():
            b.delete("sk-1", "spiffe://residency/service/cn-north/test-suite")
        put(b, name="New Name")
        version = put(a, phone="+86 10 1234 5678")
        opened = b.open_row(b.store.rows(["sk-1"])["sk-1"])
        assert opened.version == version and opened.key_mark != old_mark
        assert {k: v.string_value for k, v in opened.fields.items()} == {
            "name": "New Name",
            "phone": "+86 10 1234 5678",
        }
    finally:
        for s in stores:
            s.close()


async def test_credential_checks_through_two_front_ends_count_against_one_limit(
    idle_cluster: Cluster, primary_store: dict
):
    """Policy 6a's limits hold for the store, not for each front end: with 3 checks a minute
    about a user, a guesser spreading its checks over two front ends gets 3, not 6. The
    buckets live in the store, and a user's goes with the user's erasure."""
    c = idle_cluster
    limits(c, per_user=3, per_caller=600)
    config = yaml.safe_load(c.dep.configs[PRIMARY].read_text())
    config["policy_sweep_seconds"] = 0.5  # buckets full again deleted within a second
    c.dep.configs[PRIMARY].write_text(yaml.safe_dump(config, sort_keys=False))
    b = c.add_front_end("b")  # the same limits: its config is the primary's
    await c.start(PRIMARY, b)
    await c.put("vl-1", {"email": "vl@example.cn", "password": "secret"})

    async def verify(front: str, secret: str) -> bool:
        request = records_pb2.VerifyCredentialRequest(
            context=ctx(PRIMARY, "essential.service"), user_id="vl-1", field="password", secret=secret
        )
        stub = records_pb2_grpc.RecordServiceStub(c.channel(front, "service", PRIMARY, "guesser"))
        return (await stub.VerifyCredential(request, timeout=30)).match

    assert [await verify(f, "guess") for f in (PRIMARY, b, PRIMARY)] == [False, False, False]
    for front in (b, PRIMARY):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await verify(front, "secret")
        assert 0 < exhausted(e.value) <= 20 and "about this user" in e.value.details()

    def buckets() -> list[str]:
        with psycopg.connect(primary_store["dsn"]) as db:
            return [r[0] for r in db.execute("SELECT bucket FROM credential_limits ORDER BY bucket")]

    assert buckets() == ["caller:spiffe://residency/service/cn-north/guesser", "user:vl-1"]
    await c.delete("vl-1")
    assert buckets() == ["caller:spiffe://residency/service/cn-north/guesser"]
    # The caller's bucket (600 a minute, 3 taken) is full again 0.3 s after; the sweep deletes it.
    await eventually(lambda: asyncio.to_thread(lambda: buckets() == []), "the full bucket is swept", 10)


async def test_a_batch_made_under_rules_another_process_narrowed_since_is_not_shipped(idle_cluster: Cluster):
    """Review: a worker (or another front end's replicator) that had not yet heard of a rules
    change shipped the re-projection's new versions under the old rules: a field the change
    took from a region reached it after the change, logged as allowed under the old version,
    and nothing withdrew it (the re-projection, done, had meant to). Now a batch whose rules
    are not the store's is not shipped: the worker takes the store's rules and prepares it
    again. The worker here never hears a notice, so without that check it ships stale."""
    c = idle_cluster
    config = yaml.safe_load(c.dep.configs[PRIMARY].read_text())
    config["replicator"] = {**config.get("replicator", {}), "enabled": False}  # the worker below ships
    c.dep.configs[PRIMARY].write_text(yaml.safe_dump(config, sort_keys=False))
    await c.start(PRIMARY, SG)
    conf = load_config(c.dep.configs[PRIMARY])
    schema = load_schema(conf.schema)
    store = open_store(conf)
    keyring = Keyring(conf.region, open_provider(conf.keys), conf.keys_dir)
    records = Records(
        conf.region,
        True,
        schema,
        rules_at_start(store, conf, schema, load_rules(conf.rules, schema)),
        keyring,
        store,
        hash_keys=load_hash_keys(conf.keys_dir, conf.keys),
    )
    db = StoreThread(store)
    db.start()
    worker = Replicator(records, db, destinations_for(conf, [SG]), conf.replicator, tls=conf.tls)
    worker.follow_rules = SharedRules(conf, schema, records, db, asyncio.Lock()).follow
    await worker.start()
    try:
        await c.put("rn-1", {"name": "Li Wei", "email": "rn@example.cn"})

        async def sg_holds(name: bool) -> bool:
            try:
                return ("name" in values(await c.held("rn-1", SG))) == name
            except grpc.aio.AioRpcError:
                return False

        await eventually(lambda: sg_holds(True), "the worker ships the name under the rules", deadline=30)
        text, before = (c.dir / "rules.yaml").read_text(), records.rules.version
        narrowed = text.replace("categories: [user.name, user.contact,", "categories: [user.contact,")
        assert narrowed != text
        request = admin_pb2.ApplyRulesRequest(rules_yaml=narrowed)
        applied = await c.admin(PRIMARY).ApplyRules(request, timeout=30)
        await eventually(lambda: sg_holds(False), "the re-projection withdraws the name", deadline=30)
        assert records.rules.version == applied.version  # taken from the store, not a notice
        # Shipped once under each rule set, never the re-projected version under the first.
        shipped = [
            x
            for x in map(json.loads, [e for _, e, _ in await c.log()])
            if (x["kind"], x.get("subject"), x.get("destination_region")) == ("replication", "rn-1", SG)
        ]
        assert [x["rules_version"] for x in shipped] == [before, applied.version], shipped
        sent = [{f["name"] for f in x["fields"]} for x in shipped]
        assert "name" in sent[0] and "name" not in sent[1]
    finally:
        await worker.stop()
        await db.drain()
        store.close()
