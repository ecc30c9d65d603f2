"""The store as each of its callers sees it: one Protocol per caller, combined from the
repositories' narrow Protocols, so that mypy flags a call outside a caller's role.

`SqliteStore` and `PostgresStore` satisfy every one of them; callers never name them (the
composition root opens one and hands it down).
"""

from __future__ import annotations

from typing import Protocol

from residency.server.storage.consents import ConsentStore
from residency.server.storage.database import UnitOfWork
from residency.server.storage.disclosures import DisclosureStore
from residency.server.storage.keyring import KeyStore
from residency.server.storage.limits import LimitStore
from residency.server.storage.lookup import LookupStore
from residency.server.storage.records import RecordStore
from residency.server.storage.replication import (
    FenceStore,
    OutboxStore,
    ReplicationControlStore,
    ReplicationStore,
)
from residency.server.storage.rules_state import RulesStateStore
from residency.server.storage.transferlog import LogStore, LogWriter


class VaultStore(
    RecordStore,
    KeyStore,
    OutboxStore,
    FenceStore,
    ConsentStore,
    DisclosureStore,
    LookupStore,
    RulesStateStore,
    LimitStore,
    LogWriter,
    Protocol,
):
    """`Records.store`, which every vault operation uses: writes, reads and erasure, copies
    applied (behind the lease-epoch fence), consents, grants, disclosure requests, retention
    sweeps, rule changes (and their re-projection's state) and blind indexes."""


class WorkerStore(UnitOfWork, ReplicationStore, LogWriter, Protocol):
    """A replication worker's store thread: the outbox, leases, dead letters, log entries."""


class ServiceStore(
    UnitOfWork, RecordStore, ConsentStore, ReplicationControlStore, LogStore, LogWriter, LimitStore, Protocol
):
    """The gRPC servicers' store thread: status counts, consents and grants listed, replication
    control, the transfer log read, and refused callers logged."""
