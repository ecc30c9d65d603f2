"""Consents, third-party grants (and the users they name) and retention sweep cutoffs."""

from __future__ import annotations

from typing import Any, Protocol

from residency.server.storage.database import Database

# (user_id, purpose, recipient, sensitive, granted_at, withdrawn_at, evidence, actor)
ConsentRow = tuple[str, str, str, int, float, float | None, str, str]
# (user_id, id, recipient, purpose, legal_basis, categories, ends_at, revoked_at)
UserGrantRow = tuple[str, str, str, str, str, str, float, float | None]
# (id, recipient, purpose, legal_basis, categories, created_at, ends_at, revoked_at, actor, users)
GrantRow = tuple[str, str, str, str, str, float, float, float | None, str, int]


class ConsentStore(Protocol):
    """What consent, grant and retention operations use."""

    def consent_set(
        self,
        user_id: str,
        purpose: str,
        recipient: str,
        sensitive: bool,
        when: float,
        evidence: str,
        actor: str,
        withdraw: bool,
    ) -> bool: ...
    def consents(self, user_ids: list[str], include_withdrawn: bool = False) -> list[ConsentRow]: ...
    def grant_put(self, grant: dict[str, Any], users: list[str]) -> None: ...
    def grant_revoke(self, grant_id: str, when: float) -> bool: ...
    def grants_for(self, user_ids: list[str]) -> list[UserGrantRow]: ...
    def grants_list(self) -> list[GrantRow]: ...
    def grants_ended_unlogged(self, now: float) -> list[tuple[str, str, float | None]]: ...
    def grant_users(self, grant_id: str) -> list[str]: ...
    def grant_mark_ended(self, grant_id: str) -> None: ...
    def grants_leave(self, user_id: str) -> int: ...
    def sweep_cutoff(self, name: str) -> float: ...
    def set_sweep_cutoff(self, name: str, cutoff: float) -> None: ...


class ConsentRows(Database):
    """The `consents`, `grants`, `grant_users` and `sweeps` tables."""

    def consent_set(
        self,
        user_id: str,
        purpose: str,
        recipient: str,
        sensitive: bool,
        when: float,
        evidence: str,
        actor: str,
        withdraw: bool,
    ) -> bool:
        """Grants or withdraws one consent; returns whether the standing state changed."""
        row = self._db.execute(
            "SELECT withdrawn_at FROM consents WHERE user_id=? AND purpose=? AND recipient=? AND sensitive=?",
            (user_id, purpose, recipient, int(sensitive)),
        ).fetchone()
        standing = row is not None and row[0] is None
        if withdraw:
            if standing:
                self._db.execute(
                    "UPDATE consents SET withdrawn_at=?, evidence=?, actor=? WHERE user_id=? AND purpose=? "
                    "AND recipient=? AND sensitive=?",
                    (when, evidence, actor, user_id, purpose, recipient, int(sensitive)),
                )
            return standing
        self._db.execute(
            "INSERT INTO consents (user_id, purpose, recipient, sensitive, granted_at,"
            " withdrawn_at, evidence, actor) VALUES (?,?,?,?,?,NULL,?,?)"
            " ON CONFLICT (user_id, purpose, recipient, sensitive) DO UPDATE SET"
            " granted_at=excluded.granted_at, withdrawn_at=NULL, evidence=excluded.evidence,"
            " actor=excluded.actor",
            (user_id, purpose, recipient, int(sensitive), when, evidence, actor),
        )
        return not standing

    def consents(self, user_ids: list[str], include_withdrawn: bool = False) -> list[ConsentRow]:
        """Consents of `user_ids`, standing ones only unless `include_withdrawn`."""
        extra = "" if include_withdrawn else " AND withdrawn_at IS NULL"
        return self._where_in(
            "SELECT user_id, purpose, recipient, sensitive, granted_at, withdrawn_at, evidence, actor "
            "FROM consents WHERE user_id IN ({marks})" + extra + " ORDER BY user_id, purpose, recipient",
            user_ids,
        )

    def grant_put(self, grant: dict[str, Any], users: list[str]) -> None:
        self._db.execute(
            "INSERT INTO grants (id, recipient, purpose, legal_basis, categories, created_at, ends_at, actor)"
            " VALUES (:id, :recipient, :purpose, :legal_basis, :categories, :created_at, :ends_at, :actor)",
            grant,
        )
        self._db.executemany(
            "INSERT INTO grant_users (grant_id, user_id) VALUES (?,?) ON CONFLICT DO NOTHING",
            [(grant["id"], u) for u in users],
        )

    def grant_revoke(self, grant_id: str, when: float) -> bool:
        cur = self._db.execute(
            # A grant that has ended already is not revoked: nothing would change.
            "UPDATE grants SET revoked_at=? WHERE id=? AND revoked_at IS NULL AND ends_at > ?",
            (when, grant_id, when),
        )
        return cur.rowcount == 1

    def grants_for(self, user_ids: list[str]) -> list[UserGrantRow]:
        """Every grant naming one of `user_ids`, ended or not."""
        return self._where_in(
            "SELECT gu.user_id, g.id, g.recipient, g.purpose, g.legal_basis, g.categories, g.ends_at,"
            " g.revoked_at FROM grant_users gu JOIN grants g ON g.id = gu.grant_id"
            " WHERE gu.user_id IN ({marks})",
            user_ids,
        )

    def grants_list(self) -> list[GrantRow]:
        """Every grant, oldest first, with the number of users it names."""
        return self._db.execute(
            "SELECT id, recipient, purpose, legal_basis, categories, created_at, ends_at, revoked_at, actor,"
            " (SELECT count(*) FROM grant_users WHERE grant_id = grants.id) FROM grants ORDER BY created_at"
        ).fetchall()

    def grants_ended_unlogged(self, now: float) -> list[tuple[str, str, float | None]]:
        """(id, recipient, revoked_at) of grants past their end (or revoked) whose ending is
        not yet carried out."""
        return self._db.execute(
            "SELECT id, recipient, revoked_at FROM grants"
            " WHERE ended_logged=0 AND (ends_at <= ? OR revoked_at IS NOT NULL)",
            (now,),
        ).fetchall()

    def grant_users(self, grant_id: str) -> list[str]:
        return [
            r[0] for r in self._db.execute("SELECT user_id FROM grant_users WHERE grant_id=?", (grant_id,))
        ]

    def grant_mark_ended(self, grant_id: str) -> None:
        self._db.execute("UPDATE grants SET ended_logged=1 WHERE id=?", (grant_id,))

    def grants_leave(self, user_id: str) -> int:
        """Takes `user_id` out of every grant naming it (an erasure: the id may later be
        another person's); returns how many grants named it."""
        return self._db.execute("DELETE FROM grant_users WHERE user_id=?", (user_id,)).rowcount

    def sweep_cutoff(self, name: str) -> float:
        row = self._db.execute("SELECT cutoff FROM sweeps WHERE name=?", (name,)).fetchone()
        return row[0] if row else 0.0

    def set_sweep_cutoff(self, name: str, cutoff: float) -> None:
        self._db.execute(
            "INSERT INTO sweeps (name, cutoff) VALUES (?,?)"
            " ON CONFLICT(name) DO UPDATE SET cutoff=excluded.cutoff",
            (name, cutoff),
        )
