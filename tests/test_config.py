"""The config files' models: what a wrong file says (file, line, key, expected, got), the
published JSON Schemas are current, and the files `residency init` writes satisfy them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import yaml

from residency.server.config import JSONSCHEMA
from residency.server.config.node import load_config
from residency.server.config.rules import load_rules, parse_rules
from residency.server.config.schema import load_schema
from residency.server.core.errors import ConfigError
from residency.server.core.rules import LegalBasis
from residency.server.core.schema import TYPES, FieldType, Schema
from residency.server.deployment import AFFILIATES, EXAMPLE_RULES, EXAMPLE_SCHEMA, PRIMARY, init_deployment

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("d")
    init_deployment(d)
    return d


@pytest.fixture(scope="module")
def schema(deployment: Path) -> Schema:
    return load_schema(deployment / "schema.yaml")


S3 = {"region": "eu-west-1", "sink": "s3", "bucket": "b", "public_key": "keys/eu-west-1/region.pub"}
NODE_CASES: list[tuple[dict[str, Any], str]] = [
    ({"role": "leader"}, "'role' must be one of ['primary', 'region'], got 'leader'"),
    ({"listen": "nowhere"}, "'listen' must be HOST:PORT, e.g. 127.0.0.1:50051, got 'nowhere'"),
    ({"listen": "h:70000"}, "'listen': must be HOST:PORT with a port from 0 to 65535, got 'h:70000'"),
    ({"durability": "sometimes"}, "'durability' must be one of ['full', 'normal'], got 'sometimes'"),
    ({"data_dir": None}, "'data_dir' must be the folder of the node's database, got None"),
    ({"region": ""}, "'region' is required: the region this node serves, e.g. cn-north"),
    (
        {"check_workers": True},
        "'check_workers' must be a whole number from 0 to 64 (0: in-process), got True",
    ),
    (
        {"checkpoint_interval_seconds": "60"},
        "'checkpoint_interval_seconds' must be a number of seconds above 0, got '60'",
    ),
    ({"keys": "local"}, "'keys' must be a mapping, got 'local'"),
    (
        {"keys": {"provider": "vault", "dir": "k"}},
        "'keys.provider' must be one of ['local', 'aws-kms', 'openbao'], got 'vault'",
    ),
    (
        {"keys": {"provider": "aws-kms", "dir": "k"}},
        "'keys.kms_key_id' is required for provider aws-kms: a KMS key id, ARN or alias",
    ),
    (
        {"affiliates": [{**S3, "bucket": ""}]},
        "'affiliates[0].bucket' is required for sink s3: the S3 bucket copies go to",
    ),
    (
        {"affiliates": [{**S3, "sink": "ftp"}]},
        "'affiliates[0].sink' must be one of ['replica', 's3'], got 'ftp'",
    ),
    (
        {"affiliates": [{**S3, "max_rate": -1}]},
        "'affiliates[0].max_rate' must be a number of records per second (0: no limit), got -1",
    ),
    ({"affiliates": [S3, S3]}, "'affiliates': each region may appear once, got ['eu-west-1', 'eu-west-1']"),
    (
        {"replicator": {"regions": ["mars-1"]}},
        "'replicator.regions' names ['mars-1'], which are not in 'affiliates'",
    ),
    (
        {"replicator": {"batch_size": 5000}},
        "'replicator.batch_size' must be a whole number of outbox entries from 1 to 1000, got 5000",
    ),
    (
        {"archive": {"endpoint": "http://127.0.0.1:1"}},
        "'archive.bucket' is required: the S3 bucket to archive the transfer log to",
    ),
    (
        {"archive": {"bucket": "b", "retention_days": 1.5}},
        "'archive.retention_days' must be a whole number of days",
    ),
]


@pytest.mark.parametrize(("change", "message"), NODE_CASES, ids=[m.split()[0] for _, m in NODE_CASES])
def test_a_wrong_node_config_names_file_key_expected_and_got(deployment: Path, change: dict, message: str):
    doc = {**yaml.safe_load((deployment / f"{PRIMARY}.yaml").read_text()), **change}
    path = deployment / "wrong.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def test_unknown_keys_are_named_with_the_keys_known_there(deployment: Path):
    doc = yaml.safe_load((deployment / f"{PRIMARY}.yaml").read_text())
    doc["colour"] = "blue"
    doc["keys"]["mount"] = "transit"
    doc["affiliates"][1] = {**S3, "address": "127.0.0.1:1"}
    path = deployment / "wrong.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    assert lines[0].startswith(
        f"{path}: 'keys' has unknown key(s) ['mount'] for provider local; known keys are ["
    )
    assert lines[1].startswith(
        f"{path}: 'affiliates[1]' has unknown key(s) ['address'] for sink s3; known keys are ["
    )
    assert lines[2].startswith(
        f"{path}: unknown key(s) ['colour']; known keys are ['access', 'affiliates', 'archive', "
    )
    assert len(lines) == 3  # every problem at once


SCHEMA_CASES = [
    (
        "  name:              {category: user.name,",
        "  name:              {category: user.nom,",
        "'fields.name.category': 'user.nom' is not a Fides data category",
    ),
    (
        "type: timestamp",
        "type: date",
        "'fields.visit_time.type' must be one of ['string', 'int', 'bool', 'bytes', 'timestamp', 'list'], "
        "got 'date'",
    ),
    (
        "max_bytes: 32, sensitive",
        "max_bytes: -32, sensitive",
        "'fields.national_id.max_bytes' must be a positive whole number of bytes, got -32",
    ),
    (
        "source: partner,",
        "source: partner, colour: red,",
        "'fields.partner_profile' has unknown key(s) ['colour']; known keys are [",
    ),
    (
        "version: 1\nfields:",
        "version: 1\nfeilds:",
        "'fields' is required: a non-empty mapping of field names",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "message"), SCHEMA_CASES, ids=[m.split()[0] for *_, m in SCHEMA_CASES]
)
def test_a_wrong_schema_names_file_field_and_key(tmp_path: Path, old: str, new: str, message: str):
    assert old in EXAMPLE_SCHEMA
    path = tmp_path / "schema.yaml"
    path.write_text(EXAMPLE_SCHEMA.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_schema(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


RULES_CASES = [
    ("legal_basis: contract", "legal_basis: because", ":17: rule 'sg-service': legal_basis must be one of ["),
    (
        "  - id: ie-analytics",
        "  - colour: red",
        ":26: rule 1: id is required: the rule's id, unique in the file",
    ),
    (
        "retention_days: 180",
        "retention_days: 0",
        ":26: rule 'ie-analytics': retention_days must be a positive whole number of days",
    ),
    (
        "    exclude: [user.contact.address]",
        "    exclude: [user.contact.adress]",
        ":17: rule 'sg-service': 'user.contact.adress' is not a Fides data category",
    ),
    (
        "    purposes: [analytics.reporting]",
        "    purposes: []",
        ":26: rule 'ie-analytics': purposes must be a list of at least one Fides data use, got []",
    ),
    (
        "    contact: dpo@example.ie\n",
        "",
        ": recipients[1]: contact is required: how the user reaches the recipient",
    ),
    (
        "home_region: cn-north\n",
        "home_region: cn-north\ncolour: red\n",
        ": unknown key(s) ['colour']; known keys are [",
    ),
    (
        "never_transfer: [user.authorization,",
        "never_transfer: [user.authorisation,",
        ": 'user.authorisation' is not a Fides data category",
    ),
    (
        "region: eu-west-1",
        "region: cn-north",
        ": recipient 'ie-affiliate' is in the home region; it is not a transfer",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "message"), RULES_CASES, ids=[new.strip()[:40] for _, new, _ in RULES_CASES]
)
def test_a_wrong_rules_file_names_file_line_rule_and_key(
    schema: Schema, tmp_path: Path, old: str, new: str, message: str
):
    assert old in EXAMPLE_RULES
    path = tmp_path / "rules.yaml"
    path.write_text(EXAMPLE_RULES.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_rules(path, schema)
    assert f"{path}{message}" in str(e.value), str(e.value)


def test_a_broken_rule_hides_no_other_rules_problems(schema: Schema):
    doc = yaml.safe_load(EXAMPLE_RULES)
    doc["rules"][0]["legal_basis"] = "because"
    doc["rules"][1]["recipient"] = "nobody"
    doc["rules"][2]["id"] = doc["rules"][3]["id"]
    with pytest.raises(ConfigError) as e:
        parse_rules(doc, schema, "rules.yaml", "v")
    assert str(e.value).splitlines() == [
        f"rules.yaml:0: rule 'sg-service': legal_basis must be one of {list(get_args(LegalBasis))}, "
        "got 'because'",
        "rules.yaml:0: rule 'ie-analytics': unknown recipient 'nobody'",
        "rules.yaml:0: rule 'ie-marketing': duplicate rule id",
    ]


def test_the_models_types_are_the_cores():
    assert set(get_args(FieldType)) == set(TYPES)


def test_the_json_schemas_are_current():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_jsonschema.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((JSONSCHEMA / f"{kind}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_init_writes_files_the_json_schemas_accept_and_points_editors_at_them(deployment: Path):
    files = {f"{r}.yaml": "node" for r in (PRIMARY, *AFFILIATES)} | {
        "schema.yaml": "schema",
        "rules.yaml": "rules",
    }
    for name, kind in files.items():
        text = (deployment / name).read_text()
        first = text.splitlines()[0]
        assert first == f"# yaml-language-server: $schema=schemas/{kind}.json"
        # The copy beside the files is the published schema, and nothing in the files names
        # this machine (the rules version is a hash of the rules file's bytes).
        assert (deployment / "schemas" / f"{kind}.json").read_bytes() == (
            JSONSCHEMA / f"{kind}.json"
        ).read_bytes()
        assert str(JSONSCHEMA) not in text
        errors = list(_validator(kind).iter_errors(yaml.safe_load(text)))
        assert not errors, (name, [e.message for e in errors])


# What takes more than one key (or a port's range) to tell, only the loader tells.
SCHEMA_TELLS = [(c, m) for c, m in NODE_CASES if not any(w in m for w in ("names", "each region", "65535"))]


@pytest.mark.parametrize(("change", "message"), SCHEMA_TELLS, ids=[m.split()[0] for _, m in SCHEMA_TELLS])
def test_the_node_json_schema_refuses_what_the_loader_refuses(deployment: Path, change: dict, message: str):
    doc = {**yaml.safe_load((deployment / f"{PRIMARY}.yaml").read_text()), **change}
    assert list(_validator("node").iter_errors(doc)), message


def test_an_empty_yaml_value_still_means_empty(deployment: Path, schema: Schema):
    doc = yaml.safe_load((deployment / f"{AFFILIATES[0]}.yaml").read_text())
    doc.update(affiliates=None, replicator=None)
    path = deployment / "empty.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = load_config(path)
    assert config.affiliates == () and config.replicator.enabled
    assert not list(_validator("node").iter_errors(doc))
    rules = yaml.safe_load(EXAMPLE_RULES)
    rules.update(never_transfer=None)
    rules["rules"][0]["exclude"] = None
    assert parse_rules(rules, schema, "rules.yaml", "v").never_transfer == ()
    assert not list(_validator("rules").iter_errors(rules))
