"""The replication worker: reads the primary's outbox and ships sealed copies to regions."""
