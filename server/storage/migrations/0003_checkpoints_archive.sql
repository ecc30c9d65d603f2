-- Signed checkpoints of the transfer log and how far it is archived. The Merkle tree itself
-- is rebuilt from the entries at start: leaf hashes are a pure function of them.
CREATE TABLE checkpoints (
    tree_size  INTEGER PRIMARY KEY,
    note       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE archived (
    tree_size   INTEGER PRIMARY KEY,
    uploaded_at REAL NOT NULL
);
