"""The record of processing activities (GDPR Art. 30; PIPL Art. 54-55 processing records) that
`residency rules ropa` renders from a rule set, with the volumes a verified log bundle shows
(pure: rules and entries in, HTML or CSV out)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from residency.server.core import countries
from residency.server.core.report.figures import REGION_COUNTRY, country_of, crossed_border
from residency.server.core.report.page import CSS, esc, table
from residency.server.core.rules import Rule, RuleSet, covers

SAFEGUARD_NAMES = {
    "scc": "EU standard contractual clauses",
    "cac_standard_contract": "CAC standard contract (PIPL Art. 38)",
    "certification": "certification",
    "adequacy": "adequacy decision",
}
# Kinds whose allowed entries put a recipient's hands on data: copies and its reads from abroad.
VOLUME_KINDS = frozenset({"replication", "remote_read"})
CSV_COLUMNS = (
    "section",
    "recipient",
    "company",
    "contact",
    "region",
    "country",
    "rule",
    "purposes",
    "categories",
    "fields",
    "excluded",
    "legal_basis",
    "requires_consent",
    "safeguards",
    "retention_days",
    "category",
    "year",
    "records",
    "individuals",
)


@dataclass(frozen=True)
class Volume:
    """What the log shows went to one recipient, for one category, in one calendar year."""

    recipient: str
    category: str
    year: int
    records: int  # record versions sent (a copy per write) and reads answered
    individuals: int  # distinct data subjects


def _fields(rules: RuleSet, rule: Rule) -> list[str]:
    """The schema fields a rule can send (never_transfer, exclusions and credentials aside)."""
    return sorted(
        name
        for name, s in rules.schema.fields.items()
        if any(covers(c, s.category) for c in rule.categories)
        and not any(covers(x, s.category) for x in (*rule.exclude, *rules.never_transfer))
        and not s.credential
    )


def volumes(rows: list[dict[str, Any]], rules: RuleSet) -> list[Volume]:
    """Records and distinct individuals per recipient, category and calendar year, from the
    allowed transfers among `rows` (entries of a verified bundle). A field names the rule it
    went under; a rule the current rules no longer have falls back to the entry's recipient."""
    by_rule = {r.id: r.recipient for r in rules.rules}
    records: dict[tuple[str, str, int], int] = defaultdict(int)
    people: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for r in rows:
        if r["kind"] not in VOLUME_KINDS or not crossed_border(r):
            continue
        year = datetime.fromtimestamp(r["time"], UTC).year
        for category, recipient in {
            (f["category"], by_rule.get(f.get("rule", ""), r["recipient"])) for f in r["fields"]
        }:
            key = (recipient, category, year)
            records[key] += 1
            people[key].add(r["subject"])
    return [Volume(k[0], k[1], k[2], records[k], len(people[k])) for k in sorted(records)]


def _safeguards(rule: Rule) -> str:
    return "; ".join(f"{SAFEGUARD_NAMES[g.kind]}: {g.reference}" for g in rule.safeguards)


def _retention(rule: Rule) -> str:
    return f"{rule.retention_days} days" if rule.retention_days else "as long as the rule stands"


def csv_text(rules: RuleSet, found: list[Volume] | None) -> str:
    """One `processing` row per rule (its recipient's columns repeated), then one `volume`
    row per recipient, category and year when a bundle was given."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    blank: dict[str, object] = dict.fromkeys(CSV_COLUMNS, "")
    for rule in rules.rules:
        rec = rules.recipients[rule.recipient]
        row = blank | {
            "section": "processing",
            "recipient": rec.id,
            "company": rec.company,
            "contact": rec.contact,
            "region": rec.region,
            "country": country_of(rec),
            "rule": rule.id,
            "purposes": ";".join(rule.purposes),
            "categories": ";".join(rule.categories),
            "fields": ";".join(_fields(rules, rule)),
            "excluded": ";".join(rule.exclude),
            "legal_basis": rule.legal_basis,
            "requires_consent": str(rule.requires_consent).lower(),
            "safeguards": ";".join(f"{g.kind}:{g.reference}" for g in rule.safeguards),
            "retention_days": rule.retention_days or "",
        }
        w.writerow(row.values())
    for v in found or []:
        known = rules.recipients.get(v.recipient)
        row = blank | {
            "section": "volume",
            "recipient": v.recipient,
            "company": known.company if known else "",
            "country": country_of(known) if known else "",
            "category": v.category,
            "year": v.year,
            "records": v.records,
            "individuals": v.individuals,
        }
        w.writerow(row.values())
    return out.getvalue()


def render_page(
    rules: RuleSet, found: list[Volume] | None, integrity: dict[str, Any] | None, now: float
) -> str:
    """The record as one self-contained page: controller, per recipient its rules, then the
    volumes (or why there are none)."""
    parts = [
        f"<h1>Record of processing activities</h1><p class='sub'>Home region {esc(rules.home_region)}"
        f" ({esc(countries.name(REGION_COUNTRY.get(rules.home_region, rules.home_region)))}); rules "
        f"version {esc(rules.version)} ({esc(rules.source)}); generated "
        f"{esc(datetime.fromtimestamp(now, UTC).strftime('%Y-%m-%d %H:%M UTC'))}</p>",
        "<p>Categories that never leave the home region: "
        + (", ".join(f"<code>{esc(c)}</code>" for c in rules.never_transfer) or "none")
        + ".</p>",
    ]
    for rid, rec in sorted(rules.recipients.items()):
        code = country_of(rec)
        parts.append(
            f"<h2 id='{esc(rid)}'>{esc(rec.company)}</h2><p>Recipient <code>{esc(rid)}</code>, region "
            f"{esc(rec.region)}, country {esc(countries.name(code) if code else 'not stated')}"
            f"{f' ({esc(code)})' if code else ''}; contact {esc(rec.contact)}</p>"
        )
        mine = [r for r in rules.rules if r.recipient == rid]
        parts.append(
            table(
                ["rule", "purposes", "categories (fields)", "legal basis", "safeguards", "retention"],
                [
                    [
                        f"<code>{esc(r.id)}</code>",
                        esc(", ".join(r.purposes)),
                        esc(", ".join(r.categories))
                        + (f"; not {esc(', '.join(r.exclude))}" if r.exclude else "")
                        + f"<br><span class='muted'>{esc(', '.join(_fields(rules, r)))}</span>",
                        esc(r.legal_basis) + (" (the user's consent required)" if r.requires_consent else ""),
                        esc(_safeguards(r)) or "<span class='denied'>none stated</span>",
                        esc(_retention(r)),
                    ]
                    for r in mine
                ],
                "no rule sends data to this recipient",
            )
        )
    parts.append("<h2>Volumes from the transfer log</h2>")
    if found is None:
        parts.append("<p class='muted'>No log bundle was given (<code>--bundle DIR</code>).</p>")
    else:
        assert integrity is not None
        parts.append(
            f"<p class='ok'>Counted from a bundle verified against its signed checkpoint: log "
            f"{esc(integrity['origin'])}, {integrity['tree_size']:,} entries, root "
            f"<code>{esc(integrity['root_hash'])}</code>, key {esc(integrity['key'])}.</p>"
        )
        parts.append(
            table(
                ["recipient", "category", "year", "records", "individuals"],
                [
                    [esc(v.recipient), f"<code>{esc(v.category)}</code>", str(v.year)]
                    + [f"{v.records:,}", f"{v.individuals:,}"]
                    for v in found
                ],
                "no transfer to a recipient in the bundle",
            )
        )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Record of processing "
        f"activities</title><style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n"
    )
