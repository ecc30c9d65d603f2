-- Consents, third-party grants and retention sweeps (issue 3).
CREATE TABLE consents (
    user_id     TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    sensitive   INTEGER NOT NULL,
    granted_at  REAL NOT NULL,
    withdrawn_at REAL,
    evidence    TEXT NOT NULL,
    actor       TEXT NOT NULL,
    PRIMARY KEY (user_id, purpose, recipient, sensitive)
) WITHOUT ROWID;
CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    recipient   TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    legal_basis TEXT NOT NULL,
    categories  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    ends_at     REAL NOT NULL,
    revoked_at  REAL,
    ended_logged INTEGER NOT NULL DEFAULT 0,
    actor       TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE grant_users (
    grant_id TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    PRIMARY KEY (user_id, grant_id)
) WITHOUT ROWID;
CREATE TABLE sweeps (
    name   TEXT PRIMARY KEY,
    cutoff REAL NOT NULL
);
CREATE INDEX records_updated ON records (updated_at);
