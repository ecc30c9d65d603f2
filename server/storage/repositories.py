"""Every repository of the node's store in one class, which a backend completes with its
database (`SqliteStore`, `PostgresStore`): the records, outbox and replication control,
transfer log, keyring, consent, disclosure, blind-index, rules-state and credential-limit
tables, and what a restore from a backup reads and writes."""

from __future__ import annotations

from residency.server.storage.consents import ConsentRows
from residency.server.storage.disclosures import DisclosureRows
from residency.server.storage.keyring import KeyringRows
from residency.server.storage.limits import LimitRows
from residency.server.storage.lookup import LookupRows
from residency.server.storage.records import RecordRows
from residency.server.storage.replication import ReplicationRows
from residency.server.storage.restores import RestoreRows
from residency.server.storage.rules_state import RulesStateRows
from residency.server.storage.transferlog import TransferLogRows


class Repositories(
    TransferLogRows,
    RecordRows,
    ReplicationRows,
    KeyringRows,
    ConsentRows,
    DisclosureRows,
    RestoreRows,
    LookupRows,
    RulesStateRows,
    LimitRows,
):
    """The repositories; a store class lists this before its database class."""
