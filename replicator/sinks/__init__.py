"""Sinks: where a destination's sealed copies go (a region node over gRPC, an S3 bucket)."""
