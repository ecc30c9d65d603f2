"""The CSV form of a report: one row per transfer-log entry, a fixed set of columns."""

from __future__ import annotations

import csv
import io
from typing import Any

from residency.server.core.report.figures import destination, iso

CSV_COLUMNS = (
    "sequence",
    "leaf_index",
    "time",
    "kind",
    "subject",
    "source_region",
    "destination_region",
    "destination_country",
    "recipient",
    "purpose",
    "legal_bases",
    "rules",
    "fields",
    "forms",
    "categories",
    "withheld",
    "outcome",
    "reason",
    "actor",
    "rules_version",
    "record_version",
)


def csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        fields = r.get("fields", [])
        w.writerow(
            [
                r["sequence"],
                r["sequence"] - 1,
                iso(r["time"]),
                r["kind"],
                r["subject"] or ";".join(r.get("subjects", [])),
                r["source_region"],
                r["destination_region"],
                destination(r),
                r["recipient"],
                r["purpose"],
                ";".join(sorted({f["legal_basis"] for f in fields if f.get("legal_basis")})),
                ";".join(sorted({f["rule"] for f in fields if f.get("rule")})),
                ";".join(f["name"] for f in fields),
                ";".join(f"{n}={form}" for n, form in sorted(r.get("forms", {}).items())),
                ";".join(sorted({f["category"] for f in fields})),
                ";".join(f"{w['name']}:{w['reason']}" for w in r.get("withheld", [])),
                r["outcome"],
                r["reason"],
                r["actor"],
                r["rules_version"],
                r["record_version"],
            ]
        )
    return out.getvalue()
