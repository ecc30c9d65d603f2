"""The `credential_limits` table: `VerifyCredential`'s token buckets, shared by every front end of
a store (the arithmetic is `core.policy.credentials.VerifyLimits`)."""

from __future__ import annotations

from typing import Protocol

from residency.server.storage.database import Database

# bucket -> (tokens, when counted)
Held = dict[str, tuple[float, float]]


class LimitStore(Protocol):
    def now(self) -> float: ...
    def limits_held(self, buckets: list[str]) -> Held: ...
    def limits_set(self, held: Held) -> None: ...
    def limits_forget(self, bucket: str) -> None: ...
    def limits_sweep(self, before: float) -> int: ...


class LimitRows(Database):
    """The `credential_limits` table."""

    def limits_held(self, buckets: list[str]) -> Held:
        """The buckets counted so far (one not in the table is full)."""
        marks = ",".join("?" * len(buckets))
        rows = self._db.execute(
            f"SELECT bucket, tokens, at FROM credential_limits WHERE bucket IN ({marks})", buckets
        )
        return {b: (t, at) for b, t, at in rows}

    def limits_set(self, held: Held) -> None:
        self._db.executemany(
            "INSERT INTO credential_limits (bucket, tokens, at) VALUES (?,?,?)"
            " ON CONFLICT(bucket) DO UPDATE SET tokens=excluded.tokens, at=excluded.at",
            [(b, t, at) for b, (t, at) in sorted(held.items())],
        )

    def limits_forget(self, bucket: str) -> None:
        self._db.execute("DELETE FROM credential_limits WHERE bucket=?", (bucket,))

    def limits_sweep(self, before: float) -> int:
        """Deletes the buckets last counted before `before` (full again by then); how many."""
        return self._db.execute("DELETE FROM credential_limits WHERE at < ?", (before,)).rowcount
