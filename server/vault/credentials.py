"""A credential field's stored hash: read for a verify, replaced by a stronger hash of the same
secret, and the verify calls' rate limits, kept in the store (policy 6a; the hashing and the
buckets' arithmetic are `core.policy.credentials`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from residency.server.core.policy.credentials import VerifyLimits
from residency.server.storage.limits import LimitStore
from residency.server.storage.thread import StoreThread
from residency.server.vault.reads import Write
from residency.server.vault.records import Records, Value
from residency.v1 import records_pb2

log = logging.getLogger("residency.credentials")


def stored_credential(records: Records, user_id: str, field: str) -> bytes:
    """The stored hash of a credential field, empty if the user or the field has none (a
    verify call does not tell which); never leaves this node."""
    row = records.store.rows([user_id]).get(user_id)
    if row is None or row.deleted:
        return b""
    value = records.open_row(row).fields.get(field)
    return value.bytes_value if value is not None else b""


def rehash_credential(records: Records, user_id: str, field: str, old: bytes, new: bytes) -> bool:
    """Replaces the hash `old` of a credential field by `new` (the same secret, hashed with
    today's parameters), unless the credential changed meanwhile. The record keeps its age:
    this is not the user's write."""
    if not old or stored_credential(records, user_id, field) != old:
        return False
    body = records_pb2.Record(fields={field: Value(bytes_value=new)}).SerializeToString()
    records.put([Write(user_id, "", body, touch=False)])
    return True


class VerifyBuckets:
    """`VerifyLimits` over buckets kept in the store, so that every front end of a store counts
    against the same ones, by the store's clock. What this front end saw refused is also
    remembered here until it would not be (the store can only hold fewer tokens: the other
    front ends only take), so that a caller past its limit costs neither a read nor a write."""

    # Remembered refusals past this many (at first) are pruned of those that have run out.
    REMEMBER = 10_000

    def __init__(self, limits: VerifyLimits, store: LimitStore):
        self.limits, self.store = limits, store
        # bucket -> time.monotonic() until which it refuses
        self._refused: dict[str, float] = {}
        self._prune_at = self.REMEMBER  # doubles while most remembered refusals still stand

    def refused(self, user_id: str, caller: str) -> tuple[str, float] | None:
        """A refusal this front end saw and that still stands; memory only (on the event loop)."""
        now = time.monotonic()
        for kind, bucket in zip(("user", "caller"), self.limits.buckets(user_id, caller), strict=True):
            until = self._refused.get(bucket, 0.0)
            if until > now:
                return kind, until - now
        return None

    def check(self, user_id: str, caller: str) -> tuple[str, float] | None:
        """On the store thread: the refusal the call would get now, or None; reads only, so that
        a caller past its limit costs no write (`take` decides)."""
        buckets = self.limits.buckets(user_id, caller)
        held = self.store.limits_held(buckets)
        return self._remember(buckets, self.limits.admit(held, user_id, caller, self.store.now())[0])

    def take(self, user_id: str, caller: str) -> tuple[str, float] | None:
        """Inside a write (the writers' lock held, so no other front end counts meanwhile):
        a token from both buckets and None, or the refusal, taking nothing."""
        buckets = self.limits.buckets(user_id, caller)
        held = self.store.limits_held(buckets)
        refused, taken = self.limits.admit(held, user_id, caller, self.store.now())
        if refused is None:
            self.store.limits_set(taken)
        return self._remember(buckets, refused)

    def sweep(self) -> int:
        """Inside a write: deletes the buckets full again."""
        return self.store.limits_sweep(self.store.now())

    async def sweeping(self, db: StoreThread[Any], every: float) -> None:
        """Sweeps every `every` seconds (the node's `policy_sweep_seconds`), for as long as the
        node runs; a failed sweep is logged and tried again next time."""
        while True:
            await asyncio.sleep(every)
            try:
                await db.write(self.sweep)
            except Exception:
                log.exception("sweeping the verify limits' full buckets failed; trying again next round")

    def _remember(self, buckets: list[str], refused: tuple[str, float] | None) -> tuple[str, float] | None:
        if refused is not None:
            now = time.monotonic()
            if len(self._refused) >= self._prune_at:
                self._refused = {b: t for b, t in self._refused.items() if t > now}
                self._prune_at = max(self.REMEMBER, 2 * len(self._refused))
            kind, wait = refused
            self._refused[buckets[0 if kind == "user" else 1]] = now + wait
        return refused
