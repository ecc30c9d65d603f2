"""A data subject's export as a person reads it (pure: the archive's documents in, one
self-contained HTML page out, no scripts), and where each copy went, worked out from the
subject's verified transfer-log entries alone."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from residency.server.core import countries
from residency.server.core.policy.erasure import ERASED_HERE
from residency.server.core.report.figures import REGION_COUNTRY, iso
from residency.server.core.report.page import CSS, ENTRY_HEADERS, entry_row, esc, table
from residency.server.core.report.ropa import SAFEGUARD_NAMES

# Entries that put a copy in a region (replication) or take it away (erasure: an erased
# record, or a copy nothing allows any more).
COPY_KINDS = frozenset({"replication", "erasure"})


# The reason of the `erasure` entry a home erasure logs (`Records.delete`): what the id held
# before it is another person's, should the id be given out again.


def after_erasure(rows: list[dict[str, Any]]) -> tuple[int, float]:
    """(sequence, time) of the last home erasure among a subject's entries (in log order), or
    (0, 0.0): an export holds only what came after it, the current record's."""
    for r in reversed(rows):
        home = r.get("kind") == "erasure" and r.get("destination_region") == r.get("source_region")
        if home and str(r.get("reason", "")).startswith(ERASED_HERE):
            return int(r["sequence"]), float(r["time"])
    return 0, 0.0


def rules_text(recipients: list[dict[str, Any]], rules: list[dict[str, Any]]) -> str:
    """The bytes of an export's `rules.json` (as text): the recipients and rules in force."""
    doc = {"recipients": recipients, "rules": rules}
    return json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def commitment(earlier_leaves: Iterable[bytes], rules_file: str) -> dict[str, Any]:
    """What an export's own `access` entry commits to, so that `subject verify` can tell a
    set of entries thinned out, or a rules.json edited, from the export as made: the number
    of the subject's entries before it (since the id's last erasure), SHA-256 over their leaf
    hashes in log order, and SHA-256 of rules.json's bytes."""
    h, n = hashlib.sha256(), 0
    for leaf in earlier_leaves:
        h.update(leaf)
        n += 1
    return {
        "earlier_entries": n,
        "earlier_sha256": h.hexdigest(),
        "rules_sha256": hashlib.sha256(rules_file.encode()).hexdigest(),
    }


