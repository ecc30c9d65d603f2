-- What processes of one shared store tell each other (an erasure, a rules change, a key
-- event), as rows: written in the transaction of the change, under the writers' lock that
-- every write transaction takes first, so that `seq` counts up in commit order without a
-- gap. A process with `store.notices: poll` reads the rows after the last it saw (for
-- databases without LISTEN/NOTIFY: CockroachDB, YugabyteDB); the others are woken by NOTIFY.
-- The latest 10,000 are kept. On SQLite (one process) nothing writes it.
CREATE TABLE store_notices (
    seq    INTEGER PRIMARY KEY,
    token  TEXT NOT NULL,
    kind   TEXT NOT NULL,
    detail TEXT NOT NULL
)
