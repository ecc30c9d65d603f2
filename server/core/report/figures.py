"""What reviewers' reports count: the integrity of the entries against their signed checkpoint,
where each region's servers are, and the PIPL/CAC cross-border thresholds per country and year:
replications, reads from abroad and disclosures alike (data a foreign party can query counts
as exported)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from residency.server.core import countries, merkle
from residency.server.core.checkpoint import CheckpointError, open_note, parse_verifier_key
from residency.server.core.rules import Recipient

# Kinds whose allowed entries move personal data to (or let it be read from) another place.
TRANSFER_KINDS = frozenset({"replication", "remote_read", "disclosure"})
# Where each known region's servers are (ISO 3166-1 alpha-2); a region not listed is shown,
# and counted, by its own name.
REGION_COUNTRY = {"cn-north": "CN", "ap-southeast-1": "SG", "eu-west-1": "IE", "us-east-1": "US"}
# PIPL / CAC (Provisions on Promoting and Regulating Cross-Border Data Flows, 2024):
# individuals per calendar year, counted per exporter. Sensitive data has its own threshold.
THRESHOLDS = (100_000, 1_000_000)
SENSITIVE_THRESHOLD = 10_000
WARN_AT = 0.8  # warn when a count reaches this share of a threshold


@dataclass(frozen=True)
class Integrity:
    verified: bool
    tree_size: int
    root_hash: str
    signer: str
    verifier_key: str
    problem: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "checkpoint_verified": self.verified,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "signer": self.signer,
            **({"problem": self.problem} if self.problem else {}),
        }


def integrity(entries: list[bytes], note: str, key: str) -> Integrity:
    """Checks the checkpoint's signature and that `entries` hash to its root."""
    try:
        signer = parse_verifier_key(key)[0]
        cp = open_note(note, key)
    except CheckpointError as e:
        return Integrity(False, len(entries), "", "", key.strip(), f"checkpoint: {e}")
    root = merkle.root([merkle.leaf_hash(e) for e in entries])
    if cp.size != len(entries) or root != cp.root:
        problem = f"the {len(entries)} entries do not hash to the signed root of tree size {cp.size}"
        return Integrity(False, cp.size, cp.root.hex(), signer, key.strip(), problem)
    return Integrity(True, cp.size, cp.root.hex(), signer, key.strip())


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def crossed_border(r: dict[str, Any]) -> bool:
    """Personal data actually left its region in this entry."""
    return (
        r["kind"] in TRANSFER_KINDS
        and r["outcome"] == "allowed"
        and bool(r.get("fields"))
        and r["destination_region"] != r["source_region"]
    )


def country(region: str) -> str:
    """The name of the country a region's servers are in."""
    code = REGION_COUNTRY.get(region)
    return countries.name(code) if code else region


def country_of(r: Recipient) -> str:
    """A recipient's country code: as the rules file states it, else its region's ("" if
    neither is known)."""
    return r.country or REGION_COUNTRY.get(r.region, "")


def destination(r: dict[str, Any]) -> str:
    """The country an entry's data went to, by name: the one a disclosure names, or that of the
    destination region (a replication's, or a reader's location); "" when there is none (a
    disclosure logged before disclosures named their country)."""
    if r["kind"] == "disclosure":
        code = r.get("destination_country", "")
        return countries.name(code) if code else ""
    return country(r["destination_region"]) if r["destination_region"] else ""


def thresholds(
    rows: Iterable[dict[str, Any]], sensitive_fields: set[str], home_region: str
) -> list[dict[str, Any]]:
    """Distinct individuals whose data went abroad, per destination country and calendar
    year (and those with sensitive data among them), with the thresholds they approach. A
    replication counts against its region's country, a read against the reader's region's,
    a disclosure against the country it names."""
    people: dict[tuple[str, int], set[str]] = defaultdict(set)
    sensitive: dict[tuple[str, int], set[str]] = defaultdict(set)
    home = country(home_region)
    for r in rows:
        dest = destination(r)
        if not crossed_border(r) or not dest or dest == home:
            continue
        key = (dest, datetime.fromtimestamp(r["time"], UTC).year)
        people[key].add(r["subject"])
        if any(f["name"] in sensitive_fields for f in r["fields"]):
            sensitive[key].add(r["subject"])
    out = []
    for key in sorted(people):
        n, s = len(people[key]), len(sensitive[key])
        warnings = []
        for limit in THRESHOLDS:
            if n >= limit:
                warnings.append(f"reached {limit:,} individuals")
            elif n >= WARN_AT * limit:
                warnings.append(f"{n / limit:.0%} of {limit:,} individuals")
        if s >= SENSITIVE_THRESHOLD:
            warnings.append(f"reached {SENSITIVE_THRESHOLD:,} individuals with sensitive data")
        elif s >= WARN_AT * SENSITIVE_THRESHOLD:
            warnings.append(f"{s / SENSITIVE_THRESHOLD:.0%} of {SENSITIVE_THRESHOLD:,} with sensitive data")
        out.append(
            {"country": key[0], "year": key[1], "individuals": n, "sensitive": s, "warnings": warnings}
        )
    return out
