"""Reviewers' reports over transfer-log entries (pure: entries in, text out).

`render` writes one self-contained HTML page (`page`: inline CSS and hand-written SVG charts,
no scripts, no external assets: it opens offline), CSV (`tables`: one row per entry) or JSON
Lines. The page shows integrity first, then transfers by destination, category, legal basis,
purpose and outcome, a timeline, denied and failed attempts, recipients' identity, the
cumulative distinct individuals sent abroad per destination country per calendar year against
the PIPL/CAC thresholds (`figures`), and optionally one data subject's "where did my data go".
"""

from __future__ import annotations

import json
from typing import Any

from residency.server.core.report import page, tables
from residency.server.core.report.figures import Integrity
from residency.server.core.translog import about


def render(
    fmt: str,
    entries: list[bytes],
    context: dict[str, Any],
    check: Integrity,
    subject: str | None = None,
    now: float | None = None,
) -> str:
    rows = [json.loads(e) for e in entries]
    if fmt == "jsonl":
        chosen = [e for e, r in zip(entries, rows, strict=True) if not subject or about(r, subject)]
        return "".join(e.decode() + "\n" for e in chosen)
    if fmt == "csv":
        return tables.csv_text([r for r in rows if not subject or about(r, subject)])
    return page.render_page(rows, context, check, subject, now)
