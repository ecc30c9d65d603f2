-- The rule set last applied and its re-projection (review finding 2): one row. `version` is
-- the rules version the store's records were last re-projected for (and logged as a
-- `rules_change`); `after` the last user re-projected so far, NULL once every live record has
-- been; `done` and `total` the progress `residency status` shows. Written in the transaction
-- that logs the change and in each page's, so a restart resumes where the last page ended,
-- and a start with another rules file than `version` logs the change and re-projects.
CREATE TABLE rules_state (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version TEXT NOT NULL,
    after   TEXT,
    done    INTEGER NOT NULL DEFAULT 0,
    total   INTEGER NOT NULL DEFAULT 0
);
