"""A credential field's stored hash: read for a verify, replaced by a stronger hash of the same
secret (policy 6a; the hashing itself is `core.policy.credentials`)."""

from __future__ import annotations

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
