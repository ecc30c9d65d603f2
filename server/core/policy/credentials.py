"""Policy 6a ("password encryption, safety measures"): credentials (`user.authorization.*`
fields) are kept only as a salted slow hash (scrypt) and are never readable or transferable;
a verify call answers yes or no.
"""

from __future__ import annotations

import hashlib
import hmac
import os

_PREFIX = b"scrypt$"
_SALT, _DIGEST = 16, 32


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=_DIGEST)


def hash_credential(secret: str) -> bytes:
    """scrypt (N=2^14, r=8, p=1, 16-byte salt): `b"scrypt$" + salt + hash`."""
    salt = os.urandom(_SALT)
    return _PREFIX + salt + _scrypt(secret, salt)


def verify_credential(secret: str, stored: bytes) -> bool:
    """Whether `secret` is the one `stored` was hashed from (in constant time)."""
    if not stored.startswith(_PREFIX) or len(stored) != len(_PREFIX) + _SALT + _DIGEST:
        return False
    salt, digest = stored[len(_PREFIX) : len(_PREFIX) + _SALT], stored[len(_PREFIX) + _SALT :]
    return hmac.compare_digest(_scrypt(secret, salt), digest)
