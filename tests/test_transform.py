"""Transformations in rules (issue 18 point 2): a rule sends or serves a field as `mask:N`,
`hash`, `truncate` or `year_of_birth` instead of its value. The pure forms against vectors
and properties; rules refused at load naming the key; then real nodes: the value never
leaves the primary (no copy, region file, log entry or node output holds it), regions and
callers located there see only the form and are told so, a rule change re-sends the copies
in the new form, and copies that lie about their form are refused or not served."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from residency.cli.main import main
from residency.replicator.sinks.manifest import open_object
from residency.server.config.rules import parse_rules
from residency.server.config.schema import load_schema
from residency.server.core import codec
from residency.server.core import transform as t
from residency.server.core.errors import ConfigError
from residency.server.core.schema import FieldSpec
from residency.server.core.sealing import field_aad
from residency.server.core.signed import signed_bytes, verifies
from residency.server.deployment import EXAMPLE_RULES, EXAMPLE_SCHEMA, PRIMARY
from residency.server.keys.copykey import load_copy_key, load_home_key
from residency.server.keys.hashkey import KEY, HashKeys, create_hash_key, open_hash_keys
from residency.server.keys.lifecycle import retire, rotate
from residency.server.keys.logkey import create_log_key
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.region import RecipientKey
from residency.v1 import admin_pb2, common_pb2, records_pb2, records_pb2_grpc, replica_pb2
from tests.conftest import S3_BUCKET, S3_PREFIX, Cluster, SeaweedFS, ctx, values
from tests.test_keys_node import open_offline
from tests.test_records import violations
from tests.test_replicator import region_key

SG, IE = "ap-southeast-1", "eu-west-1"
VECTORS = json.loads((Path(__file__).parent / "vectors" / "transform.json").read_text())
COPY_VECTORS = json.loads((Path(__file__).parent / "vectors" / "copy_format_v2.json").read_text())
PHONE = "13800132795"
SENTINEL = b"1380013"  # the digits a mask:4 hides: they must never leave the primary
IP = "203.0.113.77"


# ---- the forms, pure -------------------------------------------------------------------


def spec(name: str, category: str, type: str = "string") -> FieldSpec:
    return FieldSpec(name, category, type)


PHONE_SPEC = spec("phone", "user.contact.phone_number")
IP_SPEC = spec("ip_address", "user.device.ip_address")
BIRTH_SPEC = spec("birth_date", "user.demographic.date_of_birth")
VISIT_SPEC = spec("visit_time", "user.telemetry", "timestamp")


def test_masks_truncations_and_years_match_the_vectors():
    for v in VECTORS["mask"]:
        assert t.transform(f"mask:{v['keep']}", PHONE_SPEC, v["value"], b"") == v["form"], v
        assert t.conforms(f"mask:{v['keep']}", v["form"])
    for v in VECTORS["truncate_ip"]:
        assert t.transform("truncate", IP_SPEC, v["value"], b"") == v["form"], v
        assert t.conforms("truncate", v["form"])
    for v in VECTORS["truncate_date"]:
        assert t.transform("truncate", BIRTH_SPEC, v["value"], b"") == v["form"], v
    for v in VECTORS["truncate_timestamp"]:
        got = t.transform("truncate", VISIT_SPEC, datetime.fromisoformat(v["value"]), b"")
        assert isinstance(got, datetime) and got.isoformat() == v["form"], v
        assert t.conforms("truncate", got)
    for v in VECTORS["year_of_birth"]:
        value = v["value"] if len(v["value"]) == 10 else datetime.fromisoformat(v["value"])
        assert t.transform("year_of_birth", BIRTH_SPEC, value, b"") == v["form"], v


def test_hash_is_the_documented_hmac_stable_per_region_and_field_and_different_across_them():
    h = VECTORS["hash"]
    keys = HashKeys(bytes.fromhex(h["secret"]))
    for region, key in h["region_keys"].items():
        # The derivation as docs/operators.md states it, with the standard library alone.
        derived = hmac.new(
            bytes.fromhex(h["secret"]), b"residency/transform-hash-key/v1\0" + region.encode(), hashlib.sha256
        )
        assert keys.for_region(region).hex() == key == derived.hexdigest()
        for field, field_key in h["field_keys"][region].items():
            by_field = hmac.new(
                bytes.fromhex(key), b"residency/transform-hash-field/v1\0" + field.encode(), hashlib.sha256
            )
            assert keys.for_field(region, field).hex() == field_key == by_field.hexdigest()
    for v in h["values"]:
        key = bytes.fromhex(h["field_keys"][v["region"]][v["field"]])
        if v["type"] == "string":
            tag, data = b"s", str(v["value"]).encode()
        elif v["type"] == "bytes":
            tag, data = b"b", bytes.fromhex(str(v["value"]))
        else:
            tag, data = b"i", int(v["value"]).to_bytes(8, "big", signed=True)
        expected = hmac.new(key, b"residency/transform-hash/v2\0" + tag + data, hashlib.sha256).hexdigest()
        assert v["form"] == expected
        value = bytes.fromhex(v["value"]) if v["type"] == "bytes" else v["value"]
        assert t.transform("hash", PHONE_SPEC, value, key) == expected
        assert t.conforms("hash", expected)
    sg = {(v["field"], v["value"]): v["form"] for v in h["values"] if v["region"] == SG}
    ie = {(v["field"], v["value"]): v["form"] for v in h["values"] if v["region"] == IE}
    assert sg.keys() == ie.keys() and not set(sg.values()) & set(ie.values())
    # One value in two fields of one region: two hashes, so one field's hash tests nothing in the other.
    assert sg["email", "li@example.cn"] != sg["phone", "li@example.cn"]
    assert len(set(sg.values())) == len(sg)


def test_put_in_forms_hashes_each_field_under_its_own_key():
    keys = HashKeys(b"\x03" * 32)
    specs = {"email": spec("email", "user.contact.email"), "alias": spec("alias", "user.contact.email")}
    sent = {n: codec.to_value("li@example.cn") for n in specs}
    assert not t.put_in_forms(
        {"email": "hash", "alias": "hash"}, specs, sent, lambda f: keys.for_field(SG, f)
    )
    got = {n: codec.from_value(v) for n, v in sent.items()}
    assert got["email"] == t.keyed_hash(keys.for_field(SG, "email"), "li@example.cn") != got["alias"]


def test_a_hash_is_not_reversed_by_a_dictionary_without_the_key():
    """Every phone number of a 10,000-number block hashed without the region's key (plain
    SHA-256, or HMAC under another key) matches none of the region's hashes."""
    key, other = HashKeys(b"\x01" * 32).for_region(SG), HashKeys(b"\x02" * 32).for_region(SG)
    target = t.keyed_hash(key, PHONE)
    block = [f"1380013{n:04d}" for n in range(10_000)]
    assert PHONE in block and t.keyed_hash(key, PHONE) == target  # the dictionary holds it
    for guess in block:
        assert hashlib.sha256(guess.encode()).hexdigest() != target
        assert t.keyed_hash(other, guess) != target
    with pytest.raises(t.NotInForm):  # and without any key nothing is hashed at all
        t.transform("hash", PHONE_SPEC, PHONE, b"")


