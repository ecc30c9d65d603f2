-- Which key events the store has logged, as a digest of them, not only how many (review
-- finding: a process's keys folder compared by count alone was taken as current when it held
-- as many events as the store had logged but not the same ones, say an event of its own that
-- a crash kept from being logged in the place of another process's shred). A process opens
-- nothing while its folder's first `logged` events do not have this `digest`
-- (`lifecycle.events_digest`, hex). In node.db (the main schema), beside the cursor that
-- counts them, and written in the same transaction.
CREATE TABLE key_event_heads (
    region TEXT PRIMARY KEY,
    logged INTEGER NOT NULL,
    digest TEXT NOT NULL
);
