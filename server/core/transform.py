"""Transformations a rule may send or serve a field as instead of its value (policy 2a, 2b:
minimisation): `mask:N`, `hash`, `truncate`, `year_of_birth`. Pure: naming and checking a
form, putting a value in it, and telling whether a value is in it. No keys are made here.

A form is named by a short canonical string, the same in the rules file's `transform`, a
copy's policy, the transfer log's `forms` and `rules explain`: "mask:4", "hash",
"truncate", "year_of_birth".
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from residency.server.core import codec
from residency.server.core.rules import NOT_IN_FORM, Withheld, covers
from residency.server.core.schema import FieldSpec, FieldValue

Value = codec.Value

MASK, HASH, TRUNCATE, YEAR_OF_BIRTH = "mask", "hash", "truncate", "year_of_birth"
MASK_CHAR = "*"
# Kept by a mask: in phone and card numbers they are the same for every number of a format,
# so they say nothing about the person, and a reader still sees `***-****-2795` as a phone.
SEPARATORS = frozenset(" -()+")
MAX_MASK = 64
IP_CATEGORY = "user.device.ip_address"
BIRTH_CATEGORY = "user.demographic.date_of_birth"
# Widest prefix a truncated address keeps: a /24 network holds 256 IPv4 hosts, a /48 a site.
IPV4_PREFIX, IPV6_PREFIX = 24, 48
_DATE = re.compile(r"(\d{4})-(\d{2})(?:-\d{2}(?:[T ].*)?)?")
_HASH_CONTEXT = b"residency/transform-hash/v2\x00"
_HEX = re.compile(r"[0-9a-f]{64}")


class NotInForm(ValueError):
    """A value that cannot be put in its field's form (an IP field holding no address): the
    field is withheld rather than sent as it is. The message names no value."""


def name_of(raw: Any) -> str:
    """The canonical form a rules file's `transform` entry names (`hash`, `{mask: 4}`, ...);
    ValueError saying what is accepted otherwise."""
    if isinstance(raw, str) and raw in (HASH, TRUNCATE, YEAR_OF_BIRTH):
        return raw
    if isinstance(raw, dict) and len(raw) == 1:
        ((kind, arg),) = raw.items()
        if kind == MASK and type(arg) is int and 0 <= arg <= MAX_MASK:
            return f"{MASK}:{arg}"
        if kind == MASK:
            raise ValueError(f"mask takes the number of trailing characters kept, 0 to {MAX_MASK}")
        if kind in (HASH, TRUNCATE, YEAR_OF_BIRTH) and arg in (None, {}, True):
            return str(kind)
    if raw == MASK:
        raise ValueError("mask takes the number of trailing characters kept, e.g. {mask: 4}")
    raise ValueError(f"unknown transformation {raw!r}; known: {{mask: N}}, hash, truncate, year_of_birth")


def parse(form: str) -> tuple[str, int]:
    """(kind, mask length) of a canonical form; ValueError if it is none."""
    kind, _, arg = form.partition(":")
    if kind == MASK and arg.isdigit() and arg == str(int(arg)) and int(arg) <= MAX_MASK:
        return kind, int(arg)
    if kind in (HASH, TRUNCATE, YEAR_OF_BIRTH) and not arg and ":" not in form:
        return kind, 0
    raise ValueError("not a transformation this node knows")


def known(form: str) -> bool:
    """Whether `form` is a canonical form this node can check and serve."""
    try:
        parse(form)
    except ValueError:
        return False
    return True


def unfit(form: str, spec: FieldSpec) -> str:
    """Why `form` means nothing for the field `spec` declares (its type or category), or ""."""
    kind, _ = parse(form)
    dated = spec.type == "timestamp" or (spec.type == "string" and covers(BIRTH_CATEGORY, spec.category))
    what = f"{spec.type} of category {spec.category}"
    if kind == MASK and spec.type != "string":
        return f"mask keeps a string's last characters; {spec.name} is a {what}"
    if kind == HASH and spec.type not in ("string", "bytes", "int"):
        return f"hash takes a string, bytes or int (an identifier); {spec.name} is a {what}"
    if kind == TRUNCATE and not (dated or (spec.type == "string" and covers(IP_CATEGORY, spec.category))):
        return f"truncate takes an IP address ({IP_CATEGORY}) or a date or timestamp; {spec.name} is a {what}"
    if kind == YEAR_OF_BIRTH and not (dated and covers(BIRTH_CATEGORY, spec.category)):
        return f"year_of_birth takes a birth date ({BIRTH_CATEGORY}); {spec.name} is a {what}"
    return ""


def transform(form: str, spec: FieldSpec, value: FieldValue, key: bytes) -> FieldValue:
    """`value` in `form` (`key`: the field's hash key for the destination region, for `hash`);
    NotInForm when it cannot be (then nothing of it goes)."""
    kind, keep = parse(form)
    if kind == MASK and isinstance(value, str):
        return mask(value, keep)
    if kind == HASH and isinstance(value, str | bytes | int) and not isinstance(value, bool):
        return keyed_hash(key, value)
    if kind == TRUNCATE and isinstance(value, datetime):
        return month(value)
    if kind == TRUNCATE and isinstance(value, str):
        return network(value) if covers(IP_CATEGORY, spec.category) else date_month(value)
    if kind == YEAR_OF_BIRTH and isinstance(value, datetime | str):
        return birth_year(value)
    raise NotInForm(f"a value of {spec.name} cannot be put in the form {form}")


def mask(value: str, keep: int) -> str:
    """Every character but separators and the last `keep` others replaced by `*`; at most
    half the others are kept, so a short value is never shown whole."""
    chars = sum(c not in SEPARATORS for c in value)
    shown = min(keep, chars // 2)
    out, left = [], shown
    for c in reversed(value):
        if c in SEPARATORS:
            out.append(c)
        elif left > 0:
            out.append(c)
            left -= 1
        else:
            out.append(MASK_CHAR)
    return "".join(reversed(out))


def keyed_hash(key: bytes, value: str | bytes | int) -> str:
    """HMAC-SHA256 under the field's hash key for a region of the value's type and bytes, in
    hex: stable per region and field, different across regions and fields, and no dictionary
    runs without the key. (v2: v1 hashed every field of a region under one key.)"""
    if not key:
        raise NotInForm("no hash key for this destination")
    if isinstance(value, str):
        tag, data = b"s", value.encode()
    elif isinstance(value, bytes):
        tag, data = b"b", value
    else:
        tag, data = b"i", value.to_bytes(8, "big", signed=True)
    return hmac.new(key, _HASH_CONTEXT + tag + data, hashlib.sha256).hexdigest()


def network(value: str) -> str:
    """An IPv4 address to its /24, an IPv6 address to its /48. An IPv6 address that carries
    an IPv4 one (IPv4-mapped, 6to4 `2002::/16`, a Teredo client's) is truncated as that IPv4
    address: a 6to4 address's /48 is its whole IPv4 address."""
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise NotInForm("not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address):
        teredo = ip.teredo
        ip = ip.ipv4_mapped or ip.sixtofour or (teredo[1] if teredo else None) or ip
    prefix = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def month(value: datetime) -> datetime:
    """A timestamp to the first instant of its month (UTC)."""
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime(value.year, value.month, 1, tzinfo=UTC)


def date_month(value: str) -> str:
    """An ISO date ("1990-05-17", or a date and time) to its month, "1990-05"."""
    m = _DATE.fullmatch(value.strip())
    if m is None or not 1 <= int(m[2]) <= 12:
        raise NotInForm("not an ISO date")
    return f"{m[1]}-{m[2]}"


def birth_year(value: datetime | str) -> int:
    """A birth date (a timestamp or an ISO date) to its year."""
    if isinstance(value, datetime):
        return month(value).year
    return int(date_month(value)[:4])


def conforms(form: str, value: FieldValue | None) -> bool:
    """Whether `value` is one `form` can produce: a region node serves nothing else, so a copy
    holding more than its signed policy says (a home's bug, a forger with the signing key's
    help) never reaches a reader whole."""
    if not known(form):
        return False
    kind, keep = parse(form)
    if kind == MASK:
        return isinstance(value, str) and _masked(value, keep)
    if kind == HASH:
        return isinstance(value, str) and _HEX.fullmatch(value) is not None
    if kind == YEAR_OF_BIRTH:
        return type(value) is int and 0 < value < 10_000
    if isinstance(value, datetime):
        return month(value) == value.astimezone(UTC)
    if isinstance(value, str) and "/" in value:
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError:
            return False
        return net.prefixlen == (IPV4_PREFIX if net.version == 4 else IPV6_PREFIX)
    return isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}", value) is not None


def _masked(value: str, keep: int) -> bool:
    """Every character but separators and the last ones `mask` shows is `*`: at most `keep`,
    and at most half of them (a 4-character value under mask:4 shows 2)."""
    chars = [c for c in value if c not in SEPARATORS]
    shown = min(keep, len(chars) // 2)
    return all(c == MASK_CHAR for c in chars[: len(chars) - shown])


def put_in_forms(
    forms: Mapping[str, str],
    specs: Mapping[str, FieldSpec],
    sent: dict[str, Value],
    key: Callable[[str], bytes],
) -> dict[str, Withheld]:
    """Replaces each value of `sent` that `forms` names by its form, in place (`key`: a field
    name to its hash key for the destination); a value that cannot be put in its form leaves
    `sent` and is returned withheld (`NOT_IN_FORM`)."""
    withheld = {}
    for name, form in forms.items():
        value = codec.from_value(sent[name])
        try:
            if value is None:
                raise NotInForm("no value")
            field_key = key(name) if parse(form)[0] == HASH else b""
            sent[name] = codec.to_value(transform(form, specs[name], value, field_key))
        except NotInForm:
            del sent[name]
            withheld[name] = Withheld(NOT_IN_FORM)
    return withheld