@given(st.text(max_size=40), st.integers(min_value=0, max_value=t.MAX_MASK))
def test_a_mask_shows_at_most_n_characters_and_never_more_than_half(value: str, keep: int):
    masked = t.mask(value, keep)
    shown = [c for c in masked if c not in t.SEPARATORS and c != "*"]
    others = sum(c not in t.SEPARATORS for c in value)
    assert len(masked) == len(value) and len(shown) <= min(keep, others // 2)
    assert t.conforms(f"mask:{keep}", masked)


@given(st.ip_addresses(v=4))
def test_an_ipv4_address_inside_an_ipv6_one_is_truncated_as_ipv4(ip: ipaddress.IPv4Address):
    """6to4 (2002:V4::/48 is the whole IPv4 address), Teredo (the client's address, bits
    inverted) and IPv4-mapped addresses keep only the IPv4 address's /24."""
    v4 = int(ip)
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | 1)
    teredo = ipaddress.IPv6Address((0x20010000 << 96) | (0xC0000201 << 64) | (v4 ^ 0xFFFFFFFF))
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | v4)
    expected = str(ipaddress.ip_network(f"{ip}/24", strict=False))
    for embedding in (sixtofour, teredo, mapped):
        assert t.network(str(embedding)) == expected, str(embedding)
        assert t.conforms("truncate", expected)


