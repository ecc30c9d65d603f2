"""The transfer log's entries and their hash chain (pure; the store persists them).

An entry is canonical JSON: UTF-8, keys sorted, no insignificant spaces; those are exactly
the bytes that are hashed and exported. chain[n] = SHA-256(chain[n-1] || entry bytes[n]),
with chain[-1] = 32 zero bytes, so a changed, dropped or reordered entry breaks every later
hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = bytes(32)
KINDS = frozenset(
    {"replication", "remote_read", "disclosure", "erasure", "consent", "rules_change", "key_event", "grant"}
)
OUTCOMES = frozenset({"allowed", "denied", "failed"})


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(previous: bytes, entry_bytes: bytes) -> bytes:
    return hashlib.sha256(previous + entry_bytes).digest()


def verify_chain(entries: list[tuple[bytes, bytes]], previous: bytes = GENESIS) -> int | None:
    """Index of the first (entry bytes, chain hash) pair that does not follow, or None."""
    for i, (data, recorded) in enumerate(entries):
        previous = chain_hash(previous, data)
        if previous != recorded:
            return i
    return None


def entry(
    kind: str,
    *,
    time: float,
    subject: str,
    source_region: str,
    destination_region: str,
    outcome: str,
    actor: str,
    rules_version: str,
    recipient: str = "",
    purpose: str = "",
    fields: list[dict[str, Any]] | None = None,
    withheld: list[dict[str, Any]] | None = None,
    reason: str = "",
    version: int = 0,
) -> dict[str, Any]:
    """One transfer-log entry (without its sequence, which the store assigns).

    `fields` lists what crossed: name, category, and the rule, legal basis and purposes it
    crossed under. `withheld` lists what did not, with the reason. No field values, ever.
    """
    assert kind in KINDS and outcome in OUTCOMES, (kind, outcome)
    return {
        "kind": kind,
        "time": round(time, 6),
        "subject": subject,
        "source_region": source_region,
        "destination_region": destination_region,
        "recipient": recipient,
        "purpose": purpose,
        "fields": fields or [],
        "withheld": withheld or [],
        "outcome": outcome,
        "reason": reason,
        "actor": actor,
        "rules_version": rules_version,
        "record_version": version,
    }
