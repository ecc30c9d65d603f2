"""Building a sealed copy (pure): with no store, no key service and no server, a copy holds
exactly what the rules allow its region, opens with that region's key alone, and says so in
its log entry."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from residency.replicator.copies import CopyKeys, build_copy, erased_copy
from residency.replicator.destinations import Destination
from residency.replicator.loop import Replicator
from residency.server.config.node import ReplicatorConfig
from residency.server.config.rules import load_rules
from residency.server.config.schema import load_schema
from residency.server.core import codec
from residency.server.core.rules import NO_PERMITS, Permits, RuleSet
from residency.server.core.sealing import SealError, field_aad
from residency.server.deployment import EXAMPLE_RULES, EXAMPLE_SCHEMA, PRIMARY
from residency.server.keys.cache import KeyCache
from residency.server.keys.copykey import CopySigner
from residency.server.keys.region import RegionKey
from residency.server.storage.records import Row
from residency.server.vault.records import Opened, Records
from residency.v1 import common_pb2, replica_pb2

SG, IE = "ap-southeast-1", "eu-west-1"
# The loop asks a destination's sink only whether each copy is signed (these tests ship nothing).
NO_SINK = SimpleNamespace(signs_each_copy=False)
NOW = 1_790_000_000.0
RECORD = {
    "name": "Li Wei",
    "email": "li.wei@example.cn",
    "address": "1 Changan Avenue, Beijing",
    "national_id": "11010519491231002X",
    "password": "scrypt$...",
    "language": "zh-CN",
    "cookie_id": "ck-0001",
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    d: Path = tmp_path_factory.mktemp("rules")
    (d / "schema.yaml").write_text(EXAMPLE_SCHEMA)
    (d / "rules.yaml").write_text(EXAMPLE_RULES)
    return load_rules(d / "rules.yaml", load_schema(d / "schema.yaml"))


@pytest.fixture
def home(rules: RuleSet) -> Records:
    # The home's records engine without a store or keyring: building a copy touches neither.
    return Records(PRIMARY, True, rules.schema, rules, keyring=None, store=None)  # type: ignore[arg-type]


def region_key(region: str) -> RegionKey:
    return RegionKey(region, X25519PrivateKey.generate().private_bytes_raw())


def opened(user_id: str = "u-1", version: int = 3, updated_at: float = NOW, **fields: object) -> Opened:
    values = {n: codec.to_value(v) for n, v in (fields or RECORD).items()}  # type: ignore[arg-type]
    return Opened(user_id, version, "registration", PRIMARY, NOW - 86400, updated_at, values)


def open_copy(copy: replica_pb2.SealedCopy, key: RegionKey) -> dict[str, object]:
    """As the region node does: the region's own key and the copy, nothing else."""
    dek = key.open_data_key(
        copy.user_id, copy.key_id, copy.wrapped_data_key, copy.transit_key_id, copy.wrapped_transit_key
    )
    aad = {
        n: field_aad(copy.user_id, n, key.region, copy.version, copy.key_id, format=copy.format)
        for n in copy.sealed_fields
    }
    return {
        n: codec.from_value(common_pb2.Value.FromString(dek.open(s, aad[n])))
        for n, s in copy.sealed_fields.items()
    }


def test_a_copy_holds_only_what_the_rules_allow_and_opens_with_the_region_key_alone(home: Records):
    key = region_key(SG)
    copy, entry = build_copy(home, CopyKeys(key.recipient, KeyCache()), opened(), NO_PERMITS, NOW)
    assert not copy.deleted and copy.home_region == PRIMARY and copy.rules_version == home.rules.version
    assert open_copy(copy, key) == {n: RECORD[n] for n in ("name", "email", "language")}
    assert dict(copy.categories) == {
        "name": "user.name",
        "email": "user.contact.email",
        "language": "user.demographic.language",
    }
    assert entry["kind"] == "replication" and entry["outcome"] == "allowed"
    assert (entry["subject"], entry["destination_region"], entry["record_version"]) == ("u-1", SG, 3)
    assert entry["recipient"] == "sg-affiliate"
    assert [(f["name"], f["rule"]) for f in entry["fields"]] == [
        ("email", "sg-service"),
        ("language", "sg-service"),
        ("name", "sg-service"),
    ]
    assert {w["name"]: w["reason"] for w in entry["withheld"]} == {
        "address": "excluded",
        "national_id": "never_transfer",
        "password": "credential",
        "cookie_id": "cookie_consent_missing",
    }
    # No field value reaches the log entry.
    assert not any(str(v) in repr(entry) for v in RECORD.values())


