"""The `residency` command as operators use it, against real nodes."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from residency.server.deployment import PRIMARY
from tests.conftest import Cluster


def residency(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "residency.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


def test_init_writes_a_complete_deployment(tmp_path: Path):
    r = residency("init", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    d = tmp_path / "d"
    for name in ("cn-north.yaml", "ap-southeast-1.yaml", "eu-west-1.yaml", "schema.yaml", "rules.yaml"):
        assert (d / name).is_file()
    primary = yaml.safe_load((d / "cn-north.yaml").read_text())
    assert primary["role"] == "primary" and primary["region"] == "cn-north"
    assert {a["region"] for a in primary["affiliates"]} == {"ap-southeast-1", "eu-west-1"}
    for key in ("listen", "data_dir", "schema", "rules", "keys", "checkpoint_interval_seconds"):
        assert key in primary
    for r in ("cn-north", "ap-southeast-1", "eu-west-1"):  # each node signs its own log
        assert (d / "keys" / r / "log.key").stat().st_mode & 0o777 == 0o600
        assert (d / "keys" / r / "log.pub").read_text().startswith(f"residency/{r}+")
    region = yaml.safe_load((d / "eu-west-1.yaml").read_text())
    assert region["role"] == "region" and "affiliates" not in region
    ports = {
        yaml.safe_load((d / f"{r}.yaml").read_text())["listen"]
        for r in ("cn-north", "ap-southeast-1", "eu-west-1")
    }
    assert len(ports) == 3 and all(p.startswith("127.0.0.1:") for p in ports)


def test_serve_refuses_an_invalid_config_naming_the_key(tmp_path: Path):
    residency("init", str(tmp_path / "d"))
    cfg = tmp_path / "d" / "cn-north.yaml"
    doc = yaml.safe_load(cfg.read_text())
    cases = {
        "role": ("role", "leader"),
        "listen": ("listen", "nowhere"),
        "durability": ("durability", "sometimes"),
        "unknown key(s) ['colour']": ("colour", "blue"),
        "'replicator.regions' names ['mars-1']": ("replicator", {"regions": ["mars-1"]}),
        "'checkpoint_interval_seconds' must be": ("checkpoint_interval_seconds", 0),
        "'archive.bucket' is required": ("archive", {"endpoint": "http://127.0.0.1:1"}),
    }
    for expected, (key, value) in cases.items():
        cfg.write_text(yaml.safe_dump({**doc, key: value}))
        r = residency("serve", "--config", str(cfg), timeout=30)
        assert r.returncode != 0
        assert expected in r.stderr and str(cfg) in r.stderr, r.stderr
    broken = {k: v for k, v in doc.items() if k != "data_dir"}
    cfg.write_text(yaml.safe_dump(broken))
    r = residency("serve", "--config", str(cfg), timeout=30)
    assert r.returncode != 0 and "'data_dir' is required" in r.stderr


async def test_records_put_get_delete_and_log_tail(cluster: Cluster):
    common = [*cluster.target("service"), "--location", PRIMARY, "--purpose", "essential.service"]
    r = residency(
        "records",
        "put",
        *common,
        "cli-1",
        "email=cli@example.cn",
        "name=Li Wei",
        'pages_visited:=["/a"]',
        "visit_time@=2026-11-27T08:00:00Z",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"user_id": "cli-1", "version": 1}
    r = residency(
        "records",
        "get",
        *cluster.target("service", location="ap-southeast-1"),
        "--location",
        "ap-southeast-1",
        "--purpose",
        "essential.service",
        "cli-1",
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["fields"] == {"email": "cli@example.cn", "name": "Li Wei"}
    assert {w["field"]: w["reason"] for w in got["withheld"]} == {
        "pages_visited": "no_rule",
        "visit_time": "no_rule",
    }
    assert got["log_sequence"] >= 1
    r = residency(
        "records",
        "get",
        *cluster.target("service", location="eu-west-1"),
        "--location",
        "eu-west-1",
        "--purpose",
        "marketing.communications",
        "cli-1",
    )
    assert r.returncode != 0 and "PERMISSION_DENIED" in r.stderr
    r = residency("records", "put", *common, "cli-1", "shoe_size:=42")
    assert r.returncode != 0
    assert "INVALID_ARGUMENT" in r.stderr and "record.fields[shoe_size]: unknown field" in r.stderr
    r = residency("records", "delete", *common, "cli-1")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 2
    r = residency("records", "get", *common, "cli-1")
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr
    await cluster.replicated()
    r = residency("log", "tail", *cluster.target("reviewer"))
    assert r.returncode == 0, r.stderr
    entries = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["sequence"] for e in entries] == list(range(1, len(entries) + 1))
    assert {e["kind"] for e in entries} == {"remote_read", "replication", "erasure"}
    r = residency("status", *cluster.target())
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["node"]["role"] == "primary"
    assert {d["region"] for d in status["replication"]["destinations"]} == {"ap-southeast-1", "eu-west-1"}


def test_a_bad_field_assignment_is_a_usage_error():
    r = residency(
        "records",
        "put",
        "--target",
        "127.0.0.1:1",
        "--location",
        PRIMARY,
        "--purpose",
        "essential.service",
        "u",
        "no-equals-sign",
    )
    assert r.returncode == 2 and "FIELD=VALUE" in r.stderr


def test_demo_runs_end_to_end_and_reports_per_region(tmp_path: Path):
    r = residency("demo", "--users", "60", "--dir", str(tmp_path / "demo"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "60 users written to cn-north" in out
    for region in ("ap-southeast-1", "eu-west-1"):
        assert f"{region}: 60 copies held" in out
    assert out.count("check: fields held there = fields sent: yes") == 2
    assert "national_id (60, never_transfer)" in out
    assert "PERMISSION_DENIED" in out  # the refused sample read
    assert "release before approval: FAILED_PRECONDITION" in out  # the two-person rule
    assert "approved by a second person" in out and "released to the service:" in out
    assert "writing users" in r.stderr and "replicating" in r.stderr  # progress shown
    assert (tmp_path / "demo" / "cn-north.yaml").is_file()  # --dir keeps the deployment
    assert "exported and verified offline against its signed checkpoint" in out
    pinned = tmp_path / "demo" / "keys" / "cn-north" / "log.pub"
    assert f"residency log verify {tmp_path / 'demo' / 'review' / 'cn-north'} --key {pinned}" in r.stdout
    r = residency("log", "verify", str(tmp_path / "demo" / "review" / "cn-north"), "--key", str(pinned))
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is True
    assert json.loads(r.stdout)["key"] == "pinned"


def test_init_never_overwrites_a_deployments_keys(tmp_path: Path):
    d = tmp_path / "d"
    assert residency("init", str(d)).returncode == 0
    before = {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    assert stat.S_IMODE((d / "keys").stat().st_mode) == 0o700
    r = residency("init", str(d))
    assert r.returncode == 2 and "init never overwrites" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} == before


def test_node_certificates_name_the_hosts_callers_dial(tmp_path: Path):
    from cryptography import x509

    d = tmp_path / "d"
    assert residency("init", str(d)).returncode == 0

    def sans(path: Path) -> set[str]:
        ext = x509.load_pem_x509_certificate(path.read_bytes()).extensions
        names = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n.value) for n in names if not isinstance(n, x509.UniformResourceIdentifier)}

    # init's: loopback, and the region's name (its host name in deploy/compose.yaml)
    assert sans(d / "pki" / "eu-west-1.crt") == {"localhost", "127.0.0.1", "eu-west-1"}
    out = tmp_path / "sg"
    args = ["--deployment", str(d), "--role", "node", "--region", "ap-southeast-1", "--name", "region"]
    r = residency(
        "certs", "issue", *args, "--host", "sg.residency.example", "--host", "203.0.113.10", "--out", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert sans(out.with_suffix(".crt")) == {"sg.residency.example", "203.0.113.10"}
    service = ["--deployment", str(d), "--role", "service", "--region", "cn-north", "--name", "app"]
    r = residency("certs", "issue", *service, "--host", "x.example", "--out", str(tmp_path / "app"))
    assert r.returncode == 2 and "--host is for node certificates" in r.stderr
    assert not (tmp_path / "app.crt").exists()
