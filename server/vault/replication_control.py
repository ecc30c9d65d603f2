"""Operators' acts on replication (pause, resume, dead-letter retry), each committed with the
transfer-log entry (kind `admin`) that names the authenticated actor, the destination and what
it did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from residency.server.core import translog
from residency.server.storage.replication import ReplicationControlStore
from residency.server.storage.transferlog import LogWriter


class ControlStore(ReplicationControlStore, LogWriter, Protocol):
    """What an act on replication uses: the destination's state and the log, in one transaction."""


@dataclass(frozen=True, slots=True)
class Operator:
    """Who acts (a certificate's URI), on which node (its region) and under which rules."""

    actor: str
    region: str
    rules_version: str

    def entry(self, destination: str, reason: str) -> dict[str, Any]:
        return translog.admin(self.region, self.actor, self.rules_version, reason, destination)


def set_paused(store: ControlStore, by: Operator, destination: str, paused: bool) -> None:
    """Holds replication to `destination` (erasures and withdrawals included) until resumed, or
    lets it go on."""
    store.set_paused(destination, paused)
    said = "paused: replication held until resumed" if paused else "resumed: replication goes on"
    store.log_append([by.entry(destination, said)])


def retry(store: ControlStore, by: Operator, destinations: list[str]) -> int:
    """Marks each destination's dead letters to be sent again; one entry per destination says
    how many. Returns how many in all."""
    marked = {d: store.request_retry(d) for d in destinations}
    store.log_append(
        [by.entry(d, f"retried: {n} dead letters marked to be sent again") for d, n in marked.items()]
    )
    return sum(marked.values())
