"""Reviewer reports from entries (pure): threshold counting and warnings, formats."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from residency.server.core import translog
from residency.server.core.report import figures, tables

JAN_2026 = datetime(2026, 1, 15, tzinfo=UTC).timestamp()
DEC_2025 = datetime(2025, 12, 31, 23, 0, tzinfo=UTC).timestamp()


def sent(subject: str, to: str, fields: list[str], t: float = JAN_2026, outcome: str = "allowed") -> dict:
    return {
        "kind": "replication",
        "time": t,
        "subject": subject,
        "source_region": "cn-north",
        "destination_region": to,
        "outcome": outcome,
        "fields": [{"name": f, "category": "user.x", "legal_basis": "contract"} for f in fields],
    }


def test_individuals_abroad_are_counted_once_per_country_and_calendar_year():
    rows = [
        sent("u-1", "ap-southeast-1", ["email"]),
        sent("u-1", "ap-southeast-1", ["name"]),  # the same person again
        sent("u-2", "ap-southeast-1", ["national_id"]),
        sent("u-1", "ap-southeast-1", ["email"], t=DEC_2025),  # another year
        sent("u-3", "eu-west-1", ["email"]),
        sent("u-4", "eu-west-1", ["email"], outcome="denied"),  # nothing went
        sent("u-5", "cn-north", ["email"]),  # not abroad
        {**sent("u-6", "", ["email"]), "kind": "disclosure"},  # a third party, no region
    ]
    got = {
        (t["country"], t["year"]): (t["individuals"], t["sensitive"])
        for t in figures.thresholds(rows, {"national_id"}, "cn-north")
    }
    assert got == {("Singapore", 2026): (2, 1), ("Singapore", 2025): (1, 0), ("Ireland", 2026): (1, 0)}


def test_a_warning_shows_as_a_threshold_nears_and_when_it_is_reached():
    rows = [sent(f"u-{i}", "eu-west-1", ["national_id"] if i < 8_500 else ["email"]) for i in range(85_000)]
    (t,) = figures.thresholds(rows, {"national_id"}, "cn-north")
    assert t["individuals"] == 85_000 and t["sensitive"] == 8_500
    assert t["warnings"] == ["85% of 100,000 individuals", "85% of 10,000 with sensitive data"]
    rows += [sent(f"v-{i}", "eu-west-1", ["national_id"]) for i in range(20_000)]
    (t,) = figures.thresholds(rows, {"national_id"}, "cn-north")
    assert "reached 100,000 individuals" in t["warnings"]
    assert "reached 10,000 individuals with sensitive data" in t["warnings"]


def test_disclosures_and_reads_from_abroad_count_like_replications():
    """Under PIPL, data a foreign party can query counts as exported: a disclosure counts
    against the country it names, a read against the country of the reader's region."""

    def disclosed(subject: str, code: str, fields: list[str], outcome: str = "allowed") -> dict:
        return {
            **sent(subject, "", fields, outcome=outcome),
            "kind": "disclosure",
            "destination_country": code,
        }

    rows = [
        sent("u-1", "ap-southeast-1", ["email"]),
        disclosed("u-1", "SG", ["email"]),  # the same person and country: counted once
        disclosed("u-2", "SG", ["national_id"]),
        disclosed("u-3", "JP", ["email"]),  # a country no region is in
        disclosed("u-4", "CN", ["email"]),  # at home: not abroad
        disclosed("u-5", "JP", ["email"], outcome="denied"),  # nothing went
        {**sent("u-6", "", ["email"]), "kind": "disclosure"},  # logged before countries were named
        {**sent("u-7", "eu-west-1", ["national_id"]), "kind": "remote_read"},
        {**sent("u-8", "cn-north", ["email"]), "kind": "remote_read"},  # read at home
    ]
    got = {
        (t["country"], t["year"]): (t["individuals"], t["sensitive"])
        for t in figures.thresholds(rows, {"national_id"}, "cn-north")
    }
    assert got == {("Singapore", 2026): (2, 1), ("Japan", 2026): (1, 0), ("Ireland", 2026): (1, 1)}


def test_every_report_row_names_the_country_its_data_went_to():
    base = translog.entry(
        "disclosure",
        subject="u-1",
        source_region="cn-north",
        destination_region="",
        outcome="allowed",
        actor="svc:a",
        rules_version="v1",
        destination_country="US",
    )
    rows = [
        {**base, "sequence": 1, "time": JAN_2026},
        {**base, "sequence": 2, "time": JAN_2026, "kind": "replication", "destination_region": "eu-west-1"},
    ]
    header, *lines = csv.reader(io.StringIO(tables.csv_text(rows)))
    at = header.index("destination_country")
    assert header[at - 1] == "destination_region"
    assert [line[at] for line in lines] == ["United States", "Ireland"]


def test_a_homes_own_erasure_entry_is_no_copy_in_the_subjects_copies():
    from residency.server.core.report.subject import copies

    held = {**sent("u-1", "ap-southeast-1", ["email"]), "recipient": "", "record_version": 1}
    held |= {"sequence": 1, "reason": ""}
    home = {**held, "kind": "erasure", "destination_region": "cn-north", "fields": [], "sequence": 2}
    assert [(c["region"], c["state"]) for c in copies([held, home], [])] == [("ap-southeast-1", "held")]
