"""What a node does with records: write, erase (primary), and read (primary and region).

Every method here runs on the store's thread, inside a transaction the caller opens, so a
write, its outbox entry and its transfer-log entries commit together or not at all. Values
are sealed before they reach the store; plaintext exists only in memory. The data keys are
the exception, in keys.db: a new user's key commits before the write (`prepare_keys`, the
write's `before` step) and an erased user's key is destroyed after the erasure commits.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Collection
from typing import Any

from residency.server.core import codec, translog
from residency.server.core.errors import NotFound
from residency.server.core.policy.consent import StandingConsent, consented_rules
from residency.server.core.policy.cookies import refused_cookie_writes
from residency.server.core.policy.credentials import user_bucket
from residency.server.core.policy.erasure import ERASED_HERE, expired_fields
from residency.server.core.policy.grants import split_grants
from residency.server.core.rules import (
    NO_RULE,
    RETENTION_EXPIRED,
    Allowed,
    Grant,
    Permits,
    Plan,
    RuleSet,
    Withheld,
)
from residency.server.core.schema import Schema
from residency.server.core.sealing import DataKey, SealError, field_aads, record_aad
from residency.server.core.transform import put_in_forms
from residency.server.keys.hashkey import HashKeys
from residency.server.keys.keyring import Keyring
from residency.server.storage.records import Row
from residency.server.storage.roles import VaultStore
from residency.server.vault.lookup import BlindIndex
from residency.server.vault.new_keys import NewKeys
from residency.server.vault.reads import Caller, Opened, ReadResult, Write
from residency.server.vault.record_keys import RecordKeys
from residency.server.vault.sealing import next_version, seal_writes
from residency.v1 import common_pb2, records_pb2, replica_pb2, storage_pb2

# The encodings of a stored row (a primary's record; a region's copy, as its home sealed it):
# storage formats on disk, not the domain types the methods below take and return.
SealedCopy = replica_pb2.SealedCopy
StoredRecord = storage_pb2.StoredRecord
Value = common_pb2.Value


class Records(RecordKeys):
    store: VaultStore

    def __init__(
        self,
        region: str,
        primary: bool,
        schema: Schema,
        rules: RuleSet,
        keyring: Keyring,
        store: VaultStore,
        outbox: bool = True,
        hash_keys: HashKeys | None = None,
    ):
        self.region = region
        self.primary = primary
        self.schema = schema
        self.rules = rules
        self.keyring = keyring
        self.store = store
        # Without destinations there is nobody to read an outbox.
        self.outbox = outbox
        self.new_keys = NewKeys(keyring, store)
        # The store's restore floor, read once: only a restore (the node stopped) raises it.
        self._floor: int | None = None
        # The primary's, for fields a rule sends hashed (`core.transform`); None on a region node.
        self.hash_keys = hash_keys
        self.index = BlindIndex(self)
        # A region's users whose copy key the `before` step of the copies' batch replaced.
        self.keys_replaced: set[str] = set()
        # Drops what a replicator keeps of a user erased here (its opened record, its copy
        # keys), on the store thread: the node's, when it runs one.
        self.forget: Callable[[str], None] = lambda user_id: None

    # ---- primary: writes -------------------------------------------------------------

    def prepare_keys(self, writes: list[Write]) -> None:
        """The `before` step of a batch of `put`s: its new users' data keys, committed."""
        self.new_keys.prepare([w.user_id for w in writes])

    def put(self, writes: list[Write]) -> list[int]:
        """Writes records (fields given replace those stored; others are kept) and queues
        them for replication. Returns the new versions, in order. A user without a live
        record is written under the key `prepare_keys` committed for this batch."""
        users = list(dict.fromkeys(w.user_id for w in writes))
        rows = self.store.rows(users)
        self._check_cookies(writes)
        # Existing users' data keys from the cache or the keyring (one query).
        live = {u: r for u, r in rows.items() if not r.deleted}
        self.warm_keys(list(live))
        keys: dict[str, DataKey] = {}
        new_key_ids: dict[str, str] = {}
        for u in users:
            if u in live:
                keys[u] = self._data_key(u)
            else:
                keys[u], new_key_ids[u] = self.new_keys.take(u)
        args = (
            self.region,
            time.time(),
            [(w.user_id, w.body, w.remove, w.touch, w.source) for w in writes],
            {u: (r.version, r.deleted, r.blob, r.updated_at) for u, r in rows.items()},
            keys,
            new_key_ids,
            self.version_floor(),
        )
        try:
            versions, sealed = seal_writes(*args)
        except SealError:
            # A cached key another process replaced (the user erased and written again
            # through another front end, before its notice came): the keyring's, once more.
            for u in live:
                self.keyring.data_keys.drop(u)
            self.warm_keys(list(live))  # one query
            keys.update((u, self._data_key(u)) for u in live)
            versions, sealed = seal_writes(*args)
        for u in new_key_ids:
            self.keyring.data_keys.put(u, keys[u])
        self.store.upsert([Row(u, v, False, blob, age) for u, v, blob, age in sealed])
        self.index.written((w.user_id, w.body, w.remove, w.lookup) for w in writes)
        if self.outbox:
            self.store.outbox_append([(u, v) for u, v, _, _ in sealed])
        return versions

    def bump(self, user_ids: list[str], remove: tuple[str, ...] = ()) -> dict[str, int]:
        """Gives live records a new version without changing their data (but `remove`), so
        that the replicator projects them again: after a consent, grant, retention or rules
        change. Returns the new version of each record that exists."""
        rows = self.store.rows(list(dict.fromkeys(user_ids)))
        live = [u for u in dict.fromkeys(user_ids) if u in rows and not rows[u].deleted]
        if not live:
            return {}
        versions = self.put([Write(u, "", b"", (), remove, touch=False) for u in live])
        return dict(zip(live, versions, strict=True))

    def _check_cookies(self, writes: list[Write]) -> None:
        """Policy 5: cookie data is collected only while the user's cookie consent stands."""
        users = [w.user_id for w in writes if w.cookies]
        if users:
            permits = self.permits_for(users)
            consenting = {u for u in users if permits[u].cookies}
            refusal = refused_cookie_writes(users, consenting, self.schema.cookie_fields)
            if refusal is not None:
                raise refusal

    def standing_consents(self, user_ids: list[str]) -> list[StandingConsent]:
        return [StandingConsent(u, p, r, bool(s)) for u, p, r, s, *_ in self.store.consents(user_ids)]

    def permits_for(self, user_ids: list[str], now: float | None = None) -> dict[str, Permits]:
        """Each user's consents and grants, as the rules engine takes them."""
        now = time.time() if now is None else now
        users = list(dict.fromkeys(user_ids))
        consented = consented_rules(self.rules, users, self.standing_consents(users))
        grants: dict[str, list[Grant]] = {u: [] for u in users}
        for user, gid, recipient, purpose, basis, cats, ends_at, revoked_at in self.store.grants_for(users):
            grants[user].append(
                Grant(gid, recipient, purpose, basis, tuple(json.loads(cats)), ends_at, revoked_at)
            )
        out = {}
        for u in users:
            c = consented[u]
            active, ended = split_grants(grants[u], now)
            out[u] = Permits(frozenset(c.rules), frozenset(c.sensitive_rules), c.cookies, active, ended)
        return out

    def project(
        self, plan: Plan, fields: dict[str, Any], updated_at: float, now: float | None = None
    ) -> tuple[dict[str, Any], dict[str, Withheld]]:
        """`plan.project`, then retention: a field sent under a rule with `retention_days`
        is withheld once the record is older than that; then each field its rule transforms is
        put in its form (the value itself never goes: `core.transform`)."""
        sent, withheld = plan.project(fields)
        now = time.time() if now is None else now
        for name in expired_fields(plan.decisions, list(sent), updated_at, now):
            del sent[name]
            withheld[name] = Withheld(RETENTION_EXPIRED)
        if forms := plan.forms(sent):
            keys, to = self.hash_keys, plan.destination
            withheld.update(
                put_in_forms(
                    forms, self.schema.fields, sent, lambda f: keys.for_field(to, f) if keys else b""
                )
            )
        return sent, withheld

    def delete(self, user_id: str, actor: str, purpose: str = "", reason: str = ERASED_HERE) -> int:
        """Erases a record: its data key is destroyed with it (crypto-shredding), a tombstone
        carries the erasure to every region, and a home `erasure` entry naming `actor` records
        it in the same transaction (a restore re-applies erasures its backup predates from
        these entries, whether or not a tombstone ever left: `core.recovered`). The user's
        standing consents are withdrawn and the grants naming the user leave it, so that
        nothing of this person applies to, or is exported for, a later record under the same
        id: the home entry marks where that record's history starts
        (`core.report.subject.after_erasure`)."""
        old = self.store.rows([user_id]).get(user_id)
        if old is None or old.deleted:
            raise NotFound(f"user {user_id} has no record")
        version = self.tombstone(user_id, old.version)
        now = time.time()
        standing = self.store.consents([user_id])
        for _, consented, recipient, sensitive, *_ in standing:
            self.store.consent_set(
                user_id, consented, recipient, bool(sensitive), now, ERASED_HERE, actor, True
            )
        grants = self.store.grants_leave(user_id)
        self.store.limits_forget(user_bucket(user_id))  # when the user's credentials were last verified
        entry = translog.entry(
            "erasure",
            subject=user_id,
            source_region=self.region,
            destination_region=self.region,
            outcome="allowed",
            actor=actor,
            rules_version=self.rules.version,
            purpose=purpose,
            version=version,
            reason=f"{reason}; {len(standing)} standing consents withdrawn, {grants} grants left",
        )
        self.store.log_append([entry])
        return version

    def tombstone(self, user_id: str, after: int) -> int:
        """Writes the user's tombstone with a version above `after` (a restore sends one again
        to destinations that may hold a newer copy) and destroys the user's data key."""
        version = next_version(after, self.version_floor())
        now = time.time()
        tomb = StoredRecord(
            user_id=user_id,
            version=version,
            deleted=True,
            home_region=self.region,
            updated_at=codec.timestamp(now),
        )
        self.store.upsert([Row(user_id, version, True, tomb.SerializeToString(), now)])
        # Crypto-shredding: the user's data key leaves the keyring (overwritten in the file)
        # once the tombstone has committed.
        self.store.delete_data_keys([user_id])
        self.index.erased([user_id])
        if self.outbox:
            self.store.outbox_append([(user_id, version)])
        self.keyring.data_keys.drop(user_id)
        self.forget(user_id)
        return version

    def version_floor(self) -> int:
        if self._floor is None:
            self._floor = self.store.version_floor()
        return self._floor

    # ---- reads ------------------------------------------------------------------------

    def open_row(self, row: Row) -> Opened:
        if self.primary:
            self.keyring.check()
            st = StoredRecord.FromString(row.blob)
            aad = record_aad(row.user_id, self.region, st.version, st.key_id)
            dek, plain = self._opened_by(row.user_id, lambda k: k.open(st.sealed_fields, aad))
            body = records_pb2.Record.FromString(plain)
            return Opened(
                row.user_id,
                st.version,
                st.source,
                st.home_region,
                codec.seconds(st.created_at),
                codec.seconds(st.updated_at),
                dict(body.fields),
                dek.mark,
            )
        return self.open_copy(row.user_id, SealedCopy.FromString(row.blob), None)

    def open_copy(self, user_id: str, copy: SealedCopy, names: Collection[str] | None) -> Opened:
        """A region's copy with the fields `names` opened (None: all): a field its policy
        withholds is never decrypted."""
        self.keyring.check()
        version = copy.version
        aad = field_aads(user_id, self.region, version, copy.key_id, format=copy.format)
        _, fields = self._opened_by(
            user_id,
            lambda k: {
                n: Value.FromString(k.open(s, aad(n)))
                for n, s in copy.sealed_fields.items()
                if names is None or n in names
            },
        )
        return Opened(
            user_id,
            version,
            copy.source,
            copy.home_region,
            codec.seconds(copy.created_at),
            codec.seconds(copy.updated_at),
            fields,
        )

    def _plan_for(self, caller: Caller, permits: Permits) -> Plan:
        """The plan a read by `caller` (not a home service) follows, from the user's permits."""
        recipient = caller.role == "recipient"
        # A grant lets its own recipient read, nobody else (policy 2a, 2b).
        mine = tuple(g for g in permits.active_grants if recipient and caller.name == g.recipient)
        ended = tuple(g for g in permits.ended_grants if recipient and caller.name == g.recipient)
        permits = dataclasses.replace(permits, active_grants=mine, ended_grants=ended)
        # A recipient reads under its own grants only: no rule, and no home-region shortcut.
        return self.rules.plan(caller.location, caller.purpose, permits, grants_only=recipient)

    def findable(
        self, user_ids: list[str], caller: Caller, field: str, now: float | None = None
    ) -> list[str]:
        """Those of `user_ids` (a find's index matches) whose `field` a `read(found_by=field)` by
        `caller` would give as its value: decided from the rules over their consents and grants
        and the record's age, without opening a record or writing a log entry."""
        rows = self.store.rows(user_ids)
        live = [u for u in user_ids if u in rows and not rows[u].deleted]
        if caller.location == self.region and caller.role != "recipient":
            return live
        now = time.time() if now is None else now
        permits = self.permits_for(live, now)
        out = []
        for u in live:
            plan = self._plan_for(caller, permits[u])
            if (
                isinstance(plan.decisions[field], Allowed)
                and not plan.forms([field])
                and not expired_fields(plan.decisions, [field], rows[u].updated_at, now)
            ):
                out.append(u)
        return out

    def read(self, user_id: str, caller: Caller, found_by: str = "") -> ReadResult:
        """Reads a home record for `caller` (a region node's copies: `RegionCopies.read_copy`).
        From another location only what a rule allows for that location and purpose is
        returned, and the read is logged either way. `found_by`: the lookup field of a find,
        which answers nothing unless that field itself may be read."""
        row = self.store.rows([user_id]).get(user_id)
        if row is None or row.deleted:
            raise NotFound(f"user {user_id} has no record in {self.region}")
        rec = self.open_row(row)
        withheld: dict[str, Withheld] = {}
        for name in list(rec.fields):
            spec = self.schema.fields.get(name)
            if spec is not None and spec.credential:
                del rec.fields[name]
                withheld[name] = Withheld("credential")
        if caller.location == self.region and caller.role != "recipient":
            return ReadResult(rec, withheld)
        plan = self._plan_for(caller, self.permits_for([user_id])[user_id])
        sent, refused = self.project(plan, rec.fields, rec.updated_at)
        # A find answers only a caller who may read the searched field's value, not a form of it.
        if found_by and (found_by not in sent or found_by in plan.forms([found_by])):
            refused |= dict.fromkeys(sent, Withheld(NO_RULE))
            sent = {}
        withheld.update(refused)
        entry = translog.entry(
            "remote_read",
            subject=user_id,
            source_region=self.region,
            destination_region=caller.location,
            outcome="allowed" if sent else "denied",
            actor=caller.identity,
            rules_version=self.rules.version,
            purpose=caller.purpose,
            recipient=translog.recipients_of(plan.decisions, sent),
            fields=translog.described(self.schema, plan.decisions, sent),
            withheld=translog.described_withheld(self.schema, withheld),
            forms=plan.forms(sent),
            version=rec.version,
            reason=""
            if sent
            else f"no rule allows {found_by or 'any field of this record'} to {caller.location} "
            f"for {caller.purpose}",
            found_by=found_by,
        )
        (seq,) = self.store.log_append([entry])
        rec.fields = sent
        return ReadResult(rec, withheld, seq, entry["reason"], entry.get("forms", {}))
