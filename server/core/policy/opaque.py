"""How a credential's secret is compared (policy 6a): prepared as RFC 8265's OpaqueString
profile maps it, and bounded by its field's `max_bytes`. Apart from the hashing
(`credentials`), so that checking a record's values does not load Argon2."""

from __future__ import annotations

import unicodedata

# Preparing makes UTF-8 text shorter by less than this factor (the most found: 3.5, U+1FBE
# U+0308 U+0301, 7 bytes, to U+0390, 2 bytes; U+3000 to a space is 3): a secret longer than
# this many times its limit as sent cannot fit once prepared, and is refused unprepared.
# (Longer, it can get too: U+1D160, 4 bytes, is 12 in NFC; so the prepared form is bounded.)
_SHRINK = 4


def prepared(secret: str) -> str:
    """`secret` as it is hashed: the mapping and normalisation of RFC 8265's OpaqueString
    profile (every space character as U+0020, then NFC), so that a password typed on another
    keyboard or system, the same characters composed otherwise, still matches. A secret with
    a code point this Python's Unicode data does not assign is left as sent: a later version
    may assign it as a combining mark, which NFC would then move, and the hash would no
    longer match (left as sent, a later version's verify checks it as sent too, and rehashes).
    Written here rather than taken from `precis-i18n`: that library's profile refuses such
    code points (and controls), which credentials already stored may hold, and a verify must
    not turn into a refusal."""
    category = unicodedata.category
    if any(category(c) == "Cn" for c in secret):
        return secret
    spaced = "".join(" " if category(c) == "Zs" else c for c in secret)
    return unicodedata.normalize("NFC", spaced)


def prepared_size(secret: str, max_bytes: int) -> int:
    """The size in UTF-8 bytes of `secret` as it is hashed (`prepared`), to hold against its
    field's `max_bytes`: what a write stores. One far over the limit as sent is not prepared
    (preparing costs memory and time in its length): its size as sent is given."""
    size = len(secret.encode())
    if size > _SHRINK * max_bytes:
        return size
    return len(prepared(secret).encode())


def oversize(secret: str, max_bytes: int) -> int:
    """The size of a secret to verify if it is over `max_bytes` both as sent and as prepared
    (no stored one can be: a hash stored before secrets were prepared was bounded as sent,
    one since as prepared), else 0."""
    size = len(secret.encode())
    if size <= max_bytes:
        return 0
    ready = prepared_size(secret, max_bytes)
    return 0 if ready <= max_bytes else ready
