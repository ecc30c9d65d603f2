"""Credentials on a real primary (policy 6a): stored as Argon2id PHC strings, old scrypt
hashes verified and rehashed, VerifyCredential rate-limited per user and per caller, and as
slow for users who have no credential as for those who do."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import grpc
import pytest
import yaml
from argon2 import PasswordHasher
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from residency.server.config.node import load_config
from residency.server.config.rules import load_rules
from residency.server.config.schema import load_schema
from residency.server.core.policy.credentials import (
    TokenBuckets,
    Verdict,
    VerifyLimits,
    hash_credential,
    verify_credential,
)
from residency.server.core.policy.opaque import oversize, prepared
from residency.server.core.schema import FieldSpec, _check_value
from residency.server.deployment import PRIMARY
from residency.server.keys.keyring import Keyring
from residency.server.keys.providers import open_provider
from residency.server.storage.sqlite import SqliteStore
from residency.server.vault.credentials import VerifyBuckets
from residency.server.vault.records import Records, Write
from residency.v1 import common_pb2, records_pb2, records_pb2_grpc
from tests.conftest import Cluster, ctx
from tests.test_crypto import counting, legacy_scrypt
from tests.test_keys_node import backup, open_offline


def limits(cluster: Cluster, per_user: float, per_caller: float) -> None:
    path = cluster.dep.configs[PRIMARY]
    config = yaml.safe_load(path.read_text())
    config["credentials"] = {"per_user_per_minute": per_user, "per_caller_per_minute": per_caller}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


async def verify(cluster: Cluster, user_id: str, secret: str, caller: str = "test-suite") -> bool:
    """VerifyCredential as the service whose certificate names `caller`."""
    request = records_pb2.VerifyCredentialRequest(
        context=ctx(PRIMARY, "essential.service"), user_id=user_id, field="password", secret=secret
    )
    stub = records_pb2_grpc.RecordServiceStub(cluster.channel(PRIMARY, "service", PRIMARY, caller))
    reply = await stub.VerifyCredential(request, timeout=30)
    return reply.match


def stored_password(cluster: Cluster, tmp_path: Path, user_id: str) -> bytes:
    """The primary's stored hash, read from an online backup with the region's own keys."""
    db = backup(cluster.data_dir(PRIMARY) / "node.db", tmp_path / f"backup-{time.monotonic_ns()}.db")
    return open_offline(cluster, PRIMARY, db, user_id)["password"].bytes_value


async def test_a_credential_is_stored_as_an_argon2id_phc_string(module_cluster: Cluster, tmp_path: Path):
    await module_cluster.put("ph-1", {"email": "ph@example.cn", "password": "correct horse"})
    stored = stored_password(module_cluster, tmp_path, "ph-1")
    assert stored.startswith(b"$argon2id$v=19$m=19456,t=2,p=1$") and b"correct horse" not in stored
    assert await verify(module_cluster, "ph-1", "correct horse") is True
    assert await verify(module_cluster, "ph-1", "battery staple") is False
    # Nobody learns from the answer whether a user exists or has a credential.
    await module_cluster.put("ph-2", {"email": "ph2@example.cn"})
    assert await verify(module_cluster, "ph-2", "") is False
    assert await verify(module_cluster, "no-such-user", "") is False


async def test_an_old_scrypt_hash_still_verifies_and_is_rehashed_to_argon2id(
    idle_cluster: Cluster, tmp_path: Path
):
    # A record the previous version wrote, through the vault with the primary's own keys.
    c = load_config(idle_cluster.dep.configs[PRIMARY])
    c.data_dir.mkdir(parents=True, exist_ok=True)
    schema = load_schema(c.schema)
    store = SqliteStore(c.data_dir / "node.db", keyring=c.data_dir / "keys.db")
    try:
        keyring = Keyring(c.region, open_provider(c.keys), c.keys_dir)
        records = Records(c.region, True, schema, load_rules(c.rules, schema), keyring, store, False)
        body = records_pb2.Record(fields={"password": common_pb2.Value(bytes_value=legacy_scrypt("hunter2"))})
        writes = [Write("lg-1", "registration", body.SerializeToString())]
        records.prepare_keys(writes)  # the new user's key commits first, as the node's write does
        with store.transaction():
            records.put(writes)
    finally:
        store.close()
    await idle_cluster.start(PRIMARY)

    assert await verify(idle_cluster, "lg-1", "hunter3") is False
    assert stored_password(idle_cluster, tmp_path, "lg-1") == legacy_scrypt(
        "hunter2"
    )  # a miss changes nothing
    assert await verify(idle_cluster, "lg-1", "hunter2") is True
    assert stored_password(idle_cluster, tmp_path, "lg-1").startswith(b"$argon2id$")
    assert (await idle_cluster.get("lg-1")).record.version == 2
    assert await verify(idle_cluster, "lg-1", "hunter2") is True
    assert await verify(idle_cluster, "lg-1", "hunter3") is False
    assert (await idle_cluster.get("lg-1")).record.version == 2  # rehashed once


async def test_a_password_matches_however_its_characters_are_composed_or_spaced(
    module_cluster: Cluster, tmp_path: Path
):
    """RFC 8265's OpaqueString: the same characters composed otherwise (e + U+0301 against
    U+00E9) or another space character (U+00A0, U+3000) are the same password."""
    decomposed = "cafe\u0301\u00a0au\u3000lait"
    await module_cluster.put("nf-1", {"email": "nf@example.cn", "password": decomposed})
    assert await verify(module_cluster, "nf-1", "caf\u00e9 au lait") is True
    assert await verify(module_cluster, "nf-1", decomposed) is True
    assert await verify(module_cluster, "nf-1", "cafe au lait") is False  # not accent-blind
    assert await verify(module_cluster, "nf-1", "Caf\u00e9 au lait") is False  # nor case-blind
    stored = stored_password(module_cluster, tmp_path, "nf-1")
    assert verify_credential("caf\u00e9 au lait", stored) == Verdict(True)
    # The field's max_bytes (256) bounds the prepared form: at the limit composed, over it
    # as sent decomposed, still the same password, on a write and on a verify.
    composed, decomposed = "\u00e9" * 128, "e\u0301" * 128
    assert len(composed.encode()) == 256 and len(decomposed.encode()) == 384
    await module_cluster.put("nf-2", {"email": "nf2@example.cn", "password": decomposed})
    assert await verify(module_cluster, "nf-2", composed) is True
    assert await verify(module_cluster, "nf-2", decomposed) is True
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await verify(module_cluster, "nf-2", composed + "e")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 256" in e.value.details()


def test_a_hash_made_of_the_secret_as_sent_still_verifies_and_is_rehashed():
    """Hashes stored before secrets were prepared were made of the secret as it was sent: it
    still matches (asking for a rehash), the prepared form of it does not until then, and a
    secret that preparing changes costs two verifies whether or not it matches."""
    decomposed = "cafe\u0301"
    old = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1).hash(decomposed).encode()
    assert verify_credential(decomposed, old) == Verdict(True, rehash=True)
    assert verify_credential("caf\u00e9", old) == Verdict(False)
    assert verify_credential("cafe", old) == Verdict(False)
    assert prepared(decomposed) == "caf\u00e9" and prepared("a\u2003b") == "a b"
    # A code point this Python's Unicode does not assign (U+0378): the secret is kept as sent, so
    # that a later Unicode assigning it cannot change what was hashed.
    unassigned = "cafe\u0301\u0378"
    assert prepared(unassigned) == unassigned
    new = hash_credential(decomposed)
    assert verify_credential("caf\u00e9", new) == verify_credential(decomposed, new) == Verdict(True)


def exhausted(e: grpc.aio.AioRpcError) -> float:
    """The retry delay a RESOURCE_EXHAUSTED refusal carries, in seconds."""
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    status = rpc_status.from_call(e)
    assert status is not None
    (detail,) = status.details
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info)
    return info.retry_delay.ToTimedelta().total_seconds()


async def test_verify_is_rate_limited_per_user_and_per_caller(idle_cluster: Cluster):
    limits(idle_cluster, per_user=3, per_caller=5)
    await idle_cluster.start(PRIMARY)
    for u in ("rl-1", "rl-2"):
        await idle_cluster.put(u, {"email": f"{u}@example.cn", "password": "secret"})

    # A guesser that holds several service certificates still hits the user's limit.
    for caller in ("svc-a", "svc-b", "svc-c"):
        assert await verify(idle_cluster, "rl-1", "guess", caller) is False
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await verify(idle_cluster, "rl-1", "secret", "svc-d")
    assert 0 < exhausted(e.value) <= 20 and "about this user" in e.value.details()
    assert await verify(idle_cluster, "rl-2", "secret", "svc-d") is True  # other users are not held up

    # A guesser that changes which user it asks about still hits its own limit.
    for user in ("rl-2", "nobody-1", "nobody-2", "nobody-3", "nobody-5"):
        assert await verify(idle_cluster, user, "guess", "svc-e") is False
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await verify(idle_cluster, "nobody-4", "guess", "svc-e")
    assert 0 < exhausted(e.value) <= 12 and "by this caller" in e.value.details()
    assert await verify(idle_cluster, "nobody-4", "guess", "svc-f") is False  # other callers are not
    # The buckets are kept in the store (shared by front ends, see test_front_ends), and a
    # user's goes with the user's erasure.
    held = "SELECT bucket FROM credential_limits WHERE bucket LIKE 'user:rl-%' ORDER BY bucket"
    assert idle_cluster.query(PRIMARY, held) == [("user:rl-1",), ("user:rl-2",)]
    await idle_cluster.delete("rl-1")
    assert idle_cluster.query(PRIMARY, held) == [("user:rl-2",)]


async def test_users_without_a_credential_take_as_long_to_verify_as_users_with_one(idle_cluster: Cluster):
    limits(idle_cluster, per_user=10_000, per_caller=10_000)
    await idle_cluster.start(PRIMARY)
    await idle_cluster.put("tm-1", {"email": "tm1@example.cn", "password": "correct horse"})
    await idle_cluster.put("tm-2", {"email": "tm2@example.cn"})
    asks = {"known, wrong secret": "tm-1", "no credential": "tm-2", "unknown user": "tm-404"}
    times: dict[str, list[float]] = {k: [] for k in asks}
    for _ in range(3):  # warm up: connections, caches, the dummy hash
        for user in asks.values():
            await verify(idle_cluster, user, "battery staple")
    for _ in range(20):  # interleaved, so that the machine's load falls on all alike
        for kind, user in asks.items():
            start = time.perf_counter()
            assert await verify(idle_cluster, user, "battery staple") is False
            times[kind].append(time.perf_counter() - start)
    known = statistics.median(times["known, wrong secret"])
    for kind in ("no credential", "unknown user"):
        ratio = statistics.median(times[kind]) / known
        assert 0.5 <= ratio <= 2.0, (kind, ratio, {k: statistics.median(v) for k, v in times.items()})


def test_a_limit_under_one_a_minute_still_lets_a_call_through_now_and_then():
    admit = counting(VerifyLimits.per_minute(0.5, 600))
    assert admit("u-1", "svc", 0.0) is None
    refused = admit("u-1", "svc", 1.0)
    assert refused is not None and refused[0] == "user" and refused[1] == pytest.approx(119.0)
    assert admit("u-1", "svc", 121.0) is None


def test_a_secret_is_bounded_as_it_is_hashed_when_stored_and_either_way_when_verified():
    """What a write stores is the prepared form's hash, so that is what max_bytes bounds; a
    verify is refused only over the limit both as sent and as prepared (hashes stored before
    secrets were prepared were bounded as sent)."""
    password = FieldSpec("password", "user.authorization.password", "string", max_bytes=6)
    grows, shrinks = "\u0958" * 2, "\u1fbe\u0308\u0301" * 2  # 6 -> 12 bytes; 14 -> 4 bytes
    assert len(prepared(grows).encode()) == 12 and prepared(shrinks) == "\u0390" * 2
    assert _check_value(password, grows) == ("12 bytes; the limit is 6", 12)
    assert _check_value(password, shrinks) == ("", 4)
    assert _check_value(password, "x" * 25) == ("25 bytes; the limit is 6", 25)  # not prepared
    assert oversize(grows, 6) == 0  # as sent it fits: a hash stored before may be of it
    assert oversize(shrinks, 6) == 0 and oversize("\u0915\u093c" * 2, 6) == 12
    assert oversize("\u00e9" * 4, 6) == 8 and oversize("e\u0301" * 3, 6) == 0


def test_a_refusal_costs_the_store_no_write_and_is_remembered_until_it_would_not_be(tmp_path: Path):
    store = SqliteStore(tmp_path / "node.db")
    try:
        buckets = VerifyBuckets(VerifyLimits.per_minute(1, 600), store)
        with store.transaction():
            assert buckets.take("u-1", "svc") is None
        kept = store.limits_held(["user:u-1", "caller:svc"])
        refused = buckets.check("u-1", "svc")  # a read: what a second call would get
        assert refused is not None and refused[0] == "user" and 59 < refused[1] <= 60
        with store.transaction():
            again = buckets.take("u-1", "svc")  # in a write: refused too
        assert again is not None and again[0] == "user"
        assert store.limits_held(["user:u-1", "caller:svc"]) == kept  # nothing taken, nothing written
        # Remembered by this front end: refused again without asking the store.
        remembered = buckets.refused("u-1", "svc")
        assert remembered is not None and remembered[0] == "user" and 58 < remembered[1] <= 60
        assert buckets.refused("u-2", "svc") is None
        # Each bucket is deleted once full again: the caller's (600 a minute) 0.1 s after its
        # token was taken, the user's (1 a minute) a minute after.
        at = kept["caller:svc"][1]
        with store.transaction():
            assert store.limits_sweep(at + 1) == 1
        assert list(store.limits_held(["user:u-1", "caller:svc"])) == ["user:u-1"]
        with store.transaction():
            assert store.limits_sweep(at + 61) == 1
        assert store.limits_held(["user:u-1"]) == {}
    finally:
        store.close()


def test_many_users_at_once_do_not_make_every_call_sweep_the_buckets():
    buckets = TokenBuckets(10.0)
    for i in range(30_000):  # all at one moment: none is full again, none can be forgotten
        buckets.take(f"u-{i}", 0.0)
    # Sweeps happened at 10,001 and 20,003 buckets, not on each of the 20,000 calls after.
    assert buckets._sweep_at > 30_000 and len(buckets._buckets) == 30_000
    # Once full again, they are forgotten at the next sweep.
    for i in range(30_000, 40_007):
        buckets.take(f"u-{i}", 3600.0)
    assert len(buckets._buckets) < 10_100
