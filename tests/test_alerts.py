"""The alert rules and the dashboard (`deploy/prometheus/`, `deploy/grafana/`): promtool checks
the rules and runs their unit tests, every query in the dashboard parses, and every metric they
name is one the nodes serve (the table in docs/operators.md, which tests/test_metrics.py holds
to a live node's metrics)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "residency.json"
promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="Debian's prometheus (promtool) is not installed (.ci/run installs it)",
)


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "operators.md").read_text()
    return set(re.findall(r"^\| `(residency_[a-z_]+)` \|", text, re.M))


def named_metrics(expr: str) -> set[str]:
    names = set(re.findall(r"\bresidency_[a-z_]+", expr))
    # A histogram's series: NAME_bucket, NAME_sum, NAME_count.
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


@promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    for args in (["check", "rules", ALERTS.name], ["test", "rules", "alerts.test.yml"]):
        r = subprocess.run(
            ["promtool", *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_the_runbook_needs_is_there():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert names == {
        "ResidencyReplicationLagging",
        "ResidencyDeadLetters",
        "ResidencyCheckpointStale",
        "ResidencyKeyServiceErrors",
        "ResidencyDestinationPaused",
        "ResidencyCertificateExpiring",
    }
    readme = (ROOT / "README.md").read_text()
    assert all(name in readme for name in names), "the runbook says what each alert means"
    assert all(r["annotations"]["summary"] and r["labels"]["severity"] for r in rules)


def test_alerts_and_dashboard_name_only_metrics_the_nodes_serve():
    served = documented_metrics()
    assert len(served) >= 15
    exprs = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    for expr in exprs + dashboard_queries():
        assert named_metrics(expr) and named_metrics(expr) <= served, expr


@promtool
def test_every_dashboard_query_parses(tmp_path: Path):
    """Each panel's query, written as a recording rule, passes `promtool check rules`."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:panel_{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(queries)} rules found" in r.stdout
