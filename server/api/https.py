"""The metrics port over the node's mutual TLS: Prometheus text over HTTPS, TLS 1.3 only, to a
client certificate of the deployment's CA that the gRPC port would take too
(`ServerTls.refusal`: not revoked, not expired, naming an identity of the trust domain; any
role, as the text names no user, field or value).

prometheus_client's request handler (`MetricsHandler`) serves the text; its own TLS server
(`start_http_server(certfile=...)`) is not used: it reads the certificate once (a SIGHUP must
reread it, as for the gRPC port), knows no revocation list, and shakes hands on the thread that
accepts connections, so one client that never finishes its handshake stops every scrape.
Here each connection's handshake runs on its own thread, with a deadline, a few at a time."""

from __future__ import annotations

import contextlib
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

# A scrape's connection: its handshake, request and answer within this, or it is cut; and at
# most this many at once (Prometheus needs one; more are closed at once).
TIMEOUT = 10.0
CONNECTIONS = 8


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ServerTls
    turns: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.turns.acquire(blocking=False):  # on the accepting thread: no thread for it
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TIMEOUT)
        live = [request]  # the socket to cut: the TLS one once wrapped (it takes the descriptor)
        cut = threading.Timer(TIMEOUT, _cut, (live,))  # however slowly the client sends
        cut.start()
        try:  # on this connection's own thread (`ThreadingHTTPServer`)
            try:
                conn = self.tls.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):  # plaintext, no certificate, another CA, TLS 1.2
                return
            live[0] = conn
            try:
                der = conn.getpeercert(binary_form=True)
                # Revoked or expired since the CA issued it, or naming no identity: refused
                # before its request is read. The handshake was with the CA of now.
                if self.tls.refusal(read_peer(der) if der else None, chain=None) is None:
                    super().finish_request(conn, client_address)
            finally:
                conn.close()
        finally:
            cut.cancel()
            self.turns.release()


def _cut(live: list[socket.socket]) -> None:
    with contextlib.suppress(OSError):  # closed already
        socket.socket.shutdown(live[0], socket.SHUT_RDWR)


def serve_metrics_tls(
    listen: str, tls: ServerTls, collectors: tuple[Collector, ...] = ()
) -> Callable[[], None]:
    """Serves the process's metrics (`REGISTRY`, with `collectors` registered for as long) on
    `listen` (HOST:PORT, `[::]` for IPv6) over mutual TLS from a thread; returns its stop.
    Raises OSError, with nothing registered, if it cannot listen there."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)[0][0]
    handler = MetricsHandler.factory(REGISTRY)
    attributes = {"tls": tls, "address_family": family, "turns": threading.BoundedSemaphore(CONNECTIONS)}
    server = type("Server", (_Server,), attributes)((host, int(port)), handler)
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