def test_a_short_value_shown_whole_does_not_conform_to_its_mask():
    """mask:N shows at most N characters and at most half of them: a region node does not
    serve a copy of a short value holding more than that, whole or not."""
    for keep, value in [(4, "1234"), (4, "*234"), (4, "12-34"), (8, "**345678"), (2, "12"), (1, "1")]:
        assert not t.conforms(f"mask:{keep}", value), (keep, value)
    for keep, value in [(4, "**34"), (4, "**-34"), (8, "****5678"), (2, "*2"), (1, "*")]:
        assert t.conforms(f"mask:{keep}", value), (keep, value)
        assert t.mask(value.replace("*", "0"), keep) == value


def test_values_not_in_their_form_do_not_conform():
    """What a region node refuses to serve: the value itself, or more than the form shows."""
    lies = [
        ("mask:4", PHONE),
        ("mask:4", "******32795"),
        ("mask:4", "2795*******"),
        ("mask:4", 2795),
        ("hash", PHONE),
        ("hash", "A" * 64),
        ("truncate", IP),
        ("truncate", "203.0.113.77/24"),
        ("truncate", "203.0.113.0/25"),
        ("truncate", "2001:db8:85a3:1234::/64"),
        ("truncate", "1990-05-17"),
        ("truncate", datetime(2026, 3, 14, tzinfo=UTC)),
        ("year_of_birth", "1990-05-17"),
        ("mask:x", "*"),
        ("mask:-1", ""),
        ("mask:04", "*"),
        ("reveal", PHONE),
        ("", PHONE),
    ]
    for form, value in lies:
        assert not t.conforms(form, value), (form, value)
    with pytest.raises(t.NotInForm):
        t.transform("truncate", IP_SPEC, "not an address", b"")
    with pytest.raises(t.NotInForm):
        t.transform("year_of_birth", BIRTH_SPEC, "17/05/1990", b"")


def test_a_signed_copy_with_forms_verifies_and_the_old_vector_is_unchanged():
    """FieldPolicy.form is additive: the copy vector of before keeps its bytes and signature,
    the copy with forms verifies, and changing a form after signing breaks the signature."""
    public = bytes.fromhex(COPY_VECTORS["public_key"])
    old = replica_pb2.SealedCopy.FromString(bytes.fromhex(COPY_VECTORS["copy"]["message"]))
    assert verifies(public, old) and not old.policies
    v = COPY_VECTORS["copy_with_form"]
    copy = replica_pb2.SealedCopy.FromString(bytes.fromhex(v["message"]))
    assert signed_bytes(copy).hex() == v["signed_bytes"]
    Ed25519PublicKey.from_public_bytes(public).verify(
        bytes.fromhex(v["signature"]), bytes.fromhex(v["signed_bytes"])
    )
    assert {n: p.form for n, p in copy.policies.items()} == {"email": "hash", "name": "mask:4"}
    for weaker in ("", "mask:8"):
        copy.policies["name"].form = weaker
        assert not verifies(public, copy), weaker


# ---- rules files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory):
    p = tmp_path_factory.mktemp("s") / "schema.yaml"
    doc = yaml.safe_load(EXAMPLE_SCHEMA)
    doc["fields"]["birth_date"] = {"category": "user.demographic.date_of_birth", "type": "string"}
    p.write_text(yaml.safe_dump(doc))
    return load_schema(p)


def rules_with(transform: dict[str, Any], rule: str = "sg-service", **extra: Any) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE_RULES)
    for r in doc["rules"]:
        if r["id"] == rule:
            r["transform"] = transform
            r.update(extra)
    return doc


