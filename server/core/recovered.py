"""What a store restored from a backup must do again, read from the transfer-log entries it
recovered from the archive (those its backup predates): erasures to re-apply, consent changes
to replay, and which users' copies left with versions the backup does not hold. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from residency.server.core.policy.consent import ConsentChange
from residency.server.core.policy.erasure import ERASED

# Who the log entry of a restore names, and how its reason states the epoch it raised.
RESTORE_ACTOR = "residency restore"
_EPOCH = re.compile(r"restore epoch (\d+)")
# How a consent entry's reason names a sensitive consent (`policy.consent.change_reason`).
_SENSITIVE = "(sensitive personal information)"


@dataclass(frozen=True, slots=True)
class ConsentReplay:
    """A consent change a recovered entry records, to be made again in the restored store
    (its evidence: the entry it was read from)."""

    change: ConsentChange
    withdraw: bool
    actor: str


@dataclass(slots=True)
class Recovered:
    # Users whose erasure the log shows (the home's own erasure entry, or their tombstone
    # sent to a destination), in log order.
    erased: list[str] = field(default_factory=list)
    consents: list[ConsentReplay] = field(default_factory=list)
    # Each user whose copy (or tombstone) left for a destination: the highest version sent.
    sent: dict[str, int] = field(default_factory=dict)
    # The highest restore epoch a recovered restore entry states (0: none).
    epoch: int = 0


def read_recovered(entries: Iterable[Mapping[str, Any]], home: str) -> Recovered:
    """Reads the home's own acts out of recovered entries (`home`: the store's region)."""
    out = Recovered()
    erased: dict[str, None] = {}
    for e in entries:
        kind, user = e.get("kind"), str(e.get("subject", ""))
        if e.get("actor") == RESTORE_ACTOR and (m := _EPOCH.search(str(e.get("reason", "")))):
            out.epoch = max(out.epoch, int(m[1]))
        if not user or e.get("source_region") != home:
            continue
        if kind == "erasure" and e.get("destination_region") == home and e.get("outcome") == "allowed":
            erased[user] = None  # the home's own erasure entry (`vault.records.delete`)
        elif kind in ("replication", "erasure") and e.get("actor") == "replicator":
            out.sent[user] = max(out.sent.get(user, 0), int(e.get("record_version", 0)))
            if kind == "erasure" and e.get("reason") == ERASED:
                erased[user] = None
        elif kind == "consent" and e.get("outcome") == "allowed":
            reason = str(e.get("reason", ""))
            change = ConsentChange(
                user,
                str(e.get("purpose", "")),
                str(e.get("recipient", "")),
                _SENSITIVE in reason,
                f"re-applied at a restore from transfer-log entry {e.get('sequence')}",
            )
            out.consents.append(
                ConsentReplay(change, reason.startswith("withdrawn"), str(e.get("actor", "")))
            )
    out.erased = list(erased)
    return out


def to_reversion(sent: Mapping[str, int], backlog: Iterable[str], held: Mapping[str, int]) -> list[str]:
    """The users to give a new version: those still queued for some destination when the
    backup was taken (`backlog`: the lost store may have sent them on since), and those a copy
    of which left with a version the backup does not hold (`held`: each live user's version
    in the backup). Only users live in the backup can be given one; in user order."""
    newer = {u for u, v in sent.items() if u in held and v > held[u]}
    return sorted((newer | set(backlog)) & set(held))
