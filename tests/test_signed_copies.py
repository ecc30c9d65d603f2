"""Copies signed by the home region (issue 14.3): what the signature covers and how any
language recomputes it (vectors), the length-prefixed associated data of format 2 beside the
old one, and real region nodes over mutual TLS refusing every copy their home did not sign
for them, even from the primary's own node identity, with nothing applied and the refusal
logged there and shown in the primary's replication status."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf.descriptor import FieldDescriptor

from residency.replicator.destinations import destinations_for
from residency.replicator.sinks.manifest import open_object
from residency.server.config.node import load_config
from residency.server.core import codec
from residency.server.core.sealing import SealError, field_aad, field_aads
from residency.server.core.signed import copy_bytes, copy_digest, copy_hash, signed_bytes, verifies
from residency.server.deployment import PRIMARY, init_deployment
from residency.server.keys.copykey import CopySigner, load_copy_key
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.region import RecipientKey, RegionKey
from residency.server.vault.copies import Home, refusals
from residency.v1 import replica_pb2
from tests.conftest import Cluster, values
from tests.test_records import violations

SG, IE = "ap-southeast-1", "eu-west-1"
VECTORS = json.loads((Path(__file__).parent / "vectors" / "copy_format_v2.json").read_text())
PRIMARY_NODE = "spiffe://residency/node/cn-north/primary"


def signer() -> CopySigner:
    return CopySigner(PRIMARY, Ed25519PrivateKey.generate())


def a_copy(**fields: Any) -> replica_pb2.SealedCopy:
    base: dict[str, Any] = {
        "user_id": "u-1",
        "version": 3,
        "key_id": "0123456789abcdef",
        "sealed_fields": {"email": b"\x01" * 28},
        "categories": {"email": "user.contact.email"},
        "home_region": PRIMARY,
        "format": 2,
    }
    return replica_pb2.SealedCopy(**{**base, **fields})


# ---- what is signed ------------------------------------------------------------------


def _changed(copy: replica_pb2.SealedCopy, fd: FieldDescriptor) -> replica_pb2.SealedCopy:
    """`copy` with field `fd` given another value, whatever its type."""
    out = clone(copy)
    value = getattr(out, fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        entry = fd.message_type.fields_by_name["value"]
        if entry.type == fd.TYPE_MESSAGE:  # a map of messages (policies): an entry added
            value["zz-added"].SetInParent()
        else:
            value["zz-added"] = b"x" if entry.type == fd.TYPE_BYTES else "x"
    elif fd.type == fd.TYPE_MESSAGE:
        value.seconds += 1
    elif fd.type == fd.TYPE_STRING:
        setattr(out, fd.name, value + "x")
    elif fd.type == fd.TYPE_BYTES:
        setattr(out, fd.name, value + b"x")
    elif fd.type == fd.TYPE_BOOL:
        setattr(out, fd.name, not value)
    else:
        setattr(out, fd.name, value + 1)
    return out


def test_the_signature_covers_every_field_of_the_copy_including_fields_added_later():
    """Walks the message's own schema: a field added to SealedCopy later is covered the day it
    is added, with no change to the signing code."""
    s = signer()
    copy = s.sign_copy(a_copy(created_at=codec.timestamp(1_790_000_000.0)), SG)
    assert verifies(s.public_raw, copy)
    fields = [fd for fd in replica_pb2.SealedCopy.DESCRIPTOR.fields if fd.name != "signature"]
    assert len(fields) >= 18
    for fd in fields:
        assert not verifies(s.public_raw, _changed(copy, fd)), fd.name
    assert not verifies(signer().public_raw, copy)  # another key


def test_signed_bytes_do_not_depend_on_map_order_and_unknown_fields_are_refused():
    one = a_copy(sealed_fields={"a": b"1", "b": b"2"}, categories={"a": "x", "b": "y"})
    two = a_copy()
    two.sealed_fields.clear()
    two.categories.clear()
    two.sealed_fields["b"], two.sealed_fields["a"] = b"2", b"1"
    two.categories["b"], two.categories["a"] = "y", "x"
    assert signed_bytes(one) == signed_bytes(two)
    s = signer()
    copy = s.sign_copy(a_copy(), SG)
    # A field this node's schema lacks (number 1000, varint 1) cannot be checked: refused.
    grown = replica_pb2.SealedCopy.FromString(copy.SerializeToString() + b"\xc0\x3e\x01")
    assert grown.signature == copy.signature and not verifies(s.public_raw, grown)


def test_every_field_of_a_policy_is_covered_though_equal_policies_are_encoded_once():
    """Policies are encoded once per distinct value (most copies repeat them): a copy whose
    policy differs in any one field, or holds a field this node does not know, still fails."""
    s = signer()
    policy = replica_pb2.FieldPolicy(
        rule="r",
        purposes=["essential.service"],
        legal_basis="contract",
        recipient="ap",
        retention_days=365,
        form="mask:4",
    )
    policy.ends_at.seconds = 1_790_000_000
    copy = s.sign_copy(a_copy(policies={"email": policy}), SG)
    for _ in range(2):  # the second time from what was remembered
        assert verifies(s.public_raw, copy)
    for fd in replica_pb2.FieldPolicy.DESCRIPTOR.fields:
        changed = clone(copy)
        p = changed.policies["email"]
        if fd.type == fd.TYPE_MESSAGE:
            p.ends_at.seconds += 1
        elif fd.is_repeated:
            p.purposes.append("marketing")
        elif fd.type == fd.TYPE_STRING:
            setattr(p, fd.name, getattr(p, fd.name) + "x")
        elif fd.type == fd.TYPE_BOOL:
            setattr(p, fd.name, not getattr(p, fd.name))
        else:
            setattr(p, fd.name, getattr(p, fd.name) + 1)
        assert not verifies(s.public_raw, changed), fd.name
    # A policy holding a field number this node lacks (1000, varint 1), seen after the same
    # policy without it was remembered: refused.
    grown = clone(copy)
    grown.policies["email"].MergeFromString(b"\xc0\x3e\x01")
    assert not verifies(s.public_raw, grown)
    assert verifies(s.public_raw, copy)


def test_refused_copies_leave_nothing_large_in_memory():
    """A caller with a stolen node certificate (but not copy.key) sends large refused copies,
    signed by another key or unsigned under a forged mark: the encoding remembered for speed
    keeps none of them (memory held afterwards, 40 copies of 1 MiB: under 4 MiB)."""
    home, liar = signer(), signer()
    trusted = Home(PRIMARY, home.public_raw)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            big = a_copy(version=2)
            big.policies["email"].rule = f"{i:04d}" + "x" * (1 << 20)
            forged = _claiming(liar.high_water(SG, 2, 1, [home.stamp(clone(big), SG)]), home)
            assert refusals(trusted, SG, forged, [home.stamp(clone(big), SG)])
            assert refusals(trusted, SG, forged, [_claiming(liar.sign_copy(big, SG), home)])
            del big, forged
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 << 20, held


def test_vectors_any_implementation_can_check_against():
    v = VECTORS
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(v["public_key"]))
    for name, message in (("copy", replica_pb2.SealedCopy), ("high_water", replica_pb2.HighWater)):
        parsed = message.FromString(bytes.fromhex(v[name]["message"]))
        assert signed_bytes(parsed).hex() == v[name]["signed_bytes"], name
        public.verify(bytes.fromhex(v[name]["signature"]), bytes.fromhex(v[name]["signed_bytes"]))
        assert verifies(bytes.fromhex(v["public_key"]), parsed)
    # A copy vouched for by its batch's mark instead of a signature of its own.
    vouched = v["vouched"]
    copy = replica_pb2.SealedCopy.FromString(bytes.fromhex(vouched["copy"]["message"]))
    mark = replica_pb2.HighWater.FromString(bytes.fromhex(vouched["high_water"]["message"]))
    assert signed_bytes(copy).hex() == vouched["copy"]["signed_bytes"] and not copy.signature
    assert hashlib.sha256(signed_bytes(copy)).hexdigest() == vouched["copy"]["copy_digest"]
    assert signed_bytes(mark).hex() == vouched["high_water"]["signed_bytes"]
    public.verify(bytes.fromhex(vouched["high_water"]["signature"]), signed_bytes(mark))
    assert [d.hex() for d in mark.copy_digests] == [vouched["copy"]["copy_digest"]]
    assert refusals(Home(PRIMARY, bytes.fromhex(v["public_key"])), copy.region, mark, [copy]) == []
    # The same copy as a home sends it now: its mark lists the hash of its bytes as sent.
    by_hash = v["vouched_by_hash"]
    sent = bytes.fromhex(by_hash["copy"]["message"])
    mark = replica_pb2.HighWater.FromString(bytes.fromhex(by_hash["high_water"]["message"]))
    assert hashlib.sha256(sent).hexdigest() == by_hash["copy"]["copy_hash"]
    assert [h.hex() for h in mark.copy_hashes] == [by_hash["copy"]["copy_hash"]] and not mark.copy_digests
    assert signed_bytes(mark).hex() == by_hash["high_water"]["signed_bytes"]
    public.verify(bytes.fromhex(by_hash["high_water"]["signature"]), signed_bytes(mark))
    copy = replica_pb2.SealedCopy.FromString(sent)
    assert refusals(Home(PRIMARY, bytes.fromhex(v["public_key"])), copy.region, mark, [copy], [sent]) == []
    # Without the bytes it was sent as, nothing vouches for it.
    assert refusals(Home(PRIMARY, bytes.fromhex(v["public_key"])), copy.region, mark, [copy])


# ---- the associated data of format 2 -------------------------------------------------


def test_length_prefixed_associated_data_cannot_be_confused_across_component_boundaries():
    """User "a\\0b" field "c" and user "a" field "b\\0c" were one associated data when joined
    with NUL bytes (ids cannot hold NUL today; the format should not depend on it)."""
    one, two = VECTORS["field_aad"]
    for n in (1, 2):
        for vec in (one, two):
            parts = (vec["user_id"], vec["field"], vec["region"], vec["version"], vec["key_id"])
            assert field_aad(*parts, format=n).hex() == vec[f"format_{n}"]
            user, field, region, version, kid = parts  # one copy's fields share all but the name
            assert field_aads(user, region, version, kid, format=n)(field).hex() == vec[f"format_{n}"]
    assert one["format_1"] == two["format_1"]
    assert one["format_2"] != two["format_2"]
    with pytest.raises(SealError, match="format 3 is unknown"):
        field_aad("u-1", "email", SG, 3, "k1", format=3)


def test_a_copy_of_the_old_format_still_opens():
    key = RegionKey(SG, X25519PrivateKey.generate().private_bytes_raw())
    tk = key.recipient.new_transit_key()
    dek, wrapped = tk.new_data_key("u-1")
    value = codec.to_value("li@example.cn")
    old_aad = b"\0".join((b"field", b"u-1", b"email", SG.encode(), b"3", key.key_id.encode()))
    old = replica_pb2.SealedCopy(  # format 0: written before signing, NUL-joined AD
        user_id="u-1",
        version=3,
        key_id=key.key_id,
        wrapped_data_key=wrapped,
        transit_key_id=tk.id,
        wrapped_transit_key=tk.wrapped,
        sealed_fields={"email": dek.seal(value.SerializeToString(), old_aad)},
    )
    with pytest.raises(SealError, match="not a copy the home signed"):  # unless told it predates signing
        open_object(old.SerializeToString(), key, signer().public_raw)
    copy, fields = open_object(old.SerializeToString(), key, signer().public_raw, unsigned_ok=True)
    assert copy.format == 0 and codec.from_value(fields["email"]) == "li@example.cn"
    # The same bytes claimed as format 2 do not open: a format-2 object must be signed.
    old.format = 2
    with pytest.raises(SealError):
        open_object(old.SerializeToString(), key, signer().public_raw, unsigned_ok=True)


async def test_a_region_nodes_batch_is_signed_once_and_a_bucket_object_each_on_its_own(tmp_path: Path):
    """The replicator's destinations as `residency init` configures them, plus a bucket: a
    region node's copies go unsigned, vouched for by the batch's one signed mark; each bucket
    object carries its own signature, since an affiliate reads it alone."""
    init_deployment(tmp_path)
    folder = tmp_path / "keys" / "us-east-1"
    provider = LocalProvider.create(folder, b"passphrase")
    RegionKey.generate("us-east-1", folder, provider)
    provider.close()
    path = tmp_path / f"{PRIMARY}.yaml"
    config = yaml.safe_load(path.read_text())
    config["affiliates"].append(
        {
            "region": "us-east-1",
            "sink": "s3",
            "bucket": "copies",
            "endpoint_url": "http://127.0.0.1:9",
            "public_key": "keys/us-east-1/region.pub",
        }
    )
    path.write_text(yaml.safe_dump(config))
    destinations = {d.region: d for d in destinations_for(load_config(path))}
    home = Home(PRIMARY, load_copy_key(PRIMARY, tmp_path / "keys" / PRIMARY / "copy.key").public_raw)
    try:
        for region in (SG, IE):
            d = destinations[region]
            copies = [d.finish(a_copy(user_id=f"u-{i}", version=i)) for i in (1, 2, 3)]
            mark = d.mark(3, 1, copies)
            assert not any(c.signature for c in copies)
            assert len(mark.copy_hashes) == 3 and verifies(home.public_raw, mark)
            sent = [copy_bytes(c) for c in copies]
            assert [copy_hash(b) for b in sent] == list(mark.copy_hashes)
            assert refusals(home, region, mark, copies, sent) == []
            # the third is not vouched for
            assert refusals(home, region, d.mark(3, 1, copies[:2]), copies, sent)
        bucket = destinations["us-east-1"]
        copy = bucket.finish(a_copy())
        assert verifies(home.public_raw, copy) and not bucket.mark(3, 1, [copy]).copy_hashes
    finally:
        for d in destinations.values():
            await d.sink.close()


# ---- real region nodes ----------------------------------------------------------------


async def refused(
    cluster: Cluster, copies: list[replica_pb2.SealedCopy | bytes], mark: replica_pb2.HighWater | None
) -> dict[str, str]:
    """Sends a batch to ap-southeast-1 as the primary's own node would (each copy as its
    `copy_bytes`, or as the bytes given); returns the violations."""
    sent = [c if isinstance(c, bytes) else copy_bytes(c) for c in copies]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.apply_copies(SG, sent, mark)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    return violations(e.value)


def resigned(home: CopySigner, mark: replica_pb2.HighWater) -> replica_pb2.HighWater:
    """`mark`, changed, signed again with the home's key (what only the home can make)."""
    mark.signature = home._private.sign(signed_bytes(mark))
    return mark


