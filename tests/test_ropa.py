"""The record of processing (issue 18.4): `residency rules ropa` per recipient from the rules
file, offline, with the volumes of a verified transfer-log bundle."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from residency.cli.main import main
from residency.server.deployment import init_deployment
from tests.conftest import Cluster

SG, IE = "ap-southeast-1", "eu-west-1"


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    d = tmp_path / "deployment"
    init_deployment(d)
    return d


def ropa(capsys: pytest.CaptureFixture[str], d: Path, out: Path, *extra: str, rules: str = "rules.yaml"):
    capsys.readouterr()
    code = main(
        ["rules", "ropa", "--schema", str(d / "schema.yaml"), str(d / rules), "--out", str(out), *extra]
    )
    got = capsys.readouterr()
    return code, got.out, got.err


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_the_csv_has_a_row_per_rule_with_its_recipient_safeguards_and_retention(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "ropa.csv"
    code, printed, err = ropa(capsys, deployment, out)
    assert code == 0, err
    assert json.loads(printed) == {"out": str(out), "format": "csv", "recipients": 2, "rules": 4}
    found = {r["rule"]: r for r in rows(out)}
    assert set(found) == {"sg-service", "ie-analytics", "ie-support", "ie-marketing"}
    sg = found["sg-service"]
    assert (sg["section"], sg["recipient"], sg["company"], sg["contact"]) == (
        "processing",
        "sg-affiliate",
        "Example Holdings Pte. Ltd.",
        "dpo@example.sg",
    )
    assert (sg["region"], sg["country"], sg["legal_basis"], sg["retention_days"]) == (
        SG,
        "SG",
        "contract",
        "365",
    )
    assert sg["safeguards"].startswith("cac_standard_contract:") and "Jing-HT-2025-0173" in sg["safeguards"]
    assert "email" in sg["fields"].split(";") and "address" not in sg["fields"].split(";")
    assert sg["excluded"] == "user.contact.address"
    marketing = found["ie-marketing"]
    assert marketing["country"] == "IE" and marketing["legal_basis"] == "consent"
    assert marketing["requires_consent"] == "true" and marketing["purposes"] == "marketing.communications"
    assert {s.split(":")[0] for s in marketing["safeguards"].split(";")} == {"cac_standard_contract", "scc"}
    assert marketing["retention_days"] == "90"


def test_the_page_names_each_recipient_its_country_safeguards_and_retention(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "ropa.html"
    code, _, err = ropa(capsys, deployment, out)
    assert code == 0, err
    page = out.read_text()
    for needle in (
        "Record of processing activities",
        "Example Holdings Pte. Ltd.",
        "dpo@example.sg",
        "Singapore (SG)",
        "Example Europe Ltd.",
        "Ireland (IE)",
        "CAC standard contract (PIPL Art. 38): filed with the Beijing CAC",
        "EU standard contractual clauses: EU SCCs 2021/914 module 1",
        "180 days",
        "consent (the user's consent required)",
        "user.government_id",  # never leaves the home region
        "No log bundle was given",
    ):
        assert needle in page, needle
    assert "<script" not in page and "http" not in page


def test_a_rule_without_safeguards_shows_none_stated_and_the_regions_country_is_the_default(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    text = (deployment / "rules.yaml").read_text()
    text = text.replace("    country: SG\n", "")
    start = text.index("    safeguards:")
    end = text.index("  - id: ie-analytics")
    (deployment / "bare.yaml").write_text(text[:start] + text[end:])
    out = tmp_path / "bare.csv"
    code, _, err = ropa(capsys, deployment, out, rules="bare.yaml")
    assert code == 0, err
    sg = next(r for r in rows(out) if r["rule"] == "sg-service")
    assert sg["country"] == "SG" and sg["safeguards"] == ""  # the region's country, no safeguard
    html = tmp_path / "bare.html"
    assert ropa(capsys, deployment, html, rules="bare.yaml")[0] == 0
    assert "none stated" in html.read_text()


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("kind: cac_standard_contract,", "kind: contract,", "safeguards[0].kind must be one of"),
        (
            'reference: "filed with the Beijing CAC, no. Jing-HT-2025-0173"',
            'reference: ""',
            "safeguards[0].reference",
        ),
        ("kind: cac_standard_contract, ", "", "safeguards[0].kind is required"),
        (
            "{kind: cac_standard_contract, ",
            "{filing: x, kind: cac_standard_contract, ",
            "safeguards[0] has unknown key(s) ['filing']",
        ),
        (
            "    country: SG\n",
            "    country: Singapore\n",
            "country: 'Singapore' is not an ISO 3166-1 alpha-2",
        ),
        ("    country: SG\n", "    country: XX\n", "'XX' is not an ISO 3166-1 alpha-2 country code"),
    ],
)
def test_invalid_safeguards_and_countries_are_refused_naming_the_key(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, says: str
):
    text = (deployment / "rules.yaml").read_text()
    assert old in text
    (deployment / "bad.yaml").write_text(text.replace(old, new, 1))
    out = tmp_path / "ropa.html"
    code, printed, err = ropa(capsys, deployment, out, rules="bad.yaml")
    assert code == 1 and printed == "" and says in err, err
    assert "bad.yaml" in err and not out.exists()
    # The node refuses it the same way: `rules check` reads it with the same loader.
    capsys.readouterr()
    assert (
        main(["rules", "check", str(deployment / "bad.yaml"), "--schema", str(deployment / "schema.yaml")])
        == 1
    )
    assert says in capsys.readouterr().err


def test_an_output_that_is_neither_html_nor_csv_is_a_usage_error(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code, _, err = ropa(capsys, deployment, tmp_path / "ropa.pdf")
    assert code == 2 and ".html or a .csv" in err


def _sent(entries: list[dict], region: str, field: str) -> list[dict]:
    return [
        e
        for e in entries
        if e["kind"] in ("replication", "remote_read")
        and e["outcome"] == "allowed"
        and e["destination_region"] == region
        and any(f["name"] == field for f in e["fields"])
    ]


async def test_volumes_come_from_a_verified_bundle_and_a_tampered_one_gives_none(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    users = [f"v-{i}" for i in range(3)]
    await cluster.consent(users[0], "marketing.communications", "ie-affiliate")
    for u in users:
        await cluster.put(u, {"name": "Chen Jie", "email": f"{u}@example.cn", "phone": "+8613700137000"})
    await cluster.replicated()
    await cluster.get(users[1], location=SG)  # a read from abroad counts too
    bundle = tmp_path / "bundle"
    export = ["log", "export", *cluster.target("reviewer"), "--out", str(bundle)]
    assert await asyncio.to_thread(main, export) == 0
    entries = [json.loads(line) for line in (bundle / "entries.jsonl").read_text().splitlines()]
    year = datetime.now(UTC).year

    out = tmp_path / "ropa.csv"
    code, printed, err = ropa(
        capsys, cluster.dir, out, "--bundle", str(bundle), "--key", str(bundle / "log.pub")
    )
    assert code == 0, err
    summary = json.loads(printed)
    assert summary["bundle"]["key"] == "pinned" and summary["bundle"]["tree_size"] == len(entries)
    volume = {(r["recipient"], r["category"], r["year"]): r for r in rows(out) if r["section"] == "volume"}
    email = volume[("sg-affiliate", "user.contact.email", str(year))]
    assert email["individuals"] == "3" and email["company"] == "Example Holdings Pte. Ltd."
    assert int(email["records"]) == len(_sent(entries, SG, "email")) >= 4  # three copies and a read
    phone = volume[("ie-affiliate", "user.contact.phone_number", str(year))]
    assert phone["individuals"] == "1" and int(phone["records"]) == len(_sent(entries, IE, "phone"))
    assert not any(k[1] == "user.government_id" for k in volume)

    html = tmp_path / "ropa.html"
    code, _, err = ropa(capsys, cluster.dir, html, "--bundle", str(bundle), "--key", str(bundle / "log.pub"))
    assert code == 0, err
    page = html.read_text()
    assert (
        "Counted from a bundle verified against its signed checkpoint" in page and f"<td>{year}</td>" in page
    )

    # One entry changed: the bundle does not verify, and no record is written from it.
    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    lines = (bad / "entries.jsonl").read_text().splitlines(keepends=True)
    i = next(i for i, e in enumerate(entries) if e["kind"] == "replication")
    assert '"outcome":"allowed"' in lines[i]
    lines[i] = lines[i].replace('"outcome":"allowed"', '"outcome":"denied"')
    (bad / "entries.jsonl").write_text("".join(lines))
    gone = tmp_path / "tampered.csv"
    code, printed, err = ropa(
        capsys, cluster.dir, gone, "--bundle", str(bad), "--key", str(bundle / "log.pub")
    )
    assert code == 1 and printed == "" and "does not verify" in err and not gone.exists()
