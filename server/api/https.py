"""The metrics port over the node's mutual TLS: Prometheus text over HTTPS, TLS 1.3 only, to a
client certificate of the deployment's CA that the gRPC port would take too
(`ServerTls.refusal`: not revoked, not expired, naming an identity of the trust domain; any
role, as the text names no user, field or value).

prometheus_client's request handler (`MetricsHandler`) serves the text; its own TLS server
(`start_http_server(certfile=...)`) is not used: it reads the certificate once (a SIGHUP must
reread it, as for the gRPC port), knows no revocation list, and shakes hands on the thread that
accepts connections, so one client that never finishes its handshake stops every scrape.
Here each connection's handshake runs on its own thread, with a deadline."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from residency.server.api.tls import ServerTls, read_peer

# A scrape's connection: its handshake, request and answer within this.
TIMEOUT = 10.0


class _Handler(MetricsHandler):
    tls: ServerTls

    def do_GET(self) -> None:
        der = self.connection.getpeercert(binary_form=True)
        why = self.tls.refusal(read_peer(der) if der else None)
        if why is not None:  # revoked or expired since the handshake, or no identity
            self.send_error(403, why)
            return
        super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ServerTls

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TIMEOUT)
        try:  # on this connection's own thread (`ThreadingHTTPServer`)
            conn = self.tls.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):  # plaintext, no certificate, another CA, TLS 1.2
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()


def serve_metrics_tls(
    listen: str, tls: ServerTls, collectors: tuple[Collector, ...] = ()
) -> Callable[[], None]:
    """Serves the process's metrics (`REGISTRY`, with `collectors` registered for as long) on
    `listen` (HOST:PORT, `[::]` for IPv6) over mutual TLS from a thread; returns its stop.
    Raises OSError, with nothing registered, if it cannot listen there."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)[0][0]
    handler = type("Handler", (_Handler,), {"tls": tls, "registry": REGISTRY})
    server = type("Server", (_Server,), {"tls": tls, "address_family": family})((host, int(port)), handler)
    for collector in collectors:
        REGISTRY.register(collector)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
        for collector in collectors:
            REGISTRY.unregister(collector)

    return stop
