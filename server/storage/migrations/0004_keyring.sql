-- The keyring (issue 4), a separate file (keys.db) beside node.db: per-user wrapped data keys
-- and the wrapping keys that wrap them. Kept apart so that erasing a user's data key makes any
-- earlier copy of node.db unreadable for that user.
CREATE TABLE IF NOT EXISTS keyring.wrapping_keys (
    id         TEXT PRIMARY KEY,
    wrapped    BLOB NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keyring.data_keys (
    user_id      TEXT PRIMARY KEY,
    wrapping_key TEXT NOT NULL,
    wrapped      BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keyring.data_keys_by_wrapping_key ON data_keys (wrapping_key);
