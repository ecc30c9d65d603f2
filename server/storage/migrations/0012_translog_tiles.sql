-- The transfer log's Merkle tree as C2SP tlog-tiles (issue 17.7): `hashes` is the tile's
-- 32-byte hashes, 256 for a full tile, fewer for the partial tile on the right edge of each
-- level. Written in the transaction that appends the entries they cover; a store that has
-- entries and no tiles gets them built once when it is next opened.
CREATE TABLE log_tiles (
    level  INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    hashes BLOB NOT NULL,
    PRIMARY KEY (level, idx)
);
