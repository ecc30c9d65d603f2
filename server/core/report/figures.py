"""What reviewers' reports count: the integrity of the entries against their signed checkpoint,
where each region's servers are, and the PIPL/CAC cross-border thresholds per country and year."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from residency.server.core import merkle
from residency.server.core.checkpoint import CheckpointError, open_note, parse_verifier_key

# Kinds whose allowed entries move personal data to (or let it be read from) another place.
TRANSFER_KINDS = frozenset({"replication", "remote_read", "disclosure"})
# Where each known region's servers are; a region not listed is shown by its own name.
REGION_COUNTRY = {
    "cn-north": "China",
    "ap-southeast-1": "Singapore",
    "eu-west-1": "Ireland",
    "us-east-1": "United States",
}
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
    return REGION_COUNTRY.get(region, region)


def thresholds(
    rows: Iterable[dict[str, Any]], sensitive_fields: set[str], home_region: str
) -> list[dict[str, Any]]:
    """Distinct individuals whose data went abroad, per destination country and calendar
    year (and those with sensitive data among them), with the thresholds they approach."""
    people: dict[tuple[str, int], set[str]] = defaultdict(set)
    sensitive: dict[tuple[str, int], set[str]] = defaultdict(set)
    home = country(home_region)
    for r in rows:
        dest = country(r["destination_region"])
        # A disclosure to a third party names no region: no country to count it against.
        if not crossed_border(r) or not r["destination_region"] or dest == home:
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
