"""The pure domain: schema, transfer rules and projection, sealing inputs, Merkle math,
checkpoints, entries, reports. No I/O, no gRPC.
"""