def test_a_rules_transform_is_loaded_and_planned_per_rule(schema):
    rules = parse_rules(
        rules_with({"phone": {"mask": 4}, "ip_address": "truncate", "email": "hash"}), schema, "r", "v"
    )
    plan = rules.plan(SG, "essential.service")
    assert plan.forms(["phone", "ip_address", "email", "name"]) == {
        "phone": "mask:4",
        "ip_address": "truncate",
        "email": "hash",
    }
    # The same field under another rule (another region, another purpose) goes as it is.
    assert parse_rules(rules_with({"email": "hash"}), schema, "r", "v").plan(IE, None).forms(["email"]) == {}


def test_a_meaningless_or_unknown_transformation_is_refused_at_load_naming_the_key(schema):
    bad = {
        "email": ("truncate", "transform.email: truncate takes an IP address"),
        "phone": ({"mask": "four"}, "transform.phone: mask takes the number"),
        "name": ("reveal", "transform.name: unknown transformation 'reveal'"),
        "language": ("year_of_birth", "transform.language: year_of_birth takes a birth date"),
        "visit_time": ({"mask": 2}, "transform.visit_time: mask keeps a string's last characters"),
        "cookie_id": ("mask", "transform.cookie_id: mask takes the number of trailing characters"),
        "no_such_field": ("hash", "transform.no_such_field: unknown field"),
        "pages_visited": ("hash", "transform.pages_visited: hash takes a string, bytes or int"),
        "address": ("hash", None),  # excluded, yet under a listed category: accepted
        "birth_date": ("year_of_birth", "transform.birth_date: the rule does not send it"),
    }
    for name, (form, why) in bad.items():
        doc = rules_with({name: form})
        if why is None:
            parse_rules(doc, schema, "rules.yaml", "v")
            continue
        with pytest.raises(ConfigError) as e:
            parse_rules(doc, schema, "rules.yaml", "v")
        assert why in str(e.value) and "rule 'sg-service'" in str(e.value), (name, str(e.value))


def test_the_hash_key_is_wrapped_and_survives_rotation_and_retirement(tmp_path: Path):
    log_keys = LocalProvider.create(tmp_path, b"pass", "log-kek")
    provider = LocalProvider.create(tmp_path, b"pass")
    create_log_key("residency/cn-north", tmp_path, log_keys)  # rotation follows the log key
    create_hash_key(tmp_path, log_keys)
    first = open_hash_keys(tmp_path, log_keys).for_region(SG)
    assert (tmp_path / KEY).stat().st_mode & 0o777 == 0o600
    assert first not in (tmp_path / KEY).read_bytes()  # wrapped, not raw
    rotate(PRIMARY, provider, tmp_path, log_keys=log_keys)
    retire(PRIMARY, provider, tmp_path, log_keys=log_keys)
    assert sorted(p.name for p in tmp_path.glob("log-kek-v*")) == ["log-kek-v2.key"]  # v1 is gone
    again = LocalProvider(tmp_path, b"pass", "log-kek")
    assert open_hash_keys(tmp_path, again).for_region(SG) == first


# ---- real nodes ------------------------------------------------------------------------

TRANSFORMS = {
    "sg-service": {"phone": {"mask": 4}, "ip_address": "truncate", "email": "hash"},
    "ie-support": {"email": "hash"},
    "ie-analytics": {"visit_time": "truncate", "birth_date": "year_of_birth"},
    "ie-marketing": {"phone": {"mask": 4}},
}


def configure(c: Cluster, transforms: dict[str, dict[str, Any]]) -> None:
    """The example schema with a birth date, and the example rules with `transforms`."""
    schema = yaml.safe_load((c.dir / "schema.yaml").read_text())
    schema["fields"]["birth_date"] = {
        "category": "user.demographic.date_of_birth",
        "type": "string",
        "max_bytes": 10,
        "description": "Date of birth, YYYY-MM-DD",
    }
    (c.dir / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    (c.dir / "rules.yaml").write_text(yaml.safe_dump(rules_doc(transforms), sort_keys=False))


def rules_doc(transforms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE_RULES)
    for r in doc["rules"]:
        if r["id"] == "ie-analytics":
            r["categories"].append("user.demographic.date_of_birth")
        if r["id"] in transforms:
            r["transform"] = transforms[r["id"]]
    return doc


USER = {
    "name": "Li Wei",
    "phone": PHONE,
    "email": "li@example.cn",
    "ip_address": IP,
    "language": "zh-CN",
    "visit_time": datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC),
    "birth_date": "1990-05-17",
}


