"""`residency`: the command line for operators and reviewers, one module per command group."""

import os

from residency.server.api import tls_floor

# Before anything imports grpc, which reads these once, when it loads. TLS 1.3 only
# (`tls_floor`). gRPC's own lines (a refused handshake is one, at INFO, in gRPC's format on
# stderr) only for errors, so that a node's output stays in its --log-format; an operator
# tracing a connection sets GRPC_VERBOSITY=INFO or DEBUG.
tls_floor.pin()
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
