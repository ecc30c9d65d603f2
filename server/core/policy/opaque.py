"""How a credential's secret is compared (policy 6a): prepared as RFC 8265's OpaqueString
profile maps it, and bounded by its field's `max_bytes`. Apart from the hashing
(`credentials`), so that checking a record's values does not load Argon2."""

from __future__ import annotations

import unicodedata

# NFC makes UTF-8 text at most this many times longer (U+0958: 3 bytes, then 6); a secret
# longer than this many times its limit is refused as sent, before it is prepared.
_GROWTH = 3


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


def oversize(secret: str, max_bytes: int) -> int:
    """The size of `secret` in UTF-8 bytes if it is over `max_bytes` both as sent and as
    prepared (a hash stored before secrets were prepared was bounded as sent), else 0. One
    far over the limit as sent is not prepared at all: preparing costs memory and time in
    its length."""
    size = len(secret.encode())
    if size <= max_bytes:
        return 0
    if size > _GROWTH * max_bytes:
        return size
    ready = len(prepared(secret).encode())
    return 0 if ready <= max_bytes else ready