def hashing(home: CopySigner, epoch: int, *sent: bytes) -> replica_pb2.HighWater:
    """The home's genuine mark for ap-southeast-1, listing the hashes of the bytes `sent`."""
    mark = home.high_water(SG, 2, epoch)
    mark.copy_hashes.extend(copy_hash(b) for b in sent)
    return resigned(home, mark)


async def test_forged_unsigned_replayed_and_2_62_copies_are_refused_from_the_primarys_own_node(
    cluster: Cluster,
):
    c = cluster
    await c.put("u-1", {"email": "first@example.cn", "name": "Li"})
    await c.put("u-1", {"email": "second@example.cn"})
    await c.replicated()
    before = (await c.get("u-1", region=SG)).record
    assert before.version == 2
    counts = await c.status(SG)
    # The home's real key, as a captured genuine copy would carry its signature (and a
    # captured mark, the current lease epoch: an older one is refused before all else).
    home = load_copy_key(PRIMARY, c.dir / "keys" / PRIMARY / "copy.key")
    mark = home.high_water(SG, 2, c.lease_epoch(SG))
    liar = signer()
    region_key = RecipientKey.load(SG, c.dir / "keys" / SG / "region.pub").key_id

    def honest(copy: replica_pb2.SealedCopy, region: str = SG) -> replica_pb2.SealedCopy:
        return home.sign_copy(clone(copy), region)

    forged = honest(a_copy(version=2))
    forged.sealed_fields["national_id"] = b"\x00" * 40  # a never-transfer field, added after signing
    forged.categories["national_id"] = "user.government_id.national_identification_number"
    tomb = replica_pb2.SealedCopy(user_id="u-1", version=2**62, deleted=True, reason="erasure", format=2)
    # Copies the batch's mark vouches for (one signature a batch, as the replicator sends them).
    epoch = c.lease_epoch(SG)
    stamped = home.stamp(a_copy(version=2), SG)
    vouching = home.high_water(SG, 2, epoch, [stamped])
    changed = clone(stamped)
    changed.sealed_fields["national_id"] = b"\x00" * 40
    for_ie = home.stamp(a_copy(version=2), IE)
    # Bytes the home hashed that hold a field this node does not know (a newer home's), and
    # bytes re-encoded after the mark (the same copy, a field written twice).
    unknown = copy_bytes(stamped) + b"\xf8\x06\x01"  # field 111, varint 1
    doubled = copy_bytes(stamped) + copy_bytes(replica_pb2.SealedCopy(version=2))
    # ... and such a field hidden by a map entry sent short (no key, no value: read as
    # defaults, it encodes 4 bytes longer, as long as the unknown field it hides).
    policy = b"\x0a\x02r2" + b"\x90\x03\xac\x02"  # FieldPolicy{rule: "r2", field 50: 300}
    entry = b"\x0a\x05phone\x12" + bytes([len(policy)]) + policy
    hidden = copy_bytes(stamped) + b"\x8a\x01" + bytes([len(entry)]) + entry + b"\x32\x00"
    short = home.high_water(SG, 2, epoch)
    short.copy_hashes.append(b"\x00" * 31)
    short = resigned(home, short)
    # An older home's mark: canonical digests (`copy_digests`), the liar's copy listed by hash.
    older = home.high_water(SG, 2, epoch)
    older.copy_digests.append(copy_digest(stamped))
    older = resigned(home, older)
    cases = {
        "forged": ([forged], mark, "copies[0].signature", "does not verify"),
        "unsigned 2^62": ([tomb], mark, "copies[0].signature", "is missing"),
        "signed 2^62 above the mark": ([honest(tomb)], mark, "copies[0].version", "above the home's signed"),
        "2^62 under the liar's own mark": (
            [liar.sign_copy(clone(tomb), SG)],
            liar.high_water(SG, 2**62),
            "high_water.signing_key_id",
            "this node trusts cn-north's",
        ),
        "liar claiming the home's key id": (
            [_claiming(liar.sign_copy(a_copy(version=3), SG), home)],
            mark,
            "copies[0].signature",
            "does not verify",
        ),
        # (sealed to the region's real key: a copy to a key it does not hold is refused first)
        "replayed older version": (
            [honest(a_copy(version=1, key_id=region_key))],
            mark,
            "copies[0].version",
            "older than",
        ),
        "made for eu-west-1": ([honest(a_copy(version=2), IE)], mark, "copies[0].region", f"not {SG}"),
        "no mark": ([honest(a_copy(version=2))], None, "high_water", "is required"),
        "unsigned, vouched for by no mark": ([stamped], None, "copies[0].signature", "does not vouch"),
        "changed after the mark vouched for it": (
            [changed],
            vouching,
            "copies[0].signature",
            "does not vouch",
        ),
        "vouched for by a mark of another batch": ([stamped], mark, "copies[0].signature", "does not vouch"),
        "vouched for by the liar's mark": (
            [stamped],
            liar.high_water(SG, 2, epoch, [stamped]),
            "copies[0].signature",
            "does not vouch",
        ),
        "the liar's mark claiming the home's key id": (
            [stamped],
            _claiming(liar.high_water(SG, 2, epoch, [stamped]), home),
            "high_water.signature",
            "does not verify",
        ),
        "vouched for, but made for eu-west-1": (
            [for_ie],
            home.high_water(SG, 2, epoch, [for_ie]),
            "copies[0].region",
            f"not {SG}",
        ),
        "vouched for by hash, holding a field this node does not know": (
            [unknown],
            hashing(home, epoch, unknown),
            "copies[0]",
            "does not know",
        ),
        "vouched for by hash, a field written twice": (
            [doubled],
            hashing(home, epoch, doubled),
            "copies[0]",
            "not encoded as this node encodes",
        ),
        "vouched for by hash, a field it does not know hidden by a short map entry": (
            [hidden],
            hashing(home, epoch, hidden),
            "copies[0]",
            "does not know",
        ),
        "a batch larger than any worker sends": (
            [
                copy_bytes(home.stamp(replica_pb2.SealedCopy(user_id=f"b-{i}", version=1, format=2), SG))
                for i in range(1001)
            ],
            mark,
            "copies",
            "at most 1000",
        ),
        "a mark listing more hashes than a batch holds": (
            [stamped],
            hashing(home, epoch, *[i.to_bytes(32, "big") for i in range(1001)]),
            "high_water.copy_hashes",
            "at most 1000",
        ),
        "a mark listing a hash of 31 bytes": (
            [stamped],
            short,
            "high_water.copy_hashes",
            "each 32 bytes",
        ),
        "listed by an older home's digest, but changed": (
            [changed],
            older,
            "copies[0].signature",
            "does not vouch",
        ),
        "not a copy": ([b"\xff\xff\xff"], mark, "copies[0]", "not a serialized residency.v1.SealedCopy"),
        "a grant's end out of range": (
            [a_copy(version=2, policies={"email": replica_pb2.FieldPolicy(ends_at={"seconds": 2**40})})],
            mark,
            "copies[0].policies[email].ends_at",
            "must be a time",
        ),
        "old format": ([a_copy(version=2, format=0)], mark, "copies[0].format", "format 2"),
        # One good copy (a new user's tombstone) beside a forged one: nothing of the batch applies.
        "good beside forged": (
            [honest(replica_pb2.SealedCopy(user_id="t-9", version=1, deleted=True, format=2)), forged],
            mark,
            "copies[1].signature",
            "does not verify",
        ),
    }
    for case, (copies, hw, path, why) in cases.items():
        got = await refused(c, copies, hw)
        assert why in got.get(path, ""), (case, got)
        assert not any("second@example.cn" in d or "u-1" in d for d in got.values()), case
    # Nothing changed in ap-southeast-1 ...
    after = (await c.get("u-1", region=SG)).record
    assert (after.version, values_of(after)) == (2, values_of(before))
    now = await c.status(SG)
    assert (now.records, now.tombstones) == (counts.records, counts.tombstones)
    # ... every refusal is a denied entry of its own log, naming the primary's node as actor.
    entries = [json.loads(e) for _, e, _ in await c.log(SG)]
    denied = [e for e in entries if e["kind"] == "replication" and e["outcome"] == "denied"]
    assert len(denied) >= len(cases) and {e["actor"] for e in denied} == {PRIMARY_NODE}
    assert any("does not verify" in e["reason"] and e["subject"] == "u-1" for e in denied)
    # The honest sender with the home's key is let through: the refusals were for the lies.
    good = honest(replica_pb2.SealedCopy(user_id="t-9", version=1, deleted=True, format=2))
    reply = await c.replica(SG).ApplyCopies(
        replica_pb2.ApplyCopiesRequest(source_region=PRIMARY, copies=[good], high_water=mark), timeout=10
    )
    assert (reply.applied, reply.skipped) == (1, 0)
    # So is a copy its batch's mark vouches for, alone or beside a signed one.
    vouched = home.stamp(replica_pb2.SealedCopy(user_id="t-8", version=1, deleted=True, format=2), SG)
    reply = await c.apply_copies(
        SG, [copy_bytes(vouched), copy_bytes(good)], home.high_water(SG, 2, epoch, [vouched])
    )
    assert (reply.applied, reply.skipped) == (1, 1)
    # ... and one an older home's mark lists by the digest of its canonical encoding.
    listed = home.stamp(replica_pb2.SealedCopy(user_id="t-7", version=1, deleted=True, format=2), SG)
    older = home.high_water(SG, 2, epoch)
    older.copy_digests.append(copy_digest(listed))
    reply = await c.replica(SG).ApplyCopies(
        replica_pb2.ApplyCopiesRequest(
            source_region=PRIMARY, copies=[listed], high_water=resigned(home, older)
        ),
        timeout=10,
    )
    assert (reply.applied, reply.skipped) == (1, 0)


