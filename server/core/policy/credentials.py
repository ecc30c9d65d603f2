"""Policy 6a ("password encryption, safety measures"): credentials (`user.authorization.*`
fields) are kept only as a salted slow hash, a PHC string that carries its parameters
(Argon2id), and are never readable or transferable; a verify call answers yes or no, costs
the same whether or not there is a hash to check, and is rate-limited per user and caller.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from residency.server.core.policy.opaque import prepared

# OWASP's first Argon2id configuration (Password Storage Cheat Sheet): 19 MiB, 2 passes,
# 1 lane, about as slow here as the scrypt it replaces. Raising these makes every stored
# hash rehash on its user's next successful verify.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
_PHC = b"$argon2id$"
# The format before PHC strings: b"scrypt$" + 16-byte salt + scrypt(N=2^14, r=8, p=1) digest.
_SCRYPT, _SALT, _DIGEST = b"scrypt$", 16, 32


def hash_credential(secret: str) -> bytes:
    """The PHC string of `secret` (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), as bytes."""
    return _HASHER.hash(prepared(secret)).encode()


@dataclass(frozen=True, slots=True)
class Verdict:
    match: bool
    # The secret matched a hash made with older parameters or format: store a new one.
    rehash: bool = False


@functools.cache
def _dummy() -> str:
    """A fixed hash of nothing, made with today's parameters, that unknown users and users
    without a credential are verified against, so that their answer takes as long."""
    return _HASHER.hash("")


def verify_credential(secret: str, stored: bytes) -> Verdict:
    """Whether `secret` is the one `stored` was hashed from (compared in constant time); an
    empty or unreadable `stored` costs a verify all the same, and never matches. A hash made
    before secrets were `prepared` was made of the secret as sent: when preparing changes the
    secret, that one is checked too, every time (the time taken says nothing of which
    matched; such a secret costs the caller's token two checks), and a match rehashes."""
    ready = prepared(secret)
    verdict = _verify(ready, stored)
    if ready == secret:
        return verdict
    as_sent = _verify(secret, stored)
    return verdict if verdict.match else Verdict(as_sent.match, rehash=as_sent.match)


def _verify(secret: str, stored: bytes) -> Verdict:
    if stored.startswith(_SCRYPT) and len(stored) == len(_SCRYPT) + _SALT + _DIGEST:
        salt, digest = stored[len(_SCRYPT) : len(_SCRYPT) + _SALT], stored[len(_SCRYPT) + _SALT :]
        computed = hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=_DIGEST)
        match = hmac.compare_digest(computed, digest)
        return Verdict(match, rehash=match)
    phc = stored.decode("ascii", "replace") if stored.startswith(_PHC) else None
    try:
        _HASHER.verify(phc or _dummy(), secret)
    except (VerificationError, InvalidHashError):
        return Verdict(False)
    return Verdict(phc is not None, rehash=phc is not None and _HASHER.check_needs_rehash(phc))


@dataclass(slots=True)
class TokenBuckets:
    """One token bucket per key: `per_minute` tokens a minute, at most `per_minute` saved (at
    least one: a limit under one a minute still lets a call through now and then)."""

    per_minute: float
    # key -> (tokens, when counted)
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Full buckets are forgotten when there are this many (a full bucket is as good as none);
    # it doubles when most are not full, so a busy node does not sweep on every call.
    _sweep_at: int = 10_000

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` has a token (0: it has one now)."""
        tokens = self._tokens(key, now)
        return 0.0 if tokens >= 1 else (1 - tokens) * 60 / self.per_minute

    def take(self, key: str, now: float) -> None:
        self._buckets[key] = (self._tokens(key, now) - 1, now)
        if len(self._buckets) > self._sweep_at:
            full = self._capacity
            self._buckets = {k: v for k, v in self._buckets.items() if self._tokens(k, now) < full}
            self._sweep_at = max(10_000, 2 * len(self._buckets))

    @property
    def _capacity(self) -> float:
        return _capacity(self.per_minute)

    def _tokens(self, key: str, now: float) -> float:
        return refilled(self._buckets.get(key), now, self.per_minute)


def user_bucket(user_id: str) -> str:
    """The name of a user's bucket, which goes with the user's erasure."""
    return f"user:{user_id}"


def _capacity(per_minute: float) -> float:
    return max(1.0, per_minute)


def refilled(held: tuple[float, float] | None, now: float, per_minute: float) -> float:
    """A bucket's tokens at `now`: (tokens, when counted) refilled at `per_minute`, up to its
    capacity; a bucket never counted (None) is full. A clock that went back refills nothing."""
    capacity = _capacity(per_minute)
    if held is None:
        return capacity
    tokens, then = held
    return min(capacity, tokens + max(0.0, now - then) * per_minute / 60)


@dataclass(frozen=True, slots=True)
class VerifyLimits:
    """How often credentials may be verified: per user (whoever asks) and per caller
    (whichever users it asks about), a token bucket each; the buckets themselves are kept by
    the store (`vault.credentials.VerifyBuckets`), so that front ends sharing one count
    together. A refused call takes no token."""

    per_user: float
    per_caller: float

    @classmethod
    def per_minute(cls, user: float, caller: float) -> VerifyLimits:
        return cls(user, caller)

    def buckets(self, user_id: str, caller: str) -> list[str]:
        return [user_bucket(user_id), f"caller:{caller}"]

    def admit(
        self, held: dict[str, tuple[float, float]], user_id: str, caller: str, now: float
    ) -> tuple[tuple[str, float] | None, dict[str, tuple[float, float, float]]]:
        """Given the buckets as held (bucket -> (tokens, when counted); a missing one is
        full): (None, both buckets with a token taken, as (tokens, when counted, when full
        again), to keep) if the call may go ahead; else (which limit it hit, "user" or
        "caller", and the seconds until it would not; nothing to keep). A bucket is counted
        at the later of `now` and when it was counted before: a clock that went back does
        not refill it twice."""
        waits, taken = [], {}
        rates = (self.per_user, self.per_caller)
        for kind, bucket, rate in zip(("user", "caller"), self.buckets(user_id, caller), rates, strict=True):
            before = held.get(bucket)
            tokens = refilled(before, now, rate)
            waits.append((kind, 0.0 if tokens >= 1 else (1 - tokens) * 60 / rate))
            at = max(now, before[1]) if before else now
            taken[bucket] = (tokens - 1, at, at + (_capacity(rate) - tokens + 1) * 60 / rate)
        over = max(waits, key=lambda w: w[1])
        return (over, {}) if over[1] > 0 else (None, taken)
