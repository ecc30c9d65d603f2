"""Rotation without a race (issue 15, point 4): key acts go through the running node, which
switches to the new version before it answers and logs the events itself; retire refuses
while a data key is under an old version; rewrap swaps a row only if it still holds what was
read; only an operator of the node's region may, and `--config` is refused while the node
runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from residency.cli.channel import Credentials
from residency.server.config.node import load_config
from residency.server.config.rules import load_rules
from residency.server.config.schema import load_schema
from residency.server.core.errors import FailedPrecondition, InvalidRecord, KeysBehind
from residency.server.deployment import AFFILIATES, PRIMARY, init_deployment, local_keys
from residency.server.keys import lifecycle, pki
from residency.server.keys.keyring import Keyring
from residency.server.keys.logkey import open_log_key
from residency.server.keys.providers import open_log_provider, open_provider
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.providers.openbao import OpenBaoProvider
from residency.server.storage.keyring import WrappingKeysRenewed
from residency.server.storage.sqlite import SqliteStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.key_events import KeyEvents
from residency.server.vault.key_lifecycle import KeyLifecycle
from residency.server.vault.new_keys import NewKeys
from residency.server.vault.records import Records, Write
from residency.v1 import admin_pb2, admin_pb2_grpc, records_pb2
from tests.conftest import BAO_TOKEN, Cluster, values
from tests.test_keys_node import key_events, keys_cli, keys_run

SG = AFFILIATES[0]


def admin(cluster: Cluster, region: str = PRIMARY, role: str = "operator", location: str = PRIMARY):
    return admin_pb2_grpc.AdminServiceStub(cluster.channel(region, role, location))


def residency(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "residency.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def key_state(cluster: Cluster, region: str) -> tuple[dict, list, str]:
    """What a key act changes: the key files, the data keys (and their wrapping keys), the events."""
    c = load_config(cluster.dep.configs[region])
    files = {p.name: p.read_bytes() for p in c.keys_dir.iterdir() if p.is_file()}
    with sqlite3.connect(c.data_dir / "keys.db") as db:
        rows = sorted(db.execute("SELECT user_id, wrapping_key, wrapped FROM data_keys"))
    return files, rows, (c.keys_dir / lifecycle.STATE).read_text() if lifecycle.STATE in files else ""


async def test_rotate_via_the_node_while_writers_run_then_retire_at_once_and_everything_opens(
    cluster: Cluster,
):
    before = [f"before-{i}" for i in range(150)]
    for u in before:
        await cluster.put(u, {"name": f"name of {u}"})
    written: list[str] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            u = f"w{w}-{n}"
            await cluster.put(u, {"name": f"name of {u}"})
            written.append(u)  # acknowledged
            n += 1

    writers = [asyncio.create_task(writer(w)) for w in range(4)]
    while len(written) < 20:
        await asyncio.sleep(0.05)
    at_rotation = len(written)
    out = await asyncio.to_thread(keys_cli, cluster, "rotate", PRIMARY)
    assert out["version"] == "v2" and out["data_keys_rewrapped"] >= len(before) + at_rotation
    during = len(written)
    # At once, writers still running: every new data key is under v2 since the node switched.
    retired = await admin(cluster).RetireKeys(admin_pb2.RetireKeysRequest(), timeout=60)
    assert retired.version == "v2"
    after_retire = len(written)
    while len(written) < after_retire + 20:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*writers)
    assert during > at_rotation and len(written) > after_retire  # written before, during, after
    print(
        f"rotation figures: {len(before)} records before the writers, {at_rotation} written before the "
        f"rotation, {during - at_rotation} during it ({out['data_keys_rewrapped']} data keys rewrapped), "
        f"{after_retire - during} between it and the retire, {len(written) - after_retire} after"
    )
    keys = load_config(cluster.dep.configs[PRIMARY]).keys_dir
    assert sorted(p.name for p in keys.glob("kek-v*.key")) == ["kek-v2.key"]
    # A restarted primary holds no opened key: each record's data key is unwrapped again.
    cluster.stop(PRIMARY)
    await cluster.start(PRIMARY)
    for u in before + written:
        assert values(await cluster.get(u))["name"] == f"name of {u}", u
    # The node logged the events itself, naming the operator; the export verifies offline.
    events = await key_events(cluster, PRIMARY)
    assert [e["reason"].split(":")[0] for e in events] == ["rotated", "rewrapped", "retired"]
    assert {e["actor"] for e in events} == {cluster.dep.operator.identity().uri}
    export = cluster.dir / "export"
    r = residency("log", "export", *cluster.target("reviewer"), "--out", str(export))
    assert r.returncode == 0, r.stderr
    exported = [json.loads(line) for line in (export / "entries.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in exported if e["kind"] == "key_event"] == [e["reason"] for e in events]
    r = residency("log", "verify", str(export), "--key", str(keys / "log.pub"))
    assert r.returncode == 0, r.stderr


async def test_retire_is_refused_while_a_data_key_is_under_an_old_version_until_rewrapped(cluster: Cluster):
    for i in range(30):
        await cluster.put(f"r-{i}", {"name": "Li Wei"})
    # A rotation cut short, on the stopped node: a new provider version, no data key rewrapped.
    c = load_config(cluster.dep.configs[PRIMARY])
    cluster.stop(PRIMARY)
    provider, log_keys = open_provider(c.keys), open_log_provider(c.keys)
    assert lifecycle.rotate(PRIMARY, provider, c.keys_dir, log_keys=log_keys) == "v2"
    await cluster.start(PRIMARY)
    await cluster.put("r-new", {"name": "Wang Fang"})  # under v2 already
    state = key_state(cluster, PRIMARY)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await admin(cluster).RetireKeys(admin_pb2.RetireKeysRequest(), timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    said = e.value.details()
    assert "30 data keys of cn-north are still under key versions older than v2 (30 under v1)" in said
    assert "Rewrap first (`residency keys rewrap`)" in said and "nothing was retired" in said
    assert key_state(cluster, PRIMARY) == state and not await key_events(cluster, PRIMARY)
    # The CLI says the same, and leaves it so.
    r = keys_run(cluster, "retire", PRIMARY, creds=cluster.dep.operator)
    assert r.returncode != 0 and "FAILED_PRECONDITION" in r.stderr and "30 under v1" in r.stderr
    out = keys_cli(cluster, "rewrap", PRIMARY)
    assert out == {"region": PRIMARY, "version": "v2", "data_keys_rewrapped": 31}
    out = keys_cli(cluster, "retire", PRIMARY)
    assert out["version"] == "v2"
    assert sorted(p.name for p in c.keys_dir.glob("kek-v*.key")) == ["kek-v2.key"]
    cluster.stop(PRIMARY)
    await cluster.start(PRIMARY)
    for u in [*(f"r-{i}" for i in range(30)), "r-new"]:
        assert values(await cluster.get(u))["name"], u


async def test_key_acts_refuse_callers_without_the_permission_and_liars_and_change_nothing(
    cluster: Cluster, tmp_path: Path
):
    await cluster.put("u-1", {"name": "Li Wei"})
    await cluster.replicated()
    sg_status = await admin(cluster, SG, location=SG).GetNodeStatus(
        admin_pb2.GetNodeStatusRequest(), timeout=30
    )
    assert sg_status.key_version == "v1" and sg_status.region_key_id
    acts = {
        "RotateKeys": admin_pb2.RotateKeysRequest(from_version="v1"),
        "RewrapKeys": admin_pb2.RewrapKeysRequest(),
        "RetireKeys": admin_pb2.RetireKeysRequest(),
        "ShredRegionKey": admin_pb2.ShredRegionKeyRequest(key_id=sg_status.region_key_id, reason="x"),
        "RekeyRegionKey": admin_pb2.RekeyRegionKeyRequest(),
    }
    before = {r: key_state(cluster, r) for r in (PRIMARY, SG)}
    pki.create_ca(tmp_path / "foreign")  # the same trust domain and names, another CA
    pki.issue(tmp_path / "foreign", "operator", SG, "operator", tmp_path / "foreign-op")
    forged = Credentials.files(tmp_path / "foreign-op", cluster.dir / "pki" / "ca.crt")
    callers = {
        "a service of the region": (cluster.channel(SG, "service", SG), grpc.StatusCode.PERMISSION_DENIED),
        "an operator of another region": (
            cluster.channel(SG, "operator", PRIMARY),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "a reviewer": (cluster.channel(SG, "reviewer", SG), grpc.StatusCode.PERMISSION_DENIED),
        "an operator of another CA": (forged.channel(cluster.dep.addresses[SG]), grpc.StatusCode.UNAVAILABLE),
    }
    for who, (channel, code) in callers.items():
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        for method, request in acts.items():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await getattr(stub, method)(request, timeout=30)
            assert e.value.code() == code, (who, method, e.value.details())
            if code == grpc.StatusCode.PERMISSION_DENIED:
                assert "admin.keys" in e.value.details(), (who, method)
        if who == "an operator of another CA":
            await channel.close()
    # An operator of the region who lies: a stale version, another key id.
    own = admin(cluster, SG, location=SG)
    lies = {
        "RotateKeys": (admin_pb2.RotateKeysRequest(from_version="v0"), "is at version v1, not v0"),
        "ShredRegionKey": (
            admin_pb2.ShredRegionKeyRequest(key_id="0" * 16),
            "a shred names the key it destroys",
        ),
    }
    for method, (request, said) in lies.items():
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await getattr(own, method)(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and said in e.value.details(), method
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await own.ShredRegionKey(
            admin_pb2.ShredRegionKeyRequest(key_id=sg_status.region_key_id, reason="x" * 10_000), timeout=30
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing changed: the keys, the data keys, the events; the copy still opens.
    assert {r: key_state(cluster, r) for r in (PRIMARY, SG)} == before
    assert not await key_events(cluster, SG) and not await key_events(cluster, PRIMARY)
    assert values(await cluster.held("u-1", SG))["name"] == "Li Wei"


async def test_config_is_refused_while_the_node_runs_and_works_on_the_stopped_node(cluster: Cluster):
    await cluster.put("u-1", {"name": "Li Wei"})
    state = key_state(cluster, PRIMARY)
    for action in ("rotate", "retire"):
        r = keys_run(cluster, action, PRIMARY, creds=cluster.dep.operator, offline=True)
        assert r.returncode != 0 and "is running" in r.stderr and "--target HOST:PORT" in r.stderr, r.stderr
        assert "Nothing was changed" in r.stderr and not r.stdout
    r = keys_run(cluster, "rotate", PRIMARY, "--config", "x.yaml", creds=cluster.dep.operator)
    assert r.returncode != 0 and "--target HOST:PORT while it runs, or --config FILE" in r.stderr
    assert key_state(cluster, PRIMARY) == state
    cluster.stop(PRIMARY)
    out = keys_cli(cluster, "rotate", PRIMARY, "--quiet", offline=True)
    assert out["version"] == "v2" and out["data_keys_rewrapped"] == 1
    keys_cli(cluster, "retire", PRIMARY, offline=True)
    await cluster.start(PRIMARY)
    assert values(await cluster.get("u-1"))["name"] == "Li Wei"
    events = await key_events(cluster, PRIMARY)
    assert [e["reason"].split(":")[0] for e in events] == ["rotated", "rewrapped", "retired"]


def _written(tmp_path: Path, store_class: type, users: tuple[str, ...]):
    """A primary's config, keyring, store (of `store_class`) and records, with `users` written
    as the node writes them (the new users' keys commit first)."""
    c = load_config(init_deployment(tmp_path / "deployment")[PRIMARY])
    schema = load_schema(c.schema)
    keyring = Keyring(c.region, open_provider(c.keys), c.keys_dir)
    store = store_class(c.data_dir / "node.db")
    records = Records(c.region, True, schema, load_rules(c.rules, schema), keyring, store)
    body = records_pb2.Record()
    body.fields["name"].string_value = "Li Wei"
    writes = [Write(u, "registration", body.SerializeToString()) for u in users]
    records.prepare_keys(writes)
    with store.transaction():
        records.put(writes)
    return c, keyring, store, records


def _key_acts(c, store: SqliteStore, records: Records) -> tuple[StoreThread, KeyLifecycle]:
    """The node's store thread over `store`, started, and its key acts."""
    db = StoreThread(store)
    db.start()
    events = KeyEvents(c.region, True, c.keys_dir, records, db, lambda _: None)
    return db, KeyLifecycle(events, db, open_log_provider(c.keys), c.keys.kem)


class Interleaved(SqliteStore):
    """The store, with a user erased and registered again between a rewrap's read and its write."""

    def __init__(self, *args, between=None, **kw):
        super().__init__(*args, **kw)
        self.between = between

    def swap_data_keys(self, rows):
        if self.between is not None:
            self.between(self)
            self.between = None
        return super().swap_data_keys(rows)


async def test_rewrap_swaps_a_row_only_if_it_still_holds_the_key_that_was_read(tmp_path: Path):
    c, keyring, store, records = _written(tmp_path, Interleaved, ("a", "b", "c"))
    old_b = store.data_keys(["b"])["b"][2]

    def erase_and_register_again(s: SqliteStore) -> None:
        # What an erasure and a new registration of "b" do to its data key, meanwhile.
        s.delete_data_keys(["b"])
        key, wk, wrapped = keyring.new_data_key("b")
        s.put_wrapping_key(wk.id, wk.wrapped)
        s.put_data_keys([("b", wk.id, wrapped)])
        registered.update(raw=key.raw, wrapped=wrapped)

    registered: dict[str, bytes] = {}
    store.between = erase_and_register_again
    db, keys = _key_acts(c, store, records)
    try:
        out = await keys.rewrap("spiffe://residency/operator/cn-north/operator")
    finally:
        await db.drain()
    # "a" and "c" were rewrapped; "b" keeps the key it was registered with again, not the old
    # one rewrapped over it (an unconditional write would have put that back).
    assert out["data_keys_rewrapped"] == 2
    now = store.data_keys(["a", "b", "c"])
    assert now["b"][2] == registered["wrapped"] != old_b
    fresh = Keyring(c.region, LocalProvider(c.keys.dir, c.keys.passphrase), c.keys_dir)
    assert fresh.open_stored_key("b", *now["b"]).raw == registered["raw"]
    for u in ("a", "c"):
        fresh.open_stored_key(u, *now[u])
    store.close()


async def test_a_keys_folder_with_as_many_events_as_the_store_logged_but_not_the_same_opens_nothing(
    tmp_path: Path,
):
    """Review: a process compared its keys folder with the store's log of key events by their
    number alone. A copy of the folder holding an event of its own that a crash kept from the
    log (its process appended it, then died) was taken as current once another process had
    logged one event more through the shared folder: a shred there would not have held in this
    one. The store now keeps a digest of the events it logged; a folder whose first events are
    not those opens nothing, whatever their number, until it holds them."""
    c, keyring, store, records = _written(tmp_path, SqliteStore, ("u-1",))
    db, keys = _key_acts(c, store, records)
    actor = "spiffe://residency/operator/cn-north/operator"
    shared, own = c.keys_dir, tmp_path / "own-keys"
    row = lambda: store.rows(["u-1"])["u-1"]  # noqa: E731
    try:
        await keys.rotate(actor, "v1")  # `rotated`, `rewrapped`: logged
        shutil.copytree(shared, own)
        lifecycle.append_event(own, "rotated", actor, "v2 -> v3")  # never logged
        await keys.retire(actor)  # logged, through the shared folder
        logged = lifecycle.read_events(shared)
        assert len(lifecycle.read_events(own)) == len(logged) == 3
        assert store.key_event_head(c.region) == (3, lifecycle.events_digest(logged))
        assert records.open_row(row()).fields["name"].string_value == "Li Wei"

        other = KeyEvents(c.region, True, own, records, db, lambda _: None)  # the copy's process
        differ = "the first 3 key events in this process's keys folder are not those the store logged"
        with pytest.raises(KeysBehind, match=differ):
            await other.apply()
        with pytest.raises(KeysBehind, match=differ):
            records.open_row(row())
        # A copy of the same events with one word changed (an edited actor) is no better, and
        # neither is one holding an event more after them.
        edited = json.loads(json.dumps(logged))
        edited[2]["actor"] = "spiffe://residency/operator/cn-north/someone-else"
        for events in (edited, [*edited, logged[0]]):
            (own / lifecycle.STATE).write_text(json.dumps({"events": events}))
            with pytest.raises(KeysBehind, match=differ):
                await other.apply()
        # Nor one whose edited event holds a lone surrogate (the digest is over ASCII JSON).
        edited[2]["actor"] = "\udce9"
        (own / lifecycle.STATE).write_text(json.dumps({"events": edited}))
        with pytest.raises(KeysBehind, match=differ):
            await other.apply()
        # Once it holds the store's events (and one more of its own, logged then), it opens again.
        (own / lifecycle.STATE).write_text(json.dumps({"events": logged}))
        lifecycle.append_event(own, "rewrapped", actor, "0 data keys")
        await other.apply()
        assert not records.keyring.suspended
        assert records.open_row(row()).fields["name"].string_value == "Li Wei"
        now = lifecycle.read_events(own)
        assert store.key_event_head(c.region) == (4, lifecycle.events_digest(now))
        assert store.cursor(f"key_events:{c.region}") == 4
        # A store that logged events before it kept their digest (schema version 17) takes the
        # digest of the first folder it sees, then holds every other to it.
        store._db.execute("DELETE FROM key_event_heads")
        await other.apply()
        assert store.key_event_head(c.region) == (4, lifecycle.events_digest(now))
        lifecycle.append_event(shared, "rewrapped", actor, "1 data key")  # not the copy's fourth
        with pytest.raises(KeysBehind, match="the first 4 key events"):
            await keys.events.apply()
    finally:
        await db.drain()
        store.close()


async def test_a_shred_whose_reason_is_not_text_destroys_nothing(tmp_path: Path):
    """Review: `residency keys shred --config --reason` with bytes that are not UTF-8 (argv's
    surrogates) destroyed the key, then could never log the event, and every later start
    failed on it. Refused first now, nothing destroyed."""
    c, keyring, store, records = _written(tmp_path, SqliteStore, ("u-1",))
    db, keys = _key_acts(c, store, records)
    try:
        with pytest.raises(InvalidRecord, match="reason"):
            await keys.shred("operator", keys.region_key_id(), "lost \udce9")
        assert (c.keys_dir / "region.key").exists() and lifecycle.read_events(c.keys_dir) == []
        assert records.open_row(store.rows(["u-1"])["u-1"]).fields["name"].string_value == "Li Wei"
    finally:
        await db.drain()
        store.close()


async def test_with_openbao_a_version_made_in_its_console_holds_retire_until_the_node_rewraps(
    bao_address: str, tmp_path: Path
):
    """The same acts against a real OpenBao Transit key: a version made outside the node (in
    OpenBao's own console or API) is found by retire, which refuses until a rewrap."""
    key = f"rot-{tmp_path.name[-12:]}".replace("_", "-")
    (tmp_path / "token").write_text(BAO_TOKEN)

    def keys(d: Path, region: str) -> dict:
        if region != PRIMARY:
            return local_keys(d, region)
        return {
            "provider": "openbao",
            "address": bao_address,
            "token_file": str(tmp_path / "token"),
            "transit_key": key,
            "dir": f"keys/{region}",
        }

    cluster = Cluster(tmp_path / "deployment", keys=keys)
    try:
        await cluster.start(PRIMARY)
        for i in range(12):
            await cluster.put(f"b-{i}", {"name": "Li Wei"})
        stub = admin(cluster)
        status = await stub.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=30)
        assert status.key_version == "v1"
        rotated = await stub.RotateKeys(admin_pb2.RotateKeysRequest(from_version="v1"), timeout=60)
        assert (rotated.version, rotated.data_keys_rewrapped) == ("v2", 12)
        with pytest.raises(grpc.aio.AioRpcError) as e:  # rotated since: nothing rotated twice
            await stub.RotateKeys(admin_pb2.RotateKeysRequest(from_version="v1"), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is at version v2, not v1" in str(
            e.value
        )
        OpenBaoProvider(bao_address, BAO_TOKEN, key).rotate()  # v3, made behind the node's back
        await cluster.put("b-new", {"name": "Wang Fang"})
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.RetireKeys(admin_pb2.RetireKeysRequest(), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "older than v3 (13 under v2)" in e.value.details(), e.value.details()
        await stub.RewrapKeys(admin_pb2.RewrapKeysRequest(), timeout=60)
        assert (await stub.RetireKeys(admin_pb2.RetireKeysRequest(), timeout=60)).version == "v3"
        cluster.stop(PRIMARY)
        await cluster.start(PRIMARY)
        for u in [*(f"b-{i}" for i in range(12)), "b-new"]:
            assert values(await cluster.get(u))["name"], u
    finally:
        await cluster.close()


def test_new_data_keys_follow_a_rotation_another_process_of_the_store_made(tmp_path: Path):
    """Two processes of one store (SQLite: new keys in a transaction of their own), each with
    its own wrapping key. Once the other has rotated, this one's wrapping key, made under the
    old version, adds no data key; its next batch goes under a new one, of the new version."""
    configs = init_deployment(tmp_path / "deployment")
    c = load_config(configs[PRIMARY])
    here, other = SqliteStore(c.data_dir / "node.db"), SqliteStore(c.data_dir / "node.db")
    provider = LocalProvider(c.keys.dir, c.keys.passphrase)
    new_keys = NewKeys(Keyring(c.region, provider, c.keys_dir), here)
    new_keys.prepare(["u-0"])
    _, old = new_keys.take("u-0")

    other_provider = LocalProvider(c.keys.dir, c.keys.passphrase)
    assert other_provider.rotate() == "v2"
    with other.transaction():
        other.renew_wrapping_keys()
    with pytest.raises(WrappingKeysRenewed):  # what the old wrapping key would add: nothing
        here.add_data_keys({old: b"w"}, [("u-x", old, b"k")], generation=0)
    assert here.data_keys(["u-x"]) == {}

    new_keys.prepare(["u-1"])
    key, new = new_keys.take("u-1")
    assert new != old
    wk_id, wk_wrapped, wrapped = here.data_keys(["u-1"])["u-1"]
    assert wk_id == new and provider.version_of(wk_wrapped) == "v2"
    fresh = Keyring(c.region, other_provider, c.keys_dir)
    assert fresh.open_stored_key("u-1", wk_id, wk_wrapped, wrapped).raw == key.raw
    here.close()
    other.close()


class RotatedMeanwhile(SqliteStore):
    """The store, with another process's rotation committed between a rewrap's read and its write."""

    def data_keys_not_under(self, *args):
        page = super().data_keys_not_under(*args)
        if page and not getattr(self, "rotated", False):
            self.rotated = True
            other = SqliteStore(self._path)
            with other.transaction():
                other.renew_wrapping_keys()
            other.close()
        return page


async def test_a_rewrap_stops_where_another_process_rotated_meanwhile_and_runs_again(tmp_path: Path):
    """Its wrapping key belongs to the generation the other's rotation renewed: the rewrap
    swaps nothing more and says so; run again, it rewraps every data key."""
    c, keyring, store, records = _written(tmp_path, RotatedMeanwhile, ("a", "b", "c"))
    before = store.data_keys(["a", "b", "c"])
    db, keys = _key_acts(c, store, records)
    actor = "spiffe://residency/operator/cn-north/operator"
    try:
        with pytest.raises(FailedPrecondition, match="rotated or retired meanwhile"):
            await keys.rewrap(actor)
        assert store.data_keys(["a", "b", "c"]) == before  # nothing swapped
        out = await keys.rewrap(actor)
    finally:
        await db.drain()
    assert out["data_keys_rewrapped"] == 3
    assert all(wk != before["a"][0] for wk, _, _ in store.data_keys(["a", "b", "c"]).values())
    store.close()


class RotatedDuringRetire(SqliteStore):
    """The store, with another front end's rotation (a new version, the generation renewed,
    its rewrap not begun) right after a retire's check, which this front end's next batch of
    new users follows before the retire."""

    def data_keys_per_wrapping_key(self):
        in_use = super().data_keys_per_wrapping_key()  # what the check goes by
        if self.keyring.provider.newest_version() == "v2":  # the retire's, not the rotation's
            other = SqliteStore(self._path)
            c = self.config  # the other front end's `residency keys rotate`, of both keys
            other_log_keys = open_log_provider(c.keys)
            assert (
                lifecycle.rotate(c.region, self.other_provider, c.keys_dir, log_keys=other_log_keys) == "v3"
            )
            with other.transaction():
                generation = other.renew_wrapping_keys()
            other.close()
            self.keyring.follow(generation)
        return in_use


async def test_a_retire_keeps_the_version_a_rotation_elsewhere_left_its_data_keys_under(tmp_path: Path):
    """The retire read v2 as the newest and checked that no data key is under an older one.
    Meanwhile another front end rotated to v3 and is about to rewrap: v2 holds every data key
    still, and must stay. Retiring "all but the newest" as the provider sees it by then (v3)
    shreds it."""
    c, keyring, store, records = _written(tmp_path, RotatedDuringRetire, ("a", "b"))
    store.keyring, store.other_provider = keyring, LocalProvider(c.keys.dir, c.keys.passphrase)
    store.config = c
    db, keys = _key_acts(c, store, records)
    actor = "spiffe://residency/operator/cn-north/operator"
    try:
        await keys.rotate(actor, "v1")
        retired = await keys.retire(actor)
    finally:
        await db.drain()
    assert retired["version"] == "v2"
    assert sorted(p.name for p in c.keys.dir.glob("kek-v*.key")) == ["kek-v2.key", "kek-v3.key"]
    open_log_key(c.keys_dir / "log.key", c.keys)  # the log signing key opens
    fresh = Keyring(c.region, LocalProvider(c.keys.dir, c.keys.passphrase), c.keys_dir)
    for u, (wk_id, wk_wrapped, wrapped) in store.data_keys(["a", "b"]).items():
        fresh.open_stored_key(u, wk_id, wk_wrapped, wrapped)
    store.close()
