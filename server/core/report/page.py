"""The HTML form of a report: one self-contained page with inline CSS and SVG charts."""

from __future__ import annotations

import html
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from residency.server.core.report.figures import (
    Integrity,
    country,
    crossed_border,
    destination,
    iso,
    thresholds,
)
from residency.server.core.translog import about

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2330;
  background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
.sub{color:#5a6475;margin:0 0 16px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d5d9e0;border-radius:8px;padding:12px 16px;min-width:150px}
.card b{display:block;font-size:22px}
.card span{color:#5a6475;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.ok{border-left:6px solid #1a7f37}
.bad{border-left:6px solid #cf222e}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:2px 6px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.panel{background:#fff;border:1px solid #d5d9e0;border-radius:8px;padding:12px 16px}
.panel h3{margin:0 0 8px;font-size:14px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border-bottom:1px solid #e3e6eb;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4}
code{font:12px ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.denied{color:#cf222e;font-weight:600}
.failed{color:#9a6700;font-weight:600}
.allowed{color:#1a7f37}
.muted{color:#5a6475}
"""
_COLORS = {"allowed": "#2da44e", "denied": "#cf222e", "failed": "#d4a72c"}


def _place(r: dict[str, Any]) -> str:
    region = r["destination_region"]
    if region:
        return f"{region} ({country(region)})"
    return f"third party in {destination(r)}" if destination(r) else "third party (no country named)"


def _identity(recipients: dict[str, Any], rid: str) -> str:
    r = recipients.get(rid, {})
    return f"{r.get('company', rid)} ({r.get('contact', 'no contact on record')})"


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _bars(title: str, counts: Counter[str], width: int = 520) -> str:
    """A horizontal bar chart as inline SVG."""
    items = counts.most_common(12)
    if not items:
        return f'<div class="panel"><h3>{esc(title)}</h3><p class="muted">none</p></div>'
    top = max(v for _, v in items)
    label_w, bar_w, row = 230, width - 290, 22
    parts = [
        f'<svg role="img" aria-label="{esc(title)}" width="{width}" height="{row * len(items) + 4}" '
        f'viewBox="0 0 {width} {row * len(items) + 4}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (name, v) in enumerate(items):
        y = i * row + 2
        w = max(2, round(bar_w * v / top))
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12" fill="#1d2330">'
            f"<title>{esc(name)}</title>{esc(name if len(name) <= 34 else name[:33] + chr(0x2026))}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row - 6}" rx="3" fill="#3b6fd8"/>'
            f'<text x="{label_w + w + 6}" y="{y + 15}" font-size="12" fill="#1d2330">{v:,}</text>'
        )
    parts.append("</svg>")
    return f'<div class="panel"><h3>{esc(title)}</h3>{"".join(parts)}</div>'


_BUCKETS = (
    (1, "%H:%M:%S"),
    (10, "%H:%M:%S"),
    (60, "%H:%M"),
    (3600, "%d %H:00"),
    (86400, "%Y-%m-%d"),
    (86400 * 31, "%Y-%m"),
)


def _timeline(rows: list[dict[str, Any]], width: int = 1100, height: int = 220) -> str:
    """Entries per time bucket, stacked by outcome, as inline SVG. The bucket (minute, hour,
    day or month) is the finest that keeps the chart at 60 bars or fewer."""
    if not rows:
        return '<p class="muted">no entries</p>'
    times = [r["time"] for r in rows]
    lo, hi = min(times), max(times)
    size, label_format = 86400 * 31, "%Y-%m"
    for size, label_format in _BUCKETS:  # noqa: B007 (the loop picks the pair it stops at)
        if (hi - lo) / size < 60:
            break
    start = int(lo // size) * size
    n = int((hi - start) // size) + 1
    buckets: list[Counter[str]] = [Counter() for _ in range(n)]
    for r in rows:
        buckets[int((r["time"] - start) // size)][r["outcome"]] += 1
    top = max(sum(b.values()) for b in buckets)
    left, plot_h = 50, height - 60
    bw = min((width - left - 10) / n, 60)
    parts = [
        f'<svg role="img" aria-label="timeline" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{left}" y1="{10 + plot_h}" x2="{width - 10}" y2="{10 + plot_h}" stroke="#8c95a5"/>',
        f'<text x="{left - 6}" y="16" text-anchor="end" font-size="11" fill="#5a6475">{top:,}</text>',
        f'<text x="{left - 6}" y="{10 + plot_h}" text-anchor="end" font-size="11" fill="#5a6475">0</text>',
    ]
    label_every = max(1, n // 10)
    for i, b in enumerate(buckets):
        y = float(10 + plot_h)
        x = left + i * bw
        for outcome in ("allowed", "denied", "failed"):
            v = b.get(outcome, 0)
            if not v:
                continue
            h = plot_h * v / top
            y -= h
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                f'fill="{_COLORS[outcome]}"><title>{esc(outcome)}: {v}</title></rect>'
            )
        if i % label_every == 0:
            label = datetime.fromtimestamp(start + i * size, UTC).strftime(label_format)
            parts.append(
                f'<text x="{x + bw / 2:.1f}" y="{height - 22}" text-anchor="middle" font-size="11" '
                f'fill="#5a6475">{esc(label)}</text>'
            )
    for k, (outcome, color) in enumerate(_COLORS.items()):
        parts.append(
            f'<rect x="{left + k * 110}" y="{height - 12}" width="10" height="10" fill="{color}"/>'
            f'<text x="{left + k * 110 + 14}" y="{height - 3}" font-size="11">{outcome}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def table(headers: list[str], rows: list[list[str]], empty: str = "none") -> str:
    if not rows:
        return f'<p class="muted">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _field(r: dict[str, Any], name: str) -> str:
    """A field as a report lists it: its name, and the form it crossed in, if transformed."""
    form = r.get("forms", {}).get(name)
    return f"{name} ({form})" if form else name


def entry_row(r: dict[str, Any]) -> list[str]:
    fields = ", ".join(_field(r, f["name"]) for f in r.get("fields", []))
    withheld = ", ".join(f"{w['name']} ({w['reason']})" for w in r.get("withheld", []))
    bases = ", ".join(sorted({f["legal_basis"] for f in r.get("fields", []) if f.get("legal_basis")}))
    return [
        esc(r["sequence"] - 1),
        esc(iso(r["time"])),
        esc(r["kind"]),
        esc(r["subject"] or ", ".join(r.get("subjects", []))),
        esc(f"{r['source_region']} \u2192 {r['destination_region']}"),
        esc(r["recipient"] or "\u2014"),
        esc(r["purpose"]),
        esc(bases or "\u2014"),
        esc(fields or "\u2014"),
        f'<span class="muted">{esc(withheld)}</span>',
        f'<span class="{esc(r["outcome"])}">{esc(r["outcome"])}</span>'
        + (f"<br>{esc(r['reason'])}" if r["reason"] else ""),
    ]


ENTRY_HEADERS = [
    "index",
    "time (UTC)",
    "kind",
    "subject",
    "from \u2192 to",
    "recipient",
    "purpose",
    "legal basis",
    "fields sent",
    "withheld",
    "outcome",
]


def render_page(
    rows: list[dict[str, Any]],
    context: dict[str, Any],
    check: Integrity,
    subject: str | None,
    now: float | None,
) -> str:
    region = context.get("region", "")
    home = context.get("home_region", region)
    recipients = {r["id"]: r for r in context.get("recipients", [])}
    sensitive = set(context.get("sensitive_fields", []))
    crossed = [r for r in rows if crossed_border(r)]
    outcomes = Counter(r["outcome"] for r in rows)
    by_dest = Counter(_place(r) for r in crossed)
    by_cat: Counter[str] = Counter()
    by_basis: Counter[str] = Counter()
    by_purpose: Counter[str] = Counter()
    for r in crossed:
        # A replication serves the purposes of the rules it went under; a read states one.
        for purpose in (
            {r["purpose"]} if r["purpose"] else {p for f in r["fields"] for p in f.get("purposes", [])}
        ):
            by_purpose[purpose] += 1
        for f in r["fields"]:
            by_cat[f["category"]] += 1
            by_basis[f.get("legal_basis") or "(home region)"] += 1
    problems = [r for r in rows if r["outcome"] in ("denied", "failed")]
    generated = iso(now if now is not None else datetime.now(UTC).timestamp())

    status_class = "ok" if check.verified else "bad"
    status = "verified" if check.verified else "NOT VERIFIED"
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Transfer-log report \u2014 {esc(region)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Transfer-log report: {esc(region)}</h1>",
        f'<p class="sub">Generated {esc(generated)} \u00b7 rules version '
        f"<code>{esc(context.get('rules_version', ''))}</code> \u00b7 home region {esc(home)}</p>",
        "<h2>Integrity</h2>",
        '<div class="cards">',
        f'<div class="card {status_class}"><span>checkpoint</span><b>{status}</b></div>',
        f'<div class="card"><span>tree size</span><b>{check.tree_size:,}</b></div>',
        f'<div class="card"><span>signer</span><b style="font-size:15px">{esc(check.signer or "?")}</b>'
        "</div>",
        f'<div class="card"><span>transfers</span><b>{len(crossed):,}</b></div>',
        f'<div class="card"><span>denied / failed</span>'
        f"<b>{outcomes['denied']:,} / {outcomes['failed']:,}</b></div>",
        "</div>",
        f"<p>Root hash <code>{esc(check.root_hash)}</code><br>"
        f"Verifier key <code>{esc(check.verifier_key)}</code></p>",
    ]
    if check.problem:
        out.append(f'<p class="denied">{esc(check.problem)}</p>')
    out += [
        "<h2>Transfers</h2>",
        '<p class="muted">Entries where personal data left its region (allowed replications, '
        "cross-location reads and disclosures); a field counts once per entry.</p>",
        '<div class="grid">',
        _bars("By destination", by_dest),
        _bars("By data category (fields)", by_cat),
        _bars("By legal basis (fields)", by_basis),
        _bars("By purpose", by_purpose),
        _bars("All entries by outcome", outcomes),
        _bars("All entries by kind", Counter(r["kind"] for r in rows)),
        "</div>",
        "<h2>Timeline</h2>",
        f'<div class="panel">{_timeline(rows)}</div>',
        "<h2>Cross-border individuals per year (PIPL / CAC thresholds)</h2>",
        '<p class="muted">Distinct individuals whose personal data went to each destination country '
        "in each calendar year, counted from this log. Thresholds: 100,000 and 1,000,000 individuals; "
        "10,000 for sensitive personal information. A warning shows from 80% of a threshold.</p>",
    ]
    th = thresholds(rows, sensitive, home)
    out.append(
        table(
            ["destination country", "year", "individuals", "with sensitive data", "status"],
            [
                [
                    esc(t["country"]),
                    esc(t["year"]),
                    f"{t['individuals']:,}",
                    f"{t['sensitive']:,}",
                    " ".join(f'<span class="warn">\u26a0 {esc(w)}</span>' for w in t["warnings"])
                    or '<span class="allowed">below thresholds</span>',
                ]
                for t in th
            ],
            "no personal data went abroad",
        )
    )
    named = sorted({x for r in rows for x in r["recipient"].split(",") if x} | set(recipients))
    out += [
        "<h2>Recipients</h2>",
        table(
            ["recipient", "region", "company", "contact", "transfers"],
            [
                [
                    esc(rid),
                    esc(recipients.get(rid, {}).get("region", "?")),
                    esc(recipients.get(rid, {}).get("company", "not a rules recipient (e.g. a disclosure)")),
                    esc(recipients.get(rid, {}).get("contact", "")),
                    f"{sum(1 for r in crossed if rid in r['recipient'].split(',')):,}",
                ]
                for rid in named
            ],
        ),
        f"<h2>Denied and failed attempts ({len(problems):,})</h2>",
        table(ENTRY_HEADERS, [entry_row(r) for r in problems[-200:]], "none"),
    ]
    if len(problems) > 200:
        out.append(f'<p class="muted">the latest 200 of {len(problems):,} shown; the CSV has all</p>')
    if subject:
        mine = [r for r in rows if about(r, subject)]
        places = Counter(_place(r) for r in mine if crossed_border(r))
        fields_out = sorted({_field(r, f["name"]) for r in mine if crossed_border(r) for f in r["fields"]})
        who = sorted({x for r in mine if crossed_border(r) for x in r["recipient"].split(",") if x})
        out += [
            f"<h2>Where did the data of {esc(subject)} go?</h2>",
            '<div class="cards">',
            f'<div class="card"><span>entries</span><b>{len(mine):,}</b></div>',
            f'<div class="card"><span>destinations</span><b>{len(places)}</b></div>',
            f'<div class="card"><span>fields sent abroad</span><b>{len(fields_out)}</b></div>',
            "</div>",
            f"<p>Places: {esc(', '.join(places) or 'none')}<br>"
            f"Fields: {esc(', '.join(fields_out) or 'none')}<br>"
            f"Recipients: {esc('; '.join(_identity(recipients, x) for x in who) or 'none')}</p>",
            table(ENTRY_HEADERS, [entry_row(r) for r in mine], f"no entries about {subject}"),
        ]
    out.append(
        '<p class="muted" style="margin-top:32px">Check this report\'s figures offline: '
        "<code>residency log export</code> then <code>residency log verify DIR</code>.</p>"
    )
    out.append("</main></body></html>\n")
    return "\n".join(out)
