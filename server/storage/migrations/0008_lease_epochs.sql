-- Fencing (issue 15.5). On the primary's store: each destination's lease epoch, raised by one
-- whenever the lease passes to another worker or is taken again after it expired (a release
-- keeps the row, and so the epoch, with the lease expired). On a region node: the highest
-- epoch it has taken a batch under, per source region; a batch under a lower one is refused.
ALTER TABLE leases ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
CREATE TABLE lease_epochs_seen (
    source TEXT PRIMARY KEY,
    epoch  INTEGER NOT NULL
);
