"""What the records engine takes and returns: a write, a record or copy opened, a read's
result, and the caller a read is for (`residency.server.vault.records`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from residency.server.core.rules import Withheld
from residency.v1 import common_pb2

Value = common_pb2.Value


@dataclass(slots=True)
class Write:
    user_id: str
    source: str
    # A validated, serialized Record holding only `fields` (credentials already replaced by
    # their hash).
    body: bytes
    # The cookie fields it gives (policy 5 needs the user's cookie consent for them).
    cookies: tuple[str, ...] = ()
    # Fields to drop from the stored record (a withdrawn cookie consent stops collection).
    remove: tuple[str, ...] = ()
    # False for a rewrite that changes what may be sent, not the data: the record keeps its
    # age, so retention still counts from the last real write.
    touch: bool = True
    # The lookup fields `body` gives and their normalised forms (`core.lookup.forms`), as the
    # check found them (a bulk request's in a helper process); None: the index reads `body`.
    lookup: tuple[tuple[str, str], ...] | None = None


@dataclass(slots=True)
class Opened:
    """A record or copy, opened: field name to value."""

    user_id: str
    version: int
    source: str
    home_region: str
    created_at: float
    updated_at: float
    fields: dict[str, Value]
    # The mark of the data key it was opened with (`DataKey.mark`; a home record's): a new one
    # means a new user under the same id (erased, then written again).
    key_mark: bytes = b""


@dataclass(slots=True)
class ReadResult:
    record: Opened
    withheld: dict[str, Withheld]
    log_sequence: int = 0
    # Set when no field may go to the caller: the denial is logged, nothing is returned.
    denied: str = ""
    # The fields returned in a form instead of their value, each with its form.
    forms: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(slots=True)
class Caller:
    identity: str
    location: str
    purpose: str
    # What the identity's certificate names: its role and name (a recipient's id).
    role: str = ""
    name: str = ""
