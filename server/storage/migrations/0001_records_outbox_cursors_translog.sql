-- Records (or copies), the outbox, replication cursors and the transfer log.
CREATE TABLE records (
    user_id    TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0,
    blob       BLOB NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE outbox (
    sequence   INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE cursors (
    destination TEXT PRIMARY KEY,
    sequence    INTEGER NOT NULL
);
CREATE TABLE translog (
    sequence INTEGER PRIMARY KEY,
    entry    BLOB NOT NULL,
    chain    BLOB NOT NULL
);
