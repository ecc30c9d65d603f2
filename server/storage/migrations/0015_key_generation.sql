-- Which wrapping keys new data keys may still go under, across the front ends of one store
-- (review finding: a key rotation and retire through one front end while another kept
-- wrapping new data keys under the old version, which the retire then made unreadable).
-- `generation` grows with every rotation and retirement; each process's wrapping key belongs
-- to the generation it was made in, and the transaction that adds data keys under it checks
-- that the generation is still current: after a rotation commits, no process wraps a new
-- data key under an older version. In node.db (the main schema), not keys.db: SQLite commits
-- the two files one after the other, and a crash between them must not leave the schema
-- version counted with this table missing.
CREATE TABLE key_generation (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT INTO key_generation (id, generation) VALUES (1, 0);
