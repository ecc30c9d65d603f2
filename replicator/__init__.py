"""The replication worker: reads the primary's outbox and ships sealed copies to regions
(`loop`), under a lease per destination (`lease`), each copy built by a pure function
(`copies`) and sent through a sink (`sinks`: a region node, an S3 bucket)."""