async def until(check: Any, what: str, deadline: float = 120.0) -> Any:
    end = time.monotonic() + deadline
    while not (got := await check()):
        assert time.monotonic() < end, f"{what}: not within {deadline} s"
        await asyncio.sleep(0.1)
    return got


@pytest.fixture(scope="module")
async def transformed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """One deployment for the module's node tests (the rule change runs last)."""
    c = Cluster(tmp_path_factory.mktemp("transform") / "deployment")
    try:
        configure(c, TRANSFORMS)
        await c.start()
        await c.put("u-1", USER)
        await c.put(
            "u-2", {"email": "li@example.cn", "ip_address": "2001:db8:85a3:1234::1", "phone": "13911112795"}
        )
        await c.consent("u-1", "marketing.communications", "ie-affiliate")
        await c.replicated()
        yield c
    finally:
        await c.close()


def files_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


async def test_regions_hold_and_serve_only_the_form_and_the_value_never_leaves(transformed: Cluster):
    c = transformed
    sg = await c.get("u-1", region=SG)
    got = values(sg)
    assert got["phone"] == "*******2795" and got["ip_address"] == "203.0.113.0/24"
    assert t.conforms("hash", got["email"]) and got["name"] == "Li Wei"
    assert dict(sg.forms) == {"phone": "mask:4", "ip_address": "truncate", "email": "hash"}
    assert values(await c.get("u-2", region=SG))["ip_address"] == "2001:db8:85a3::/48"
    # A hash is stable in a region (u-2 has the same e-mail) and differs across regions.
    assert values(await c.get("u-2", region=SG))["email"] == got["email"]
    ie_support = values(await c.get("u-1", region=IE, purpose="essential.service.operations.support"))
    assert t.conforms("hash", ie_support["email"]) and ie_support["email"] != got["email"]
    ie = await c.get("u-1", region=IE, purpose="analytics.reporting")
    assert values(ie)["visit_time"] == datetime(2026, 3, 1, tzinfo=UTC) and values(ie)["birth_date"] == 1990
    assert dict(ie.forms) == {"visit_time": "truncate", "birth_date": "year_of_birth"}
    assert values(await c.get("u-1", region=IE, purpose="marketing.communications"))["phone"] == "*******2795"
    # A caller located in a region asking the primary for the full value gets only the form,
    # the same as its region holds (one hash key per region), and is told it is one.
    at_primary = await c.get("u-1", location=SG)
    assert values(at_primary)["phone"] == "*******2795" and values(at_primary)["email"] == got["email"]
    assert dict(at_primary.forms) == dict(sg.forms)
    # The home region reads the value.
    assert values(await c.get("u-1"))["phone"] == PHONE and not (await c.get("u-1")).forms

    # What each region stores, opened with the region's own keys: the form, never the value.
    for region in (SG, IE):
        held = {
            n: codec.from_value(v)
            for n, v in open_offline(c, region, c.data_dir(region) / "node.db", "u-1").items()
        }
        assert (
            held.get("phone") == "*******2795"
            and IP not in held.values()
            and "1990-05-17" not in held.values()
        )
    # No file of a region node (store, WAL, keyring, its own log), no transfer-log entry of
    # any node, no node's output holds the hidden digits.
    for region in (SG, IE):
        for p in files_under(c.data_dir(region)):
            assert SENTINEL not in p.read_bytes() and IP.encode() not in p.read_bytes(), p
    for region in (PRIMARY, SG, IE):
        assert SENTINEL not in (c.data_dir(region) / "node.log").read_bytes()
        for _, entry, _ in await c.log(region):
            assert SENTINEL.decode() not in entry and IP not in entry
    # The log says which form left: the primary's replication entries, each region's applied
    # copies and local reads, and the primary's read from another region.
    primary = [json.loads(e) for _, e, _ in await c.log()]
    sent = [e for e in primary if e["kind"] == "replication" and e["subject"] == "u-1"]
    by_region = {e["destination_region"]: e["forms"] for e in sent}
    assert by_region[SG] == {"email": "hash", "ip_address": "truncate", "phone": "mask:4"}
    assert by_region[IE] == {
        "birth_date": "year_of_birth",
        "email": "hash",
        "phone": "mask:4",
        "visit_time": "truncate",
    }
    assert "phone" in {f["name"] for e in sent for f in e["fields"]}  # fields keep the name
    read = [e for e in primary if e["kind"] == "remote_read" and e["destination_region"] == SG]
    assert read[-1]["forms"]["phone"] == "mask:4"
    at_sg = [json.loads(e) for _, e, _ in await c.log(SG)]
    assert any(e["kind"] == "replication" and e.get("forms", {}).get("phone") == "mask:4" for e in at_sg)
    assert any(e["kind"] == "local_read" and e.get("forms", {}).get("phone") == "mask:4" for e in at_sg)


