-- Replication control, shared by every worker process on this store: leases (one worker ships
-- to a destination at a time), per-destination state (paused, last error, copies sent) and
-- dead letters (copies a destination refused for good).
CREATE TABLE leases (
    destination TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE TABLE destination_state (
    destination TEXT PRIMARY KEY,
    paused      INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT NOT NULL DEFAULT '',
    copies_sent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE dead_letters (
    destination TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    version     INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    failed_at   REAL NOT NULL,
    retry       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, user_id)
) WITHOUT ROWID;
