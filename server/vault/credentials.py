"""A credential field's stored hash: read for a verify, replaced by a stronger hash of the same
secret, and the verify calls' rate limits, kept in the store (policy 6a; the hashing and the
buckets' arithmetic are `core.policy.credentials`)."""

from __future__ import annotations

from residency.server.core.policy.credentials import VerifyLimits
from residency.server.storage.limits import LimitStore
from residency.server.vault.reads import Write
from residency.server.vault.records import Records, Value
from residency.v1 import records_pb2


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
    against the same ones, by the store's clock. Both methods run on the store thread."""

    # A sweep of the buckets full again runs at most this often (seconds), in a taking write.
    SWEEP_EVERY = 60.0

    def __init__(self, limits: VerifyLimits, store: LimitStore):
        self.limits, self.store = limits, store
        self._swept = 0.0

    def check(self, user_id: str, caller: str) -> tuple[str, float] | None:
        """The refusal the call would get now, or None; reads only, so that a caller past its
        limit costs no write (`take` decides)."""
        buckets = self.limits.buckets(user_id, caller)
        return self.limits.admit(self.store.limits_held(buckets), user_id, caller, self.store.now())[0]

    def take(self, user_id: str, caller: str) -> tuple[str, float] | None:
        """Inside a write (the writers' lock held, so no other front end counts meanwhile):
        a token from both buckets and None, or the refusal, taking nothing."""
        store, now = self.store, self.store.now()
        held = store.limits_held(self.limits.buckets(user_id, caller))
        refused, taken = self.limits.admit(held, user_id, caller, now)
        if refused is None:
            store.limits_set(taken)
            if now - self._swept >= self.SWEEP_EVERY:
                store.limits_sweep(now - self.limits.full_after)
                self._swept = now
        return refused
