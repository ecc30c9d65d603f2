-- Blind indexes (issue 18): per lookup field, HMAC-SHA256 under the region's index key (version
-- `key_version`, `index.key`) of the normalised value, and the user it belongs to. Never the
-- value. Rows of two key versions coexist while a rotation rebuilds the index.
CREATE TABLE IF NOT EXISTS lookup_index (
    key_version INTEGER NOT NULL,
    field       TEXT NOT NULL,
    hmac        BLOB NOT NULL,
    user_id     TEXT NOT NULL,
    PRIMARY KEY (key_version, field, hmac, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lookup_index_by_user ON lookup_index (user_id, field);
