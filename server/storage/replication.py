"""The outbox and replication control: queued versions, per-destination cursors, leases,
pause and last error, copies sent, dead letters, and the status that sums them up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from residency.server.storage.database import Database


@dataclass(slots=True)
class OutboxItem:
    sequence: int
    user_id: str
    version: int
    created_at: float


class OutboxStore(Protocol):
    """What a write uses: it queues the versions it made, in its own transaction."""

    def outbox_append(self, items: list[tuple[str, int]]) -> None: ...


class LeaseStore(Protocol):
    """What a worker's leases use: one worker ships to a destination at a time, and live
    workers (their presence) share the destinations evenly."""

    def now(self) -> float: ...
    def lease_take(
        self, destination: str, owner: str, now: float, ttl: float, new_hold: bool = False
    ) -> tuple[bool, bool, int]: ...
    def lease_held(self, destination: str, owner: str, now: float, epoch: int) -> bool: ...
    def lease_release(self, destination: str, owner: str) -> None: ...
    def lease_epoch_above(self, destination: str, owner: str, epoch: int, seen: int, now: float) -> int: ...
    def worker_present(self, owner: str, regions: list[str], now: float, ttl: float) -> None: ...
    def worker_leave(self, owner: str) -> None: ...
    def live_workers(self, now: float, horizon: float) -> list[tuple[str, list[str], int]]: ...


class FenceStore(Protocol):
    """What a region node uses to refuse a stale worker: the highest lease epoch it has taken
    a batch under, per source region."""

    def lease_epoch_seen(self, source: str) -> int: ...
    def see_lease_epoch(self, source: str, epoch: int) -> None: ...


class ReplicationStore(LeaseStore, Protocol):
    """What a replication worker uses: the outbox from its cursor, its lease, dead letters."""

    def outbox_after(self, sequence: int, limit: int) -> list[OutboxItem]: ...
    def outbox_trim_below(self, destinations: list[str]) -> None: ...
    def cursor(self, destination: str) -> int: ...
    def adopt_destination(self, destination: str) -> bool: ...
    def set_cursor(self, destination: str, sequence: int) -> None: ...
    def is_paused(self, destination: str) -> bool: ...
    def set_last_error(self, destination: str, error: str) -> None: ...
    def key_state(self, destination: str) -> tuple[str, bytes | None, str | None]: ...
    def set_key_shredded(self, destination: str, reason: str) -> None: ...
    def set_region_key(self, destination: str, statement: bytes) -> None: ...
    def set_resend_after(self, destination: str, user_id: str | None) -> None: ...
    def add_copies_sent(self, destination: str, n: int) -> None: ...
    def dead_letter(self, destination: str, items: list[tuple[str, int, str]], now: float) -> None: ...
    def dead_letters_superseded(self, destination: str, delivered: list[tuple[str, int]]) -> None: ...
    def dead_letters(
        self, destination: str, retry_only: bool = False, limit: int = 1000
    ) -> list[tuple[str, int, str, float, int]]: ...


class ReplicationControlStore(Protocol):
    """What an operator uses: status, pause and resume, re-driving dead letters."""

    def replication_status(self, destinations: list[str], now: float) -> dict[str, Any]: ...
    def outbox_depth(self) -> int: ...
    def set_paused(self, destination: str, paused: bool) -> None: ...
    def request_retry(self, destination: str) -> int: ...


class ReplicationRows(Database):
    """The `outbox`, `cursors`, `leases`, `workers`, `destination_state`, `dead_letters` and
    `lease_epochs_seen` tables."""

    # ---- the outbox and cursors --------------------------------------------------------

    def outbox_append(self, items: list[tuple[str, int]]) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT INTO outbox (user_id, version, created_at) VALUES (?,?,?)",
            [(u, v, now) for u, v in items],
        )

    def outbox_after(self, sequence: int, limit: int) -> list[OutboxItem]:
        return [
            OutboxItem(*r)
            for r in self._db.execute(
                "SELECT sequence, user_id, version, created_at FROM outbox WHERE sequence > ? "
                "ORDER BY sequence LIMIT ?",
                (sequence, limit),
            )
        ]

    def _outbox_head(self) -> int:
        # The sequence's high-water mark, kept even after the outbox is trimmed.
        return self._last_outbox_sequence()

    def outbox_depth(self) -> int:
        """Changes kept in the outbox (trimmed once every destination has them)."""
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def _outbox_count_after(self, sequence: int) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM outbox WHERE sequence > ?", (sequence,)).fetchone()
        return int(n)

    def _outbox_oldest_after(self, sequence: int) -> float | None:
        row = self._db.execute(
            "SELECT created_at FROM outbox WHERE sequence > ? ORDER BY sequence LIMIT 1", (sequence,)
        ).fetchone()
        return row[0] if row else None

    def outbox_trim_below(self, destinations: list[str]) -> None:
        """Drops outbox entries every destination has applied."""
        if not destinations:
            return
        marks = ",".join("?" * len(destinations))
        applied, known = self._db.execute(
            f"SELECT min(sequence), count(*) FROM cursors WHERE destination IN ({marks})", destinations
        ).fetchone()
        if known == len(destinations) and applied:
            self._db.execute("DELETE FROM outbox WHERE sequence <= ?", (applied,))

    def adopt_destination(self, destination: str) -> bool:
        """A destination this store has never shipped to reads the outbox from its start while
        the outbox still holds every change; once some were trimmed, it starts at the head and
        is first sent every live record (`resend_after`): what it needs is what exists now.
        True when that re-send was scheduled."""
        if self._db.execute("SELECT 1 FROM cursors WHERE destination=?", (destination,)).fetchone():
            return False
        head = self._outbox_head()
        (first,) = self._db.execute("SELECT min(sequence) FROM outbox").fetchone()
        trimmed = head > 0 and (first is None or first > 1)
        self.set_cursor(destination, head if trimmed else 0)
        if trimmed:
            self.set_resend_after(destination, "")
        return trimmed

    def cursor(self, destination: str) -> int:
        row = self._db.execute("SELECT sequence FROM cursors WHERE destination=?", (destination,)).fetchone()
        return row[0] if row else 0

    def set_cursor(self, destination: str, sequence: int) -> None:
        self._db.execute(
            "INSERT INTO cursors (destination, sequence) VALUES (?,?) "
            "ON CONFLICT(destination) DO UPDATE SET sequence=excluded.sequence",
            (destination, sequence),
        )

    # ---- leases, pause, last error, copies sent -----------------------------------------

    def lease_take(
        self, destination: str, owner: str, now: float, ttl: float, new_hold: bool = False
    ) -> tuple[bool, bool, int]:
        """Takes or renews the lease on `destination` for `owner` if it is free, expired or
        already `owner`'s. Returns (held, paused, epoch). The epoch goes up by one, in the same
        statement, whenever the lease is taken by another owner, after it expired, or by a new
        process of the same owner (`new_hold`: a node restarted takes its own lease back at
        once, under an epoch its predecessor's late batches do not have); a renewal in time
        keeps it, so a batch's epoch names the one unbroken hold it was shipped under."""
        self._db.execute(
            "INSERT INTO leases (destination, owner, expires_at, epoch) VALUES (?,?,?,1) "
            "ON CONFLICT(destination) DO UPDATE SET owner=excluded.owner, expires_at=excluded.expires_at, "
            "epoch=CASE WHEN leases.owner=excluded.owner AND leases.expires_at >= ? AND ? = 0 "
            "THEN leases.epoch ELSE leases.epoch + 1 END "
            "WHERE leases.owner=excluded.owner OR leases.expires_at < ?",
            (destination, owner, now + ttl, now, int(new_hold), now),
        )
        row = self._db.execute(
            "SELECT owner, expires_at, epoch FROM leases WHERE destination=?", (destination,)
        ).fetchone()
        held = row is not None and row[0] == owner and row[1] > now
        return held, self.is_paused(destination), row[2] if held else 0

    def lease_held(self, destination: str, owner: str, now: float, epoch: int) -> bool:
        row = self._db.execute(
            "SELECT owner, expires_at, epoch FROM leases WHERE destination=?", (destination,)
        ).fetchone()
        return row is not None and row[0] == owner and row[1] > now and row[2] == epoch

    def lease_release(self, destination: str, owner: str) -> None:
        # Expired rather than deleted: the row keeps the epoch, which must never go back.
        self._db.execute(
            "UPDATE leases SET expires_at=0 WHERE destination=? AND owner=?", (destination, owner)
        )

    def lease_epoch_above(self, destination: str, owner: str, epoch: int, seen: int, now: float) -> int:
        """Moves `owner`'s hold under `epoch` to epoch `seen + 1` (a destination has seen
        `seen`); returns it, or 0 if `owner` no longer holds the lease under `epoch`."""
        cur = self._db.execute(
            "UPDATE leases SET epoch=? WHERE destination=? AND owner=? AND epoch=? AND expires_at > ?",
            (seen + 1, destination, owner, epoch, now),
        )
        return seen + 1 if cur.rowcount else 0

    def worker_present(self, owner: str, regions: list[str], now: float, ttl: float) -> None:
        """Announces `owner` as a live worker shipping to `regions` until `now + ttl`, and
        drops the rows of workers that expired (stopped without leaving, or killed)."""
        self._db.execute("DELETE FROM workers WHERE expires_at <= ? AND owner <> ?", (now, owner))
        self._db.execute(
            "INSERT INTO workers (owner, expires_at, regions) VALUES (?,?,?) "
            "ON CONFLICT(owner) DO UPDATE SET expires_at=excluded.expires_at, regions=excluded.regions",
            (owner, now + ttl, ",".join(sorted(regions))),
        )

    def worker_leave(self, owner: str) -> None:
        self._db.execute("DELETE FROM workers WHERE owner=?", (owner,))

    def live_workers(self, now: float, horizon: float) -> list[tuple[str, list[str], int]]:
        """(owner, regions, leases it holds now) of each worker whose presence expires after
        `now` and no later than `horizon`: a row further out than any worker renews to is not
        a live worker's (a clock far ahead, or a row written by hand), and counting it could
        keep a lease unheld."""
        rows = self._db.execute(
            "SELECT w.owner, w.regions, count(l.destination) FROM workers w "
            "LEFT JOIN leases l ON l.owner = w.owner AND l.expires_at > ? "
            "WHERE w.expires_at > ? AND w.expires_at <= ? GROUP BY w.owner, w.regions ORDER BY w.owner",
            (now, now, horizon),
        )
        return [(owner, regions.split(",") if regions else [], int(n)) for owner, regions, n in rows]

    def lease_epoch_seen(self, source: str) -> int:
        row = self._db.execute("SELECT epoch FROM lease_epochs_seen WHERE source=?", (source,)).fetchone()
        return row[0] if row else 0

    def see_lease_epoch(self, source: str, epoch: int) -> None:
        self._db.execute(
            "INSERT INTO lease_epochs_seen (source, epoch) VALUES (?,?) "
            "ON CONFLICT(source) DO UPDATE SET epoch=CASE WHEN excluded.epoch > lease_epochs_seen.epoch "
            "THEN excluded.epoch ELSE lease_epochs_seen.epoch END",
            (source, epoch),
        )

    def _state(self, destination: str, column: str, value: Any) -> None:
        self._db.execute(
            f"INSERT INTO destination_state (destination, {column}) VALUES (?,?) "
            f"ON CONFLICT(destination) DO UPDATE SET {column}=excluded.{column}",
            (destination, value),
        )

    def is_paused(self, destination: str) -> bool:
        row = self._db.execute(
            "SELECT paused FROM destination_state WHERE destination=?", (destination,)
        ).fetchone()
        return bool(row and row[0])

    def set_paused(self, destination: str, paused: bool) -> None:
        self._state(destination, "paused", int(paused))

    def set_last_error(self, destination: str, error: str) -> None:
        self._state(destination, "last_error", error)

    # ---- a destination's region key (shredded, rekeyed, re-sent) -------------------------

    def key_state(self, destination: str) -> tuple[str, bytes | None, str | None]:
        """(why its key is shredded or "", the learned region key or None, where
        re-sending under it has got to or None)."""
        row = self._db.execute(
            "SELECT key_shredded, region_key, resend_after FROM destination_state WHERE destination=?",
            (destination,),
        ).fetchone()
        return (row[0], row[1], row[2]) if row else ("", None, None)

    def set_key_shredded(self, destination: str, reason: str) -> None:
        self._state(destination, "key_shredded", reason)

    def set_region_key(self, destination: str, statement: bytes) -> None:
        """A new region key learned: the hold ends and every copy is sent again under it."""
        self._state(destination, "region_key", statement)
        self._state(destination, "key_shredded", "")
        self._state(destination, "resend_after", "")

    def set_resend_after(self, destination: str, user_id: str | None) -> None:
        self._state(destination, "resend_after", user_id)

    def add_copies_sent(self, destination: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO destination_state (destination, copies_sent) VALUES (?,?) "
            "ON CONFLICT(destination) DO UPDATE SET "
            "copies_sent=destination_state.copies_sent+excluded.copies_sent",
            (destination, n),
        )

    # ---- dead letters --------------------------------------------------------------------

    def dead_letter(self, destination: str, items: list[tuple[str, int, str]], now: float) -> None:
        """Records copies (user, version, reason) a destination refused for good. One per
        user: a later refused version replaces an earlier one."""
        self._db.executemany(
            "INSERT INTO dead_letters (destination, user_id, version, reason, failed_at, retry) "
            "VALUES (?,?,?,?,?,0) ON CONFLICT (destination, user_id) DO UPDATE SET version=excluded.version, "
            "reason=excluded.reason, failed_at=excluded.failed_at, retry=0",
            [(destination, u, v, r, now) for u, v, r in items],
        )

    def dead_letters_superseded(self, destination: str, delivered: list[tuple[str, int]]) -> None:
        """A delivered version supersedes any dead letter of the same user at or below it."""
        self._db.executemany(
            "DELETE FROM dead_letters WHERE destination=? AND user_id=? AND version<=?",
            [(destination, u, v) for u, v in delivered],
        )

    def dead_letters(
        self, destination: str, retry_only: bool = False, limit: int = 1000
    ) -> list[tuple[str, int, str, float, int]]:
        """(user, version, reason, failed_at, retry) of a destination's dead letters."""
        where = " AND retry=1" if retry_only else ""
        return list(
            self._db.execute(
                "SELECT user_id, version, reason, failed_at, retry FROM dead_letters "
                f"WHERE destination=?{where} ORDER BY failed_at LIMIT ?",
                (destination, limit),
            )
        )

    def request_retry(self, destination: str) -> int:
        """Marks a destination's dead letters to be re-driven; returns how many."""
        cur = self._db.execute("UPDATE dead_letters SET retry=1 WHERE destination=?", (destination,))
        return cur.rowcount

    def replication_status(self, destinations: list[str], now: float) -> dict[str, Any]:
        """Per destination: cursor, pending entries, lag (by `now`, the writers' clock), dead
        letters, pause, lease (by the store's clock, `now()`, which leases are kept in)."""
        out: dict[str, Any] = {"head": self._outbox_head(), "destinations": {}}
        leases_now = self.now()
        for d in destinations:
            cursor = self.cursor(d)
            oldest = self._outbox_oldest_after(cursor)
            state = self._db.execute(
                "SELECT paused, last_error, copies_sent, key_shredded, resend_after, region_key "
                "FROM destination_state WHERE destination=?",
                (d,),
            ).fetchone() or (0, "", 0, "", None, None)
            lease = self._db.execute(
                "SELECT owner, expires_at FROM leases WHERE destination=?", (d,)
            ).fetchone()
            (dead,) = self._db.execute(
                "SELECT count(*) FROM dead_letters WHERE destination=?", (d,)
            ).fetchone()
            out["destinations"][d] = {
                "applied_sequence": cursor,
                "pending": self._outbox_count_after(cursor),
                "lag_seconds": max(0.0, now - oldest) if oldest else 0.0,
                "paused": bool(state[0]),
                "last_error": state[1],
                "copies_sent": state[2],
                "dead_lettered": dead,
                "lease_owner": lease[0] if lease and lease[1] > leases_now else "",
                "key_state": f"key shredded: {state[3]}" if state[3] else _resending(state[4], state[5]),
            }
        return out


def _resending(after: str | None, region_key: bytes | None) -> str:
    if after is None:
        return ""
    if region_key is not None:
        return "re-sending every copy under the region's new key"
    return "sending every live record's copy: a destination new to this store"
