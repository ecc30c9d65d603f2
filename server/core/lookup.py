"""Blind-index inputs (issue 18): how a lookup field's value is normalised before it is keyed,
and the bounds of a find. Pure; the keyed hash itself is `residency.server.keys.indexkey`'s."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import phonenumbers

Normalize = Literal["email", "e164", "lower", "none"]
NORMALIZERS: tuple[str, ...] = ("email", "e164", "lower", "none")
# A find answers at most this many users per call (`FindRecordsRequest.limit`).
MAX_FIND = 100
DEFAULT_FIND = 10
_NOT_DIGITS = re.compile(r"[^0-9]")


def normalize(kind: str, value: str) -> str:
    """The form of `value` that is keyed, so that a find matches however a caller writes it.
    Total: every string has a form, so no write is refused for its lookup fields.

    - `email`: trimmed and lower-cased (the local part too: providers treat it so in practice).
    - `lower`: trimmed and lower-cased.
    - `e164`: E.164 (`+8613800138000`) through `phonenumbers` when the value carries its country
      code (a region-less parse needs the `+`); otherwise its digits alone, as a node has no
      country to assume (`138-0013-8000` and `13800138000` still find each other).
    - `none`: the value as given.
    """
    if kind in ("email", "lower"):
        return value.strip().lower()
    if kind == "e164":
        try:
            number = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException:
            return _NOT_DIGITS.sub("", value)
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return value


def forms(kinds: Mapping[str, str], fields: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Each lookup field (`kinds`: field to normalisation) that `fields`, a record's Values,
    gives, with its normalised form; "" when there is nothing to index (not a string value,
    or nothing left once normalised: it would match every other such value)."""
    return tuple(
        (f, normalize(kind, v.string_value) if v.WhichOneof("kind") == "string_value" else "")
        for f, kind in kinds.items()
        if (v := fields.get(f)) is not None
    )


def index_input(field: str, normalized: str) -> bytes:
    """What the index key hashes: field name || 0x00 || normalised value (a field name holds
    no NUL, so two (field, value) pairs never give the same input)."""
    return field.encode() + b"\x00" + normalized.encode()
