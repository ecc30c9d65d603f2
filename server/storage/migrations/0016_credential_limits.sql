-- VerifyCredential's rate limits (policy 6a): a token bucket per user (`user:ID`) and per
-- caller (`caller:IDENTITY`), kept in the store so that every front end of one store counts
-- against the same buckets (each front end's own buckets let a guesser try N times as often
-- through N of them), timed by the store's clock: `tokens` as counted at `at`, full again at
-- `full_at` (as its taker's limits say). A user's bucket goes with the user's erasure; a
-- bucket full again is as good as none, and the node's policy sweep deletes it.
CREATE TABLE credential_limits (
    bucket  TEXT PRIMARY KEY,
    tokens  REAL NOT NULL,
    at      REAL NOT NULL,
    full_at REAL NOT NULL
);
CREATE INDEX credential_limits_full_at ON credential_limits (full_at);