def test_a_copy_opens_in_no_other_region_and_for_no_other_field_or_version(home: Records):
    key, other = region_key(SG), region_key(SG)
    copy, _ = build_copy(home, CopyKeys(key.recipient, KeyCache()), opened(), NO_PERMITS, NOW)
    with pytest.raises(SealError):  # the primary, or anyone else, holds no key that opens it
        open_copy(copy, other)
    dek = key.open_data_key(
        copy.user_id, copy.key_id, copy.wrapped_data_key, copy.transit_key_id, copy.wrapped_transit_key
    )
    sealed = copy.sealed_fields["email"]
    for moved in (("u-2", "email", SG, 3), ("u-1", "name", SG, 3), ("u-1", "email", SG, 2)):
        with pytest.raises(SealError):
            dek.open(sealed, field_aad(*moved, copy.key_id, format=copy.format))


def test_consent_and_cookies_widen_a_copy_only_as_far_as_the_rules_say(home: Records):
    key = region_key(IE)
    keys = CopyKeys(key.recipient, KeyCache())
    without, _ = build_copy(home, keys, opened(), NO_PERMITS, NOW)
    assert set(open_copy(without, key)) == {"email", "language"}
    consented = Permits(consented_rules=frozenset({"ie-marketing"}), cookies=True)
    copy, entry = build_copy(home, keys, opened(), consented, NOW)
    assert set(open_copy(copy, key)) == {"name", "email", "language"}
    assert {f["name"]: f["legal_basis"] for f in entry["fields"]}["name"] == "consent"


def test_fields_past_their_retention_are_withheld_and_none_left_withdraws_the_copy(home: Records):
    key = region_key(SG)
    keys = CopyKeys(key.recipient, KeyCache())
    old = opened(updated_at=NOW - 366 * 86400)
    copy, entry = build_copy(home, keys, old, NO_PERMITS, NOW)
    assert copy.deleted and copy.reason == "withdrawn" and not copy.sealed_fields
    assert entry["kind"] == "erasure" and entry["reason"].startswith("withdrawn: no field")
    assert {w["name"]: w["reason"] for w in entry["withheld"]}["name"] == "retention_expired"
    assert not keys.cache.get("u-1")  # nothing was sealed, so no data key was made


def test_an_erased_record_becomes_a_tombstone_and_its_data_key_is_forgotten(home: Records):
    keys = CopyKeys(region_key(SG).recipient, KeyCache())
    before, _ = build_copy(home, keys, opened(), NO_PERMITS, NOW)
    tomb, entry = erased_copy(home, keys, "u-1", 4)
    assert (tomb.user_id, tomb.version, tomb.deleted, tomb.reason) == ("u-1", 4, True, "erasure")
    assert entry["kind"] == "erasure" and entry["reason"] == "the user's record was erased"
    again, _ = build_copy(home, keys, opened(version=5), NO_PERMITS, NOW)
    assert again.wrapped_data_key != before.wrapped_data_key


