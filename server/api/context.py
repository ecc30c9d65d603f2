"""`Node`, what every servicer holds: the records engine, the store thread, the replicator
and the policy operations; and the request checks the servicers share."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from residency.server.api.health import Health
from residency.server.api.intake import Intake
from residency.server.api.tls import ServerTls
from residency.server.config.access import AccessPolicy
from residency.server.config.credentials import CredentialsConfig
from residency.server.config.node import Affiliate
from residency.server.core.errors import FailedPrecondition, InvalidRecord
from residency.server.core.policy.credentials import VerifyLimits
from residency.server.core.schema import USER_ID
from residency.server.storage.notices import Hearing
from residency.server.storage.roles import ServiceStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.copies import Home
from residency.server.vault.credentials import VerifyBuckets
from residency.server.vault.key_lifecycle import KeyLifecycle
from residency.server.vault.policy import Policy
from residency.server.vault.records import Records
from residency.server.vault.transferlog import TransferLog


class Node:
    """What the servicers share: the records engine, the store thread, the replicator."""

    def __init__(
        self,
        records: Records,
        db: StoreThread[ServiceStore],
        access: AccessPolicy,
        replicator: Any = None,
        affiliates: tuple[Affiliate, ...] = (),
        transfer_log: TransferLog | None = None,
        intake: Intake | None = None,
        credentials: CredentialsConfig | None = None,
        home: Home | None = None,
    ):
        self.records = records
        self.db = db
        # A region node's home and the key its copies must be signed with (None: the primary).
        self.home = home
        # Reads and checks PutRecords requests (large ones in helper processes).
        self.intake = intake or Intake(records.schema, records.region, workers=0)
        # The in-process replication worker, if this node runs one (it is woken on writes).
        self.replicator = replicator
        # Replication destinations; their state is in the store, whichever worker ships.
        self.affiliates = {a.region: a for a in affiliates}
        self.transfer_log = transfer_log
        self.policy = Policy(records)
        self.hashing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="credentials")
        limits = credentials or CredentialsConfig()
        self.verify_buckets = VerifyBuckets(
            VerifyLimits.per_minute(limits.per_user_per_minute, limits.per_caller_per_minute), db.store
        )
        # Re-projection after a rules change: (done, total).
        self.backfill = (0, 0)
        self.reload_rules: Any = None
        # The purposes each service may state (reread on SIGHUP).
        self.access = access
        # The node's TLS credentials (its certificate's expiry is in the node's status).
        self.tls: ServerTls | None = None
        # Whether it hears the other front ends of its store (PostgreSQL): while it does not,
        # calls on data are refused (`access.Gate`).
        self.hearing: Hearing | None = None
        # The node's key acts (rotate, rewrap, retire, shred, rekey).
        self.keys: KeyLifecycle | None = None
        # Readiness and its reasons (`GetNodeStatus` reports them).
        self.health: Health | None = None

    def set_backfill(self, done: int, total: int) -> None:
        self.backfill = (done, total)

    def wake(self) -> None:
        if self.replicator is not None:
            self.replicator.wake()

    def primary_only(self) -> None:
        """Refuses a call that changes master copies on a node that holds copies only."""
        if not self.records.primary:
            raise FailedPrecondition(
                f"{self.records.region} holds copies only; send this to the home region's primary"
            )


def check_user(user_id: str) -> None:
    if not USER_ID.fullmatch(user_id):
        raise InvalidRecord([("user_id", "must be 1-128 characters from [A-Za-z0-9._:@-]")])