async def test_rules_explain_names_each_fields_transformation(transformed: Cluster, capsys):
    c = transformed
    for region in (PRIMARY, SG):  # the primary from its rules, the region from the copy's policy
        reply = await c.admin(region).ExplainTransfer(
            admin_pb2.ExplainTransferRequest(user_id="u-1", to=SG, purpose="essential.service"), timeout=30
        )
        forms = {f.field: f.form for f in reply.fields if f.transferred}
        assert forms["phone"] == "mask:4" and forms["email"] == "hash" and forms["name"] == "", region
    code = await asyncio.to_thread(
        main, ["rules", "explain", *c.target(), "--user", "u-1", "--to", SG, "--purpose", "essential.service"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "goes as mask:4" in out and "goes as hash" in out and SENTINEL.decode() not in out
    # `residency records get` by a service of the region, at its region node: the forms, named.
    get = ["records", "get", *c.target("service", region=SG, location=SG), "--location", SG]
    code = await asyncio.to_thread(main, [*get, "--purpose", "essential.service", "u-1"])
    got = json.loads(capsys.readouterr().out)
    assert code == 0 and got["fields"]["phone"] == "*******2795"
    assert got["forms"] == {"email": "hash", "ip_address": "truncate", "phone": "mask:4"}


async def test_reviewers_verify_a_log_with_forms_and_reports_show_them(transformed: Cluster, tmp_path: Path):
    c = transformed
    bundle, report = tmp_path / "bundle", tmp_path / "report.csv"
    assert await asyncio.to_thread(main, ["log", "export", *c.target("reviewer"), "--out", str(bundle)]) == 0
    assert await asyncio.to_thread(main, ["log", "verify", str(bundle)]) == 0
    key = str(c.dir / "keys" / PRIMARY / "log.pub")
    args = ["log", "report", "--bundle", str(bundle), "--key", key, "--out", str(report), "--format", "csv"]
    assert await asyncio.to_thread(main, args) == 0
    rows = list(csv.DictReader(io.StringIO(report.read_text())))
    sent = [
        r
        for r in rows
        if r["kind"] == "replication" and r["subject"] == "u-1" and r["destination_region"] == SG
    ]
    assert sent[-1]["forms"] == "email=hash;ip_address=truncate;phone=mask:4"
    assert SENTINEL not in report.read_bytes()


async def test_copies_that_lie_about_their_form_are_refused_or_not_served(transformed: Cluster):
    c = transformed
    home = load_copy_key(PRIMARY, c.dir / "keys" / PRIMARY / "copy.key")
    recipient = RecipientKey.load(SG, c.dir / "keys" / SG / "region.pub")
    mark = home.high_water(SG, 9, c.lease_epoch(SG))

    def lying_copy(user: str, form: str, value: str = PHONE) -> replica_pb2.SealedCopy:
        """A copy of the whole number under a policy naming `form`, sealed to the region."""
        tk = recipient.new_transit_key()
        dek, wrapped = tk.new_data_key(user)
        aad = field_aad(user, "phone", SG, 1, recipient.key_id, format=2)
        copy = replica_pb2.SealedCopy(
            user_id=user,
            version=1,
            key_id=recipient.key_id,
            format=2,
            wrapped_data_key=wrapped,
            transit_key_id=tk.id,
            wrapped_transit_key=tk.wrapped,
            sealed_fields={"phone": dek.seal(codec.to_value(value).SerializeToString(), aad)},
            categories={"phone": "user.contact.phone_number"},
            home_region=PRIMARY,
        )
        p = copy.policies["phone"]
        p.rule, p.legal_basis, p.recipient, p.form = "sg-service", "contract", "sg-affiliate", form
        p.purposes.append("essential.service")
        return copy

    async def apply(copy: replica_pb2.SealedCopy) -> Any:
        return await c.replica(SG).ApplyCopies(
            replica_pb2.ApplyCopiesRequest(source_region=PRIMARY, copies=[copy], high_water=mark), timeout=10
        )

    before = (await c.status(SG)).records
    # A copy claiming a weaker form than the one signed (none, or more characters shown).
    for weaker in ("", "mask:11"):
        copy = home.sign_copy(lying_copy("x-1", "mask:4", "*******2795"), SG)
        copy.policies["phone"].form = weaker
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await apply(copy)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not verify" in violations(e.value)["copies[0].signature"]
    # A form this node does not know, even signed with the home's key: refused, naming it.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await apply(home.sign_copy(lying_copy("x-1", "mask:x"), SG))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a transformation" in violations(e.value)["copies[0].policies[phone].form"]
    assert (await c.status(SG)).records == before  # nothing of them applied
    denied = [json.loads(e) for _, e, _ in await c.log(SG) if json.loads(e)["outcome"] == "denied"]
    assert sum(e["subject"] == "x-1" and e["kind"] == "replication" for e in denied) == 3
    # A copy signed with the home's key (a home's bug, or a thief of copy.key) holding the
    # whole number under "mask:4": applied, but never served; the read says why.
    reply = await apply(home.sign_copy(lying_copy("x-2", "mask:4"), SG))
    assert reply.applied == 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.get("x-2", region=SG)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and PHONE not in (e.value.details() or "")
    last = [json.loads(e) for _, e, _ in await c.log(SG) if json.loads(e)["subject"] == "x-2"][-1]
    assert last["kind"] == "local_read" and last["withheld"][0]["reason"] == "form_mismatch"
    assert PHONE not in json.dumps(last)


async def test_a_caller_elsewhere_gets_nothing_of_a_field_no_rule_sends_it(transformed: Cluster):
    """The liar about purpose: a service in Singapore stating a purpose no rule there covers
    gets no form of anything, and the refusal is logged."""
    c = transformed
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.get("u-1", location=SG, purpose="marketing.communications")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    entry = json.loads((await c.log())[-1][1])
    assert entry["kind"] == "remote_read" and entry["outcome"] == "denied" and "forms" not in entry


async def test_a_field_served_only_as_a_form_is_not_searchable_by_its_value(transformed: Cluster):
    """A find by the whole phone number would confirm, user by user, the value the rule lets
    Singapore see only masked: refused before any lookup, and logged; the home region finds."""
    c = transformed
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", SG))
    ask = records_pb2.FindRecordsRequest(
        context=common_pb2.CallContext(purpose="essential.service"), field="phone", value=PHONE
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.FindRecords(ask, timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only as mask:4" in (e.value.details() or "")
    entry = json.loads((await c.log())[-1][1])
    assert entry["outcome"] == "denied" and entry["found_by"] == "phone" and entry["subject"] == ""
    home = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service"))
    reply = await home.FindRecords(ask, timeout=30)
    assert [r.record.user_id for r in reply.results] == ["u-1"]


async def test_a_caller_abroad_cannot_write_a_guess_to_read_back_its_hash(transformed: Cluster):
    """A service in Singapore, where the rule sends email only hashed, would write a probe with
    a guessed e-mail and read back its hash to compare with other users' hashes: writes from
    outside the home region are refused, logged against each user named, and nothing is written."""
    c = transformed
    abroad = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", SG))
    probe = records_pb2.Record(user_id="g-1", fields={"email": codec.to_value("li@example.cn")})
    one = abroad.PutRecord(records_pb2.PutRecordRequest(context=ctx("", "essential.service"), record=probe))
    many = abroad.PutRecords(
        records_pb2.PutRecordsRequest(
            context=ctx(SG, "essential.service"),
            records=[probe, records_pb2.Record(user_id="g-2", fields={"phone": codec.to_value(PHONE)})],
        )
    )
    for call in (one, many):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"written from {PRIMARY} only" in (e.value.details() or "")
        assert "li@example.cn" not in (e.value.details() or "")
    for user in ("g-1", "g-2"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.get(user)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    refused = [json.loads(x) for _, x, _ in await c.log()]
    refused = [x for x in refused if x["subject"] in ("g-1", "g-2")]
    # Both calls are in flight at once (a grpc.aio call starts when made): order by user.
    assert sorted((x["subject"], x["kind"], x["outcome"], x["destination_region"]) for x in refused) == [
        ("g-1", "access", "denied", SG),
        ("g-1", "access", "denied", SG),
        ("g-2", "access", "denied", SG),
    ]
    assert "li@example.cn" not in json.dumps(refused)
    # The home region writes as before.
    assert await c.put("g-1", {"email": "g@example.cn"}) > 0


async def test_a_changed_transformation_resends_every_copy_in_the_new_form(transformed: Cluster):
    c = transformed
    new = {**TRANSFORMS, "sg-service": {**TRANSFORMS["sg-service"], "phone": {"mask": 2}}}
    await c.admin().ApplyRules(
        admin_pb2.ApplyRulesRequest(rules_yaml=yaml.safe_dump(rules_doc(new))), timeout=30
    )

    async def masked_anew() -> bool:
        return values(await c.get("u-1", region=SG)).get("phone") == "*********95"

    await until(masked_anew, "the copy in the new form")
    sent = [json.loads(e) for _, e, _ in await c.log() if json.loads(e)["kind"] == "replication"]
    assert [e["forms"]["phone"] for e in sent if e["subject"] == "u-1" and e["destination_region"] == SG][
        -1
    ] == "mask:2"
    # A transformation removed is a rule change too: the value goes as it is from then on.
    plain = {k: v for k, v in TRANSFORMS.items() if k != "sg-service"}
    await c.admin().ApplyRules(
        admin_pb2.ApplyRulesRequest(rules_yaml=yaml.safe_dump(rules_doc(plain))), timeout=30
    )

    async def whole() -> bool:
        return values(await c.get("u-1", region=SG)).get("phone") == PHONE

    await until(whole, "the copy with the value")
    assert not (await c.get("u-1", region=SG)).forms


async def test_a_bucket_copy_holds_only_the_form(tmp_path: Path, seaweed: SeaweedFS):
    """eu-west-1's copies in an S3 bucket: every object, opened with the region's key as an
    affiliate would, holds the masked phone and the month, and no object holds the digits."""
    await asyncio.to_thread(seaweed.make_bucket, S3_BUCKET)
    c = Cluster(tmp_path / "deployment", s3=seaweed)
    try:
        configure(c, TRANSFORMS)
        await c.start(PRIMARY, SG)
        await c.put("u-1", USER)
        await c.consent("u-1", "marketing.communications", "ie-affiliate")
        await c.replicated()
        client = seaweed.client()
        listed = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=S3_PREFIX)["Contents"]
        bodies = [client.get_object(Bucket=S3_BUCKET, Key=o["Key"])["Body"].read() for o in listed]
        assert bodies and not any(SENTINEL in b or IP.encode() in b for b in bodies)
        home = load_home_key(c.dir / "keys" / PRIMARY / "copy.pub")
        body = client.get_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}copies/u-1.sealedcopy")["Body"].read()
        copy, fields = open_object(body, region_key(c, IE), home)
        got = {n: codec.from_value(v) for n, v in fields.items()}
        assert got["phone"] == "*******2795" and got["visit_time"] == datetime(2026, 3, 1, tzinfo=UTC)
        assert got["birth_date"] == 1990 and t.conforms("hash", got["email"])
        assert {n: p.form for n, p in copy.policies.items() if p.form} == {
            "phone": "mask:4",
            "email": "hash",
            "visit_time": "truncate",
            "birth_date": "year_of_birth",
        }
    finally:
        await c.close()
