"""Shredding stops the flow, and a rekey restarts it: a region whose key was shredded refuses
copies sealed to it, the primary holds that destination (`key shredded` in its status) and
sends nothing more; `residency keys rekey` makes a new key pair, the primary learns it from
the region node's signed statement (and from nobody else) and sends every copy again."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from residency.replicator.destinations import learn_key, verified_key
from residency.server.config.node import load_config
from residency.server.core.errors import CallerDenied
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.server.keys import pki
from residency.server.keys.region import RecipientKey
from residency.server.storage.sqlite import SqliteStore
from residency.server.storage.thread import StoreThread
from residency.v1 import replica_pb2
from tests.conftest import Cluster, values
from tests.test_keys_node import keys_run, until
from tests.test_records import violations

SG, IE = AFFILIATES


async def log_of(c: Cluster, region: str) -> list[dict]:
    return [json.loads(e) for _, e, _ in await c.log(region)]


async def test_a_shredded_region_gets_nothing_until_it_rekeys_then_every_copy_again(cluster: Cluster):
    c = cluster
    for i in range(3):
        await c.put(f"k-{i}", {"name": "Li Wei", "language": "zh-CN"})
    await c.replicated()
    sg = load_config(c.dep.configs[SG])
    leaked = RecipientKey.load(SG, sg.keys_dir / "region.pub").key_id
    r = keys_run(
        c, "shred", SG, "--yes", "--reason", "test: key leaked", creds=c.dep.credentials("operator", SG)
    )
    assert r.returncode == 0, r.stderr

    async def unreadable() -> bool:
        try:
            await c.get("k-0", region=SG)
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.FAILED_PRECONDITION
        return False

    await until(unreadable)
    # A rekey is for a shredded key only, and for a region node's.
    r = keys_run(c, "rekey", PRIMARY, creds=c.dep.operator)
    assert r.returncode != 0 and "rekey is for a region node's key" in r.stderr
    r = keys_run(c, "rekey", IE, creds=c.dep.credentials("operator", IE))
    assert r.returncode != 0 and "was not shredded" in r.stderr
    # A new write: the primary seals it to the leaked key, the region refuses it, and the
    # primary holds the destination instead of sending more.
    await c.put("k-new", {"name": "Wang Fang", "language": "zh-CN"})

    async def held():
        s = (await c.replication())[SG]
        return s if s.key_state.startswith("key shredded") else None

    status = await until(held)
    assert leaked in status.key_state and status.pending >= 1
    sent = status.copies_sent
    refused = [e for e in await log_of(c, SG) if e["kind"] == "replication" and e["outcome"] == "denied"]
    assert refused and refused[-1]["subject"] == "k-new" and leaked in refused[-1]["reason"]
    assert refused[-1]["actor"] == "spiffe://residency/node/cn-north/primary"
    # Other regions go on.
    await until(lambda: held_in(c, "k-new", IE))
    await c.put("k-new2", {"name": "Zhao Lei", "language": "en-GB"})
    await until(lambda: held_in(c, "k-new2", IE))
    assert (await c.replication())[SG].copies_sent == sent
    # The region makes a new key; the primary learns it from the region node and sends
    # every copy again: all four users open there under the new key.
    r = keys_run(c, "rekey", SG, creds=c.dep.credentials("operator", SG))
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)["key_id"]
    assert new != leaked

    async def all_back() -> bool:
        try:
            got = [values(await c.held(u, SG)) for u in ("k-0", "k-1", "k-2", "k-new")]
        except grpc.aio.AioRpcError:
            return False
        return all(g["name"] for g in got)

    try:
        await until(all_back, deadline=30)
    except TimeoutError:
        raise AssertionError(str((await c.replication())[SG])) from None

    async def settled():
        s = (await c.replication())[SG]
        return s if s.key_state == "" and s.pending == 0 else None

    await until(settled, deadline=60)
    learned = [e for e in await log_of(c, PRIMARY) if e["reason"].startswith("learned:")]
    assert len(learned) == 1 and new in learned[0]["reason"]
    assert learned[0]["actor"] == "spiffe://residency/node/ap-southeast-1/region"
    events = [e["reason"] for e in await log_of(c, SG) if e["kind"] == "key_event"]
    assert [x.split(":")[0] for x in events] == ["shredded", "rekeyed", "dropped"]


async def held_in(c: Cluster, user: str, region: str) -> bool:
    try:
        return bool(values(await c.held(user, region)))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


ASK = b"nonce of this ask"


def statement(
    region: str, key: RecipientKey | None, signer: Path, issued: float | None = None, nonce: bytes = ASK
) -> bytes:
    """A GetRegionKeyResponse signed with the key of certificate `signer`.crt, issued now (or
    at `issued`), answering the ask that sent `nonce`."""
    s = replica_pb2.RegionKeyStatement(region=region, nonce=nonce)
    s.issued_at.FromNanoseconds(int((time.time() if issued is None else issued) * 1e9))
    if key is not None:
        s.key_id, s.kem, s.public_key = key.key_id, key.kem, key.public_raw
    return statement_from(s, signer)


def test_a_new_region_key_is_taken_only_from_that_regions_node(idle_cluster: Cluster, tmp_path: Path):
    c = idle_cluster
    tls = load_config(c.dep.configs[PRIMARY]).tls
    folder = c.dir / "pki"
    key = RecipientKey.load(SG, load_config(c.dep.configs[SG]).keys_dir / "region.pub")
    got, signer = verified_key(SG, statement(SG, key, folder / SG), tls, ASK)
    assert got == key and signer == "spiffe://residency/node/ap-southeast-1/region"
    # Liars: another region's node, a service of the region, a node stating another region's
    # key, a statement whose key id is not its key's, a signature by another certificate.
    pki.issue(folder, "service", SG, "svc", tmp_path / "svc")
    liars = {
        "stated a key of region": statement(SG, key, folder / IE),
        "of role service": statement(SG, key, tmp_path / "svc"),
    }
    other = replica_pb2.GetRegionKeyResponse.FromString(statement(SG, key, folder / SG))
    s = replica_pb2.RegionKeyStatement.FromString(other.statement)
    s.key_id = "x25519-0000"
    liars["but its public key's id is"] = statement_from(s, folder / SG)
    swapped = replica_pb2.GetRegionKeyResponse.FromString(statement(SG, key, folder / SG))
    swapped.certificate = (folder / IE).with_suffix(".crt").read_bytes()
    liars["not signed by the key of"] = swapped.SerializeToString()
    # A statement recorded earlier and played back: answering another ask (made a second
    # ago, or by a region node that signs no nonce), an hour old, or no newer than the one held.
    liars["in answer to another ask"] = statement(SG, key, folder / SG, nonce=b"nonce of an earlier ask")
    liars["without this ask's nonce (a region node older than its primary"] = statement(
        SG, key, folder / SG, nonce=b""
    )
    liars["more than 600 s from this node's clock"] = statement(SG, key, folder / SG, time.time() - 3600)
    liars["from this node's clock"] = statement(SG, key, folder / SG, time.time() + 3600)
    for why, evidence in liars.items():
        with pytest.raises(CallerDenied) as e:
            verified_key(SG, evidence, tls, ASK)
        assert why in str(e.value), (why, str(e.value))
    earlier = statement(SG, key, folder / SG, time.time() - 60)
    held = statement(SG, key, folder / SG, time.time() - 30)
    with pytest.raises(CallerDenied, match="not after the statement held"):
        verified_key(SG, earlier, tls, ASK, held)
    assert verified_key(SG, statement(SG, key, folder / SG), tls, ASK, held)[0] == key
    # A statement from another deployment's CA is refused too.
    foreign = tmp_path / "foreign"
    pki.create_ca(foreign, "residency")
    pki.issue(foreign, "node", SG, "region", foreign / "sg")
    with pytest.raises(CallerDenied, match="does not chain to the deployment's CA"):
        verified_key(SG, statement(SG, key, foreign / "sg"), tls, ASK)


def statement_from(s: replica_pb2.RegionKeyStatement, signer: Path) -> bytes:
    data = s.SerializeToString()
    private = serialization.load_pem_private_key(signer.with_suffix(".key").read_bytes(), None)
    return replica_pb2.GetRegionKeyResponse(
        statement=data, signature=pki.sign(private, data), certificate=signer.with_suffix(".crt").read_bytes()
    ).SerializeToString()


async def test_a_held_primary_refuses_a_statement_no_newer_than_the_one_it_keeps(
    idle_cluster: Cluster, tmp_path: Path
):
    """`learn_key` against whoever answers at the region's address (the sink stands for it):
    the store keeps the statement of the key learned last; a recording of an earlier one, of
    another key, is refused and leaves the hold as it was, and so is a recording of a fresh
    one, newer than the one held, made for another ask; one made for this ask is learned."""
    c = idle_cluster
    tls = load_config(c.dep.configs[PRIMARY]).tls
    signer = c.dir / "pki" / SG
    old, kept, new = (
        RecipientKey(SG, X25519PrivateKey.generate().public_key().public_bytes_raw()) for _ in range(3)
    )
    store = SqliteStore(tmp_path / "node.db")
    db = StoreThread(store)
    db.start()
    try:
        await db.write(lambda: store.set_region_key(SG, statement(SG, kept, signer, time.time() - 30)))
        answers: list[Callable[[bytes], bytes]] = []
        asked: list[bytes] = []

        async def region_key(nonce: bytes) -> bytes:
            asked.append(nonce)
            return answers.pop()(nonce)

        dest = SimpleNamespace(
            region=SG,
            sink=SimpleNamespace(region_key=region_key),
            keys=SimpleNamespace(recipient=kept),
            use_key=lambda key: setattr(dest.keys, "recipient", key),
        )
        home = SimpleNamespace(region=PRIMARY, rules=SimpleNamespace(version="v1"))
        answers.append(lambda nonce: statement(SG, old, signer, time.time() - 60, nonce))
        with pytest.raises(CallerDenied, match="not after the statement held"):
            await learn_key(dest, tls, home, db)  # type: ignore[arg-type]
        recorded = statement(SG, new, signer, nonce=asked[-1])  # answers the first ask
        answers.append(lambda nonce: recorded)
        with pytest.raises(CallerDenied, match="in answer to another ask"):
            await learn_key(dest, tls, home, db)  # type: ignore[arg-type]
        assert len(asked) == 2 and len(set(asked)) == 2 and all(len(n) == 16 for n in asked)
        assert dest.keys.recipient == kept and (await db.call(store.key_state, SG))[1] != recorded
        fresh = b""

        def answer(nonce: bytes) -> bytes:
            nonlocal fresh
            fresh = statement(SG, new, signer, nonce=nonce)
            return fresh

        answers.append(answer)
        assert await learn_key(dest, tls, home, db) is True  # type: ignore[arg-type]
        assert dest.keys.recipient == new and (await db.call(store.key_state, SG))[1] == fresh
    finally:
        await db.drain()
        store.close()


async def test_a_region_node_signs_the_askers_nonce_into_its_statement(idle_cluster: Cluster):
    """Over the wire: the statement a region node signs answers the ask it was made for, and
    for no other; a nonce longer than 64 bytes is refused INVALID_ARGUMENT naming it."""
    c = idle_cluster
    await c.start(SG)
    tls = load_config(c.dep.configs[PRIMARY]).tls
    key = RecipientKey.load(SG, load_config(c.dep.configs[SG]).keys_dir / "region.pub")
    stub = c.replica(SG)
    ask, other = b"\x01" * 16, b"\x02" * 16
    reply = await stub.GetRegionKey(replica_pb2.GetRegionKeyRequest(nonce=ask), timeout=30)
    assert replica_pb2.RegionKeyStatement.FromString(reply.statement).nonce == ask
    evidence = reply.SerializeToString()
    assert verified_key(SG, evidence, tls, ask) == (key, "spiffe://residency/node/ap-southeast-1/region")
    with pytest.raises(CallerDenied, match="in answer to another ask"):
        verified_key(SG, evidence, tls, other)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetRegionKey(replica_pb2.GetRegionKeyRequest(nonce=b"\x00" * 65), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"nonce": "holds 65 bytes; at most 64"}
