"""The node's policy operations, one base class per clause module of this package; each runs
on the store thread inside a transaction (see `residency.server.storage.thread`), so a change,
its transfer-log entry and the record version that makes the replicator project the user's
copies again commit together."""

from __future__ import annotations

from residency.server.vault.consents import Consents
from residency.server.vault.disclosures import Disclosures
from residency.server.vault.grants import Grants
from residency.server.vault.records import Records
from residency.server.vault.region_copies import RegionCopies
from residency.server.vault.retention import Retention
from residency.server.vault.rules_change import RulesChange


class Policy(Consents, Grants, Disclosures, Retention, RulesChange, RegionCopies):
    def __init__(self, records: Records):
        self.records = records