def copies(rows: list[dict[str, Any]], rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per region the subject's data was copied to: the last copy entry's state (`held` or
    `withdrawn`), with what it holds and under which rule, legal basis, retention and
    safeguards. `rows` are the subject's entries in log order; `rules` the rules in force."""
    by_id = {r["id"]: r for r in rules}
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        # The home's own erasure entry (source and destination alike) puts no copy anywhere.
        elsewhere = r["destination_region"] not in ("", r["source_region"])
        if r["kind"] in COPY_KINDS and r["outcome"] == "allowed" and elsewhere:
            last[r["destination_region"]] = r
    out = []
    for region, r in sorted(last.items()):
        held = r["kind"] == "replication"
        fields = []
        for f in r["fields"] if held else []:
            rule = by_id.get(f.get("rule", ""), {})
            fields.append(
                {
                    "name": f["name"],
                    "category": f["category"],
                    "rule": f.get("rule", ""),
                    "legal_basis": f.get("legal_basis", ""),
                    "purposes": f.get("purposes", []),
                    "retention_days": rule.get("retention_days", 0),
                    "safeguards": rule.get("safeguards", []),
                }
            )
        out.append(
            {
                "region": region,
                "country": REGION_COUNTRY.get(region, ""),
                "state": "held" if held else "withdrawn",
                "recipients": [x for x in r["recipient"].split(",") if x],
                "record_version": r["record_version"],
                "since": r["time"],
                "sequence": r["sequence"],
                "reason": r["reason"],
                "fields": fields,
            }
        )
    return out


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


def _when(t: Any) -> str:
    return iso(t) if isinstance(t, int | float) else str(t or "")


def _plain(name: str, prefix: str) -> str:
    """An API enum's name as words: DISCLOSURE_STATE_RELEASED -> released."""
    return name.removeprefix(prefix).replace("_", " ").lower()


def _country(code: str) -> str:
    return f"{countries.name(code)} ({code})" if code else "not stated"


def render_page(doc: dict[str, Any], now: float) -> str:
    """`doc`: record, categories (field -> category), copies, consents, disclosures,
    recipients, rows (the entries), checkpoint (origin, tree_size, root_hash, key_fingerprint)."""
    rec, cp = doc["record"], doc["checkpoint"]
    recipients = {r["id"]: r for r in doc["recipients"]}

    def who(rid: str) -> str:
        r = recipients.get(rid)
        return esc(f"{r['company']} ({r['contact']})") if r else esc(rid)

    parts = [
        f"<h1>Personal data held about {esc(rec['user_id'])}</h1>",
        f"<p class='sub'>Exported {esc(datetime.fromtimestamp(now, UTC).strftime('%Y-%m-%d %H:%M UTC'))}"
        f" from the home region {esc(rec['home_region'])}; record version {esc(rec['version'])}, "
        f"created {esc(rec['created_at'])}, last changed {esc(rec['updated_at'])}, source "
        f"{esc(rec['source'])}.</p>",
        f"<div class='card ok'><b>{len(doc['rows'])} transfer-log entries</b><span>each proved "
        f"included in the signed checkpoint of log {esc(cp['origin'])} at size {esc(cp['tree_size'])}"
        f"</span></div><p class='muted'>Root hash <code>{esc(cp['root_hash'])}</code>, signed with "
        f"the key of fingerprint <code>{esc(cp['key_fingerprint'])}</code>. Check it yourself: "
        "<code>residency subject verify DIR --key KEY</code> with the log's verifier key.</p>",
        "<h2>What is held in the home region</h2>",
        table(
            ["field", "category", "value"],
            [
                [esc(n), f"<code>{esc(doc['categories'].get(n, ''))}</code>", esc(_value(v))]
                for n, v in sorted(rec["fields"].items())
            ],
            "no fields",
        ),
    ]
    if rec["withheld"]:
        parts.append(
            "<p class='muted'>Not shown: "
            + esc(", ".join(f"{w['field']} ({w['detail']})" for w in rec["withheld"]))
            + "</p>"
        )
    parts += [
        "<h2>Where each copy went</h2>",
        table(
            [
                "region (country)",
                "recipient",
                "state",
                "fields, rule and legal basis",
                "retention, safeguards",
            ],
            [
                [
                    esc(f"{c['region']} ({countries.name(c['country']) if c['country'] else 'unknown'})"),
                    "<br>".join(who(x) for x in c["recipients"]) or "&mdash;",
                    f"{esc(c['state'])} since {esc(_when(c['since']))}<br><span class='muted'>entry "
                    f"{esc(c['sequence'])}, record version {esc(c['record_version'])}</span>",
                    "<br>".join(
                        esc(f"{f['name']} ({f['category']}): rule {f['rule']}, {f['legal_basis']}, for ")
                        + esc(", ".join(f["purposes"]))
                        for f in c["fields"]
                    )
                    or esc(c["reason"]),
                    "<br>".join(
                        esc(f"{f['rule']}: ")
                        + esc(
                            f"{f['retention_days']} days" if f["retention_days"] else "while the rule stands"
                        )
                        + "".join(
                            esc(f"; {SAFEGUARD_NAMES.get(g['kind'], g['kind'])}: {g['reference']}")
                            for g in f["safeguards"]
                        )
                        for f in {f["rule"]: f for f in c["fields"]}.values()
                    ),
                ]
                for c in doc["copies"]
            ],
            "no copy was ever made outside the home region",
        ),
        "<h2>Consents</h2>",
        table(
            ["purpose", "recipient", "sensitive", "given", "withdrawn", "evidence", "recorded by"],
            [
                [
                    f"<code>{esc(c['purpose'])}</code>",
                    who(c["recipient"]) if c["recipient"] else "the app itself",
                    "yes" if c["sensitive"] else "no",
                    esc(c["granted_at"]),
                    esc(c["withdrawn_at"] or "\u2014"),
                    esc(c["evidence"]),
                    f"<code>{esc(c['actor'])}</code>",
                ]
                for c in doc["consents"]
            ],
            "no consent on record",
        ),
        "<h2>Disclosures to third parties</h2>",
        table(
            ["request", "third party", "country", "ground", "fields", "state", "requested", "decided by"],
            [
                [
                    f"<code>{esc(d.get('id', ''))}</code>",
                    esc(d.get("third_party", "")),
                    esc(_country(d.get("destination_country", ""))),
                    esc(_plain(d.get("ground", ""), "DISCLOSURE_GROUND_")),
                    esc(", ".join(d.get("fields", [])) or "all the ground reaches"),
                    esc(_plain(d.get("state", ""), "DISCLOSURE_STATE_")),
                    esc(d.get("requested_at", "")),
                    f"<code>{esc(d.get('decided_by', ''))}</code>",
                ]
                for d in doc["disclosures"]
            ],
            "no disclosure requested",
        ),
        "<h2>Recipients</h2>",
        table(
            ["id", "company", "contact", "region", "country"],
            [
                [f"<code>{esc(r['id'])}</code>", esc(r["company"]), esc(r["contact"]), esc(r["region"])]
                + [esc(_country(r.get("country", "")))]
                for r in doc["recipients"]
            ],
        ),
        "<h2>Timeline of the transfer log</h2>",
        "<div style='overflow-x:auto'>"
        + table(ENTRY_HEADERS, [entry_row(r) for r in doc["rows"]])
        + "</div>",
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Personal data export"
        f"</title><style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n"
    )
