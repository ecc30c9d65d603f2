"""`SqliteStore`, the store a node opens: one SQLite database with every repository on it.

Callers hold this one object but are typed by the narrow Protocols they use (each
repository's module, combined per caller in `residency.server.storage.roles`).
A write and its outbox and log entries commit in one transaction.
"""

from __future__ import annotations

from residency.server.storage.consents import ConsentRows
from residency.server.storage.disclosures import DisclosureRows
from residency.server.storage.keyring import KeyringRows
from residency.server.storage.lookup import LookupRows
from residency.server.storage.records import RecordRows
from residency.server.storage.replication import ReplicationRows
from residency.server.storage.restores import RestoreRows
from residency.server.storage.rules_state import RulesStateRows
from residency.server.storage.transferlog import TransferLogRows


class SqliteStore(
    TransferLogRows,
    RecordRows,
    ReplicationRows,
    KeyringRows,
    ConsentRows,
    DisclosureRows,
    RestoreRows,
    LookupRows,
    RulesStateRows,
):
    """The node's store: `Database` (connection, lock, migrations, unit of work) with the
    records, outbox and replication control, transfer log, keyring, consent, disclosure and
    blind-index and rules-state repositories, and what a restore from a backup reads and writes."""
