"""The gRPC edge: one servicer per service, the caller's identity, and the one mapping of
domain errors to statuses.
"""
