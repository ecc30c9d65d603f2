"""The `credential_limits` table: `VerifyCredential`'s token buckets, shared by every front end of
a store (the arithmetic is `core.policy.credentials.VerifyLimits`)."""

from __future__ import annotations

from typing import Protocol

from residency.server.storage.database import Database

# bucket -> (tokens, when counted)
Held = dict[str, tuple[float, float]]
# bucket -> (tokens, when counted, when full again)
Taken = dict[str, tuple[float, float, float]]


class LimitStore(Protocol):
    def now(self) -> float: ...
    def limits_held(self, buckets: list[str]) -> Held: ...
    def limits_set(self, taken: Taken) -> None: ...
    def limits_forget(self, bucket: str) -> None: ...
    def limits_sweep(self, now: float) -> int: ...


class LimitRows(Database):
    """The `credential_limits` table."""

    def limits_held(self, buckets: list[str]) -> Held:
        """The buckets counted so far (one not in the table is full)."""
        marks = ",".join("?" * len(buckets))
        rows = self._db.execute(
            f"SELECT bucket, tokens, at FROM credential_limits WHERE bucket IN ({marks})", buckets
        )
        return {b: (t, at) for b, t, at in rows}

    def limits_set(self, taken: Taken) -> None:
        self._db.executemany(
            "INSERT INTO credential_limits (bucket, tokens, at, full_at) VALUES (?,?,?,?)"
            " ON CONFLICT(bucket) DO UPDATE SET"
            " tokens=excluded.tokens, at=excluded.at, full_at=excluded.full_at",
            [(b, *row) for b, row in sorted(taken.items())],
        )

    def limits_forget(self, bucket: str) -> None:
        self._db.execute("DELETE FROM credential_limits WHERE bucket=?", (bucket,))

    def limits_sweep(self, now: float) -> int:
        """Deletes the buckets full again by `now`; how many."""
        return self._db.execute("DELETE FROM credential_limits WHERE full_at <= ?", (now,)).rowcount
