"""Reviewer reports from entries (pure): threshold counting and warnings, formats."""

from __future__ import annotations

from datetime import UTC, datetime

from residency.server.core.report import figures

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
