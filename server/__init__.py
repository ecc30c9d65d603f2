"""The residency node: domain core (schema, rules, crypto, store, translog) and gRPC services."""
