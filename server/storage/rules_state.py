"""The `rules_state` table: the rule set the records were last re-projected for, and how far
that re-projection got (a cursor over user ids), so that a restart resumes it and a start
under another rules file re-projects (review finding 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from residency.server.storage.database import Database


@dataclass(frozen=True, slots=True)
class RulesState:
    version: str
    # The last user re-projected; None once every live record was.
    after: str | None
    done: int
    total: int


class RulesStateStore(Protocol):
    def rules_state(self) -> RulesState | None: ...
    def set_rules_state(self, state: RulesState) -> None: ...
    def last_logged_rules_version(self) -> str: ...
    def set_rules_text(self, version: str, text: bytes) -> None: ...
    def rules_text(self) -> tuple[str, bytes] | None: ...
    def rules_version(self) -> str: ...
    def notify(self, kind: str) -> None: ...


class RulesStateRows(Database):
    def rules_state(self) -> RulesState | None:
        row = self._db.execute("SELECT version, after, done, total FROM rules_state WHERE id = 1").fetchone()
        return None if row is None else RulesState(row[0], row[1], int(row[2]), int(row[3]))

    def set_rules_state(self, state: RulesState) -> None:
        self._db.execute(
            "INSERT INTO rules_state (id, version, after, done, total) VALUES (1,?,?,?,?) "
            "ON CONFLICT (id) DO UPDATE SET version=excluded.version, after=excluded.after, "
            "done=excluded.done, total=excluded.total",
            (state.version, state.after, state.done, state.total),
        )

    def set_rules_text(self, version: str, text: bytes) -> None:
        """The text of rule set `version`, which `set_rules_state` has just made current."""
        self._db.execute("UPDATE rules_state SET text = ? WHERE id = 1 AND version = ?", (text, version))

    def rules_version(self) -> str:
        """The version of the rule set in force, if the store has its text ("": none)."""
        row = self._db.execute("SELECT version FROM rules_state WHERE id = 1 AND text IS NOT NULL").fetchone()
        return "" if row is None else str(row[0])

    def rules_text(self) -> tuple[str, bytes] | None:
        """(version, text) of the rule set in force, if the store has its text."""
        row = self._db.execute("SELECT version, text FROM rules_state WHERE id = 1").fetchone()
        return None if row is None or row[1] is None else (str(row[0]), bytes(row[1]))

    def last_logged_rules_version(self) -> str:
        """The rules version of the newest transfer-log entry that names one ("": none). For a
        store from before `rules_state`: the rule set it last ran under."""
        (before,) = self._db.execute("SELECT coalesce(max(sequence), 0) + 1 FROM translog").fetchone()
        while True:
            page = self._db.execute(
                "SELECT sequence, entry FROM translog WHERE sequence < ? ORDER BY sequence DESC LIMIT 500",
                (before,),
            ).fetchall()
            if not page:
                return ""
            for seq, data in page:
                if version := json.loads(data).get("rules_version"):
                    return str(version)
                before = seq