def test_one_data_key_per_user_and_one_transit_key_for_many_users(home: Records):
    keys = CopyKeys(region_key(SG).recipient, KeyCache())
    a3, _ = build_copy(home, keys, opened("u-a", 3), NO_PERMITS, NOW)
    a4, _ = build_copy(home, keys, opened("u-a", 4), NO_PERMITS, NOW)
    b, _ = build_copy(home, keys, opened("u-b", 1), NO_PERMITS, NOW)
    assert a3.wrapped_data_key == a4.wrapped_data_key != b.wrapped_data_key
    assert a3.transit_key_id == b.transit_key_id and a3.wrapped_transit_key == b.wrapped_transit_key
    # A transit key older than the cache's age is replaced (one HPKE operation per period).
    stale = CopyKeys(keys.recipient, KeyCache(max_age=0.0))
    first, _ = build_copy(home, stale, opened("u-a"), NO_PERMITS, NOW)
    time.sleep(0.001)
    second, _ = build_copy(home, stale, opened("u-b"), NO_PERMITS, NOW)
    assert first.transit_key_id != second.transit_key_id


def test_an_erasure_drops_the_users_plaintext_from_the_workers_memory(home: Records):
    """The worker keeps opened records for the other destinations' batches; an erased user's
    fields leave that memory when the tombstone is built, a shred empties it."""
    key = region_key(SG)
    signer = CopySigner(PRIMARY, Ed25519PrivateKey.generate())
    dest = Destination(SG, CopyKeys(key.recipient, KeyCache()), sink=NO_SINK, signer=signer)  # type: ignore[arg-type]
    worker = Replicator(home, db=None, destinations=[dest], config=ReplicatorConfig())  # type: ignore[arg-type]
    for user in ("gone", "kept"):
        worker.batches._opened[(user, 3)] = opened(user_id=user)
    copy, _ = worker.batches.copy_for(dest, Row("gone", 4, True, b"", NOW), NO_PERMITS)
    assert copy.deleted and set(worker.batches._opened) == {("kept", 3)}
    worker.forget()
    assert not worker.batches._opened


def test_a_withdrawal_drops_the_users_plaintext_from_the_workers_memory(home: Records):
    """A copy withdrawn from a destination (nothing of the record may be there now) is a
    tombstone; the user's opened fields leave the worker's memory with it."""
    key = region_key(SG)
    signer = CopySigner(PRIMARY, Ed25519PrivateKey.generate())
    dest = Destination(SG, CopyKeys(key.recipient, KeyCache()), sink=NO_SINK, signer=signer)  # type: ignore[arg-type]
    worker = Replicator(home, db=None, destinations=[dest], config=ReplicatorConfig())  # type: ignore[arg-type]
    # Only a field that never leaves the home region: nothing of it may be in SG.
    worker.batches._opened[("withdrawn", 5)] = opened("withdrawn", 5, national_id="11010519491231002X")
    worker.batches._opened[("kept", 3)] = opened(user_id="kept")
    copy, _ = worker.batches.copy_for(dest, Row("withdrawn", 5, False, b"", NOW), NO_PERMITS)
    assert copy.deleted and copy.reason == "withdrawn"
    assert set(worker.batches._opened) == {("kept", 3)}


def test_a_batch_begun_before_a_forget_keeps_none_of_what_it_opens(home: Records, monkeypatch):
    """A shred or a stop forgets every opened record from the event loop while the store thread
    may be making a batch (one is prepared while the previous ships): what that batch opens
    after the forget serves its copies and is not kept."""
    key = region_key(SG)
    signer = CopySigner(PRIMARY, Ed25519PrivateKey.generate())
    dest = Destination(SG, CopyKeys(key.recipient, KeyCache()), sink=NO_SINK, signer=signer)  # type: ignore[arg-type]
    worker = Replicator(home, db=None, destinations=[dest], config=ReplicatorConfig())  # type: ignore[arg-type]
    monkeypatch.setattr(home, "open_row", lambda row: opened(row.user_id, row.version))
    batches = worker.batches
    batches.copy_for(dest, Row("before", 3, False, b"", NOW), NO_PERMITS)
    assert set(batches._opened) == {("before", 3)}
    batches._generation_read = batches._generation  # a batch begins, as `of_outbox` does
    worker.forget()  # meanwhile, on the event loop
    copy, _ = batches.copy_for(dest, Row("during", 3, False, b"", NOW), NO_PERMITS)
    assert not copy.deleted and copy.user_id == "during"
    assert not batches._opened
