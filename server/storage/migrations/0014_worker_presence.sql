-- Workers share destinations evenly: each replication worker announces itself here, renewed
-- with its leases (same life). Live workers (rows not expired) split the destinations, each
-- taking about its fair share. `regions` are the destinations the worker ships to, joined by
-- ",": a worker is waited for only on destinations it could take (`--region` limits some).
-- A row is deleted when its worker stops, or by any worker once it has expired.
CREATE TABLE workers (
    owner      TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    regions    TEXT NOT NULL
);
