"""The declared fields of a record: data category, type, sensitivity, source, limits.

Validation is pure: it takes plain Python values and returns every violation at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, cached_property
from typing import Any, Literal

from residency.server.core.policy.opaque import prepared_size

FieldValue = str | int | bool | bytes | datetime | list[str]

# The value types a field may declare, and the Python types each accepts.
FieldType = Literal["string", "int", "bool", "bytes", "timestamp", "list"]
TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "bool": (bool,),
    "bytes": (bytes,),
    "timestamp": (datetime,),
    "list": (list,),
}
# Where a field's value comes from (policy 1a, 1b, 1c).
FieldSource = Literal["registration", "automatic", "partner"]
USER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
SOURCE = re.compile(r"registration|automatic|partner:[A-Za-z0-9._-]{1,64}")
MAX_FIELDS_BYTES = 64 * 1024
CREDENTIAL_PREFIX = "user.authorization"
INT64 = (-(2**63), 2**63 - 1)


@cache
def data_categories() -> frozenset[str]:
    from fideslang import DEFAULT_TAXONOMY

    return frozenset(c.fides_key for c in DEFAULT_TAXONOMY.data_category)


@cache
def data_uses() -> frozenset[str]:
    from fideslang import DEFAULT_TAXONOMY

    return frozenset(u.fides_key for u in DEFAULT_TAXONOMY.data_use)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    category: str
    type: str
    description: str = ""
    sensitive: bool = False
    # Outside the privacy policy's scope (policy 1c): transferred only under an explicit rule.
    out_of_scope: bool = False
    # Where the value comes from: "registration", "automatic" or "partner".
    source: str = "registration"
    max_bytes: int = 4096
    max_items: int = 256
    # A blind index is kept for it (issue 18: `FindRecords`), of its value normalised so.
    lookup: bool = False
    normalize: str = "none"
    # Credentials are stored only as a slow hash: never readable, never transferred.
    credential: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        cat = self.category
        object.__setattr__(
            self, "credential", cat == CREDENTIAL_PREFIX or cat.startswith(CREDENTIAL_PREFIX + ".")
        )


@dataclass(frozen=True)
class Schema:
    fields: dict[str, FieldSpec]
    version: int = 1

    @cached_property
    def cookie_fields(self) -> frozenset[str]:
        """Fields policy 5 covers: every `user.device.cookie*` category."""
        return frozenset(n for n, s in self.fields.items() if s.category.startswith("user.device.cookie"))

    @cached_property
    def credential_fields(self) -> frozenset[str]:
        return frozenset(n for n, s in self.fields.items() if s.credential)

    @cached_property
    def lookup_fields(self) -> dict[str, str]:
        """Fields with a blind index, and the normalisation of each (`core.lookup.normalize`)."""
        return {n: s.normalize for n, s in self.fields.items() if s.lookup}

    def validate(
        self, user_id: str, source: str, values: Iterable[tuple[str, FieldValue | None]]
    ) -> list[tuple[str, str]]:
        """Every violation of one record, as (field path relative to the record, description)."""
        bad: list[tuple[str, str]] = []
        if not USER_ID.fullmatch(user_id):
            bad.append(("user_id", "must be 1-128 characters from [A-Za-z0-9._:@-]"))
        if source and not SOURCE.fullmatch(source):
            bad.append(("source", "must be registration, automatic or partner:NAME"))
        total = 0
        fields = self.fields
        for name, value in values:
            spec = fields.get(name)
            if spec is None:
                bad.append((f"fields[{name}]", "unknown field: not declared in the schema"))
                continue
            # Fast path: a short ASCII string for a string field.
            if type(value) is str and spec.type == "string" and value.isascii():
                size = len(value)
                if size > spec.max_bytes:
                    bad.append((f"fields[{name}]", f"{size} bytes; the limit is {spec.max_bytes}"))
            else:
                problem, size = _check_value(spec, value)
                if problem:
                    bad.append((f"fields[{name}]", problem))
            total += size
        if total > MAX_FIELDS_BYTES:
            bad.append(("fields", f"record is {total} bytes; the limit is {MAX_FIELDS_BYTES}"))
        return bad


def _check_value(spec: FieldSpec, value: FieldValue | None) -> tuple[str, int]:
    """(problem or "", size in bytes) of one value against its declaration."""
    if value is None:
        return "a value is required", 0
    expected = TYPES[spec.type]
    # bool is an int in Python; an int field must not take a bool and vice versa.
    if not isinstance(value, expected) or (spec.type == "int" and isinstance(value, bool)):
        return f"expected a {spec.type} value, got {_kind(value)}", 0
    if isinstance(value, str):
        # A credential is bounded as it is hashed (`prepared`): the same password however
        # composed has one size; an ASCII one, the fast path above, is its own prepared form.
        size = prepared_size(value, spec.max_bytes) if spec.credential else len(value.encode())
    elif isinstance(value, bytes):
        size = len(value)
    elif isinstance(value, list):
        if len(value) > spec.max_items:
            return f"{len(value)} items; the limit is {spec.max_items}", 0
        if not all(isinstance(v, str) for v in value):
            return "list items must be strings", 0
        size = sum(len(v.encode()) for v in value)
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64[0] <= value <= INT64[1]:
            return "out of the 64-bit integer range", 0
        size = 8
    else:
        size = 8
    if size > spec.max_bytes:
        return f"{size} bytes; the limit is {spec.max_bytes}", size
    return "", size


def _kind(value: Any) -> str:
    for name, types in TYPES.items():
        if isinstance(value, types) and not (name == "int" and isinstance(value, bool)):
            return name
    return "nothing" if value is None else type(value).__name__