def clone(m: replica_pb2.SealedCopy) -> replica_pb2.SealedCopy:
    out = replica_pb2.SealedCopy()
    out.CopyFrom(m)
    return out


def _claiming(m: Any, home: CopySigner) -> Any:
    """A copy or mark signed by another key, naming the home's."""
    m.signing_key_id = home.key_id
    return m


def values_of(record: Any) -> dict[str, Any]:
    return {n: codec.from_value(v) for n, v in record.fields.items()}


async def test_copies_a_region_cannot_verify_show_in_the_primarys_replication_status(idle_cluster: Cluster):
    """ap-southeast-1 is told to trust another key than its home's: every copy is refused,
    dead-lettered at the primary with the reason in status, and logged at the region."""
    c = idle_cluster
    path = c.dep.configs[SG]
    config = yaml.safe_load(path.read_text())
    config["home"]["signing_key"] = f"keys/{IE}/copy.pub"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    await c.start()
    await c.put("s-1", {"email": "s@example.cn", "language": "zh-CN"})
    deadline = time.monotonic() + 60
    while (s := await c.replication())[SG].dead_lettered < 1 or s[SG].pending or s[IE].pending:
        assert time.monotonic() < deadline, s
        await asyncio.sleep(0.1)
    assert "refused: INVALID_ARGUMENT" in s[SG].last_error and "signing_key_id" in s[SG].last_error
    assert s[IE].dead_lettered == 0 and not s[IE].last_error
    failed = [json.loads(e) for _, e, _ in await c.log() if json.loads(e)["outcome"] == "failed"]
    assert [e["subject"] for e in failed if e["destination_region"] == SG] == ["s-1"]
    denied = [json.loads(e) for _, e, _ in await c.log(SG) if json.loads(e)["outcome"] == "denied"]
    assert denied and denied[-1]["subject"] == "s-1" and denied[-1]["actor"] == PRIMARY_NODE
    assert "language" in values(await c.held("s-1", IE))  # the other region went on
