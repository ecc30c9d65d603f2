"""Disclosure requests under the two-person rule: asked, decided (approved or denied) and
released, each change conditional on the state it leaves."""

from __future__ import annotations

from typing import Any, Protocol

from residency.server.storage.database import Database

_COLUMNS = (
    "id",
    "user_id",
    "third_party",
    "destination_country",
    "ground",
    "fields",
    "evidence",
    "purpose",
    "requester",
    "requested_at",
    "expires_at",
    "state",
    "decided_by",
    "decided_at",
    "decision_reason",
    "released_at",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM disclosures"


class DisclosureStore(Protocol):
    """What disclosure operations use."""

    def disclosure_put(self, row: dict[str, Any]) -> None: ...
    def disclosure_get(self, request_id: str) -> dict[str, Any] | None: ...
    def disclosure_decide(
        self, request_id: str, state: str, actor: str, when: float, reason: str
    ) -> bool: ...
    def disclosure_released(self, request_id: str, when: float) -> bool: ...
    def disclosures_list(self) -> list[dict[str, Any]]: ...


class DisclosureRows(Database):
    """The `disclosures` table; `fields` and `evidence` are stored as the JSON text given."""

    def disclosure_put(self, row: dict[str, Any]) -> None:
        """Stores a new request (every column but the decision's and the release's)."""
        given = [c for c in _COLUMNS if c in row]
        self._db.execute(
            f"INSERT INTO disclosures ({', '.join(given)}) VALUES ({', '.join(':' + c for c in given)})", row
        )

    def disclosure_get(self, request_id: str) -> dict[str, Any] | None:
        row = self._db.execute(_SELECT + " WHERE id=?", (request_id,)).fetchone()
        return dict(zip(_COLUMNS, row, strict=True)) if row else None

    def disclosure_decide(self, request_id: str, state: str, actor: str, when: float, reason: str) -> bool:
        """Approves or denies a request still waiting; False if it was not."""
        cur = self._db.execute(
            "UPDATE disclosures SET state=?, decided_by=?, decided_at=?, decision_reason=?"
            " WHERE id=? AND state='requested'",
            (state, actor, when, reason, request_id),
        )
        return cur.rowcount == 1

    def disclosure_released(self, request_id: str, when: float) -> bool:
        """Marks an approved request released; False if it was not approved."""
        cur = self._db.execute(
            "UPDATE disclosures SET state='released', released_at=? WHERE id=? AND state='approved'",
            (when, request_id),
        )
        return cur.rowcount == 1

    def disclosures_list(self) -> list[dict[str, Any]]:
        """Every request, oldest first."""
        return [
            dict(zip(_COLUMNS, r, strict=True)) for r in self._db.execute(_SELECT + " ORDER BY requested_at")
        ]
