-- Disclosure requests under the two-person rule (issue 13): asked by one identity, approved
-- or denied by another, released once to the one who asked. `fields` and `evidence` are JSON;
-- a request's expiry is computed from `expires_at`, never stored as a state.
CREATE TABLE disclosures (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL,
    third_party         TEXT NOT NULL,
    destination_country TEXT NOT NULL,
    ground              TEXT NOT NULL,
    fields              TEXT NOT NULL,
    evidence            TEXT NOT NULL,
    purpose             TEXT NOT NULL,
    requester           TEXT NOT NULL,
    requested_at        REAL NOT NULL,
    expires_at          REAL NOT NULL,
    state               TEXT NOT NULL,
    decided_by          TEXT NOT NULL DEFAULT '',
    decided_at          REAL,
    decision_reason     TEXT NOT NULL DEFAULT '',
    released_at         REAL
) WITHOUT ROWID;
CREATE INDEX disclosures_requested ON disclosures (requested_at);
