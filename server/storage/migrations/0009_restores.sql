-- Restores from a backup (issue 16.8). Each restore raises the epoch by one; every record
-- version issued after it is above `epoch << 40` (`RecordRows.version_floor`), so no version
-- the lost store had issued after its backup, and sent on, is issued again. `summary` is the
-- JSON the restore printed.
CREATE TABLE restores (
    epoch       INTEGER PRIMARY KEY,
    restored_at REAL NOT NULL,
    summary     TEXT NOT NULL
);
