"""TLS 1.3 only, on every gRPC listener and client of the `residency` command.

grpcio has no setting for a minimum TLS version (neither server nor channel credentials take
one). What it does take, process-wide and read once when gRPC loads, is the list of TLS 1.2
(and older) cipher suites: `GRPC_SSL_CIPHER_SUITES`. TLS 1.3's suites are not governed by
that list. Naming only a pre-shared-key suite, with no pre-shared key configured anywhere,
leaves TLS 1.2 nothing it can agree on: a TLS 1.2 client is refused at the handshake (no
shared cipher), even one that offers that very suite, while TLS 1.3 negotiates as before.

`pin()` must run before anything imports grpc (`residency.cli` does it first). Because the
trick hangs on when gRPC reads its settings, a node does not trust it: before it opens its
store or its port, `verify` starts a listener with the node's credentials on loopback and
sends it a TLS 1.0-1.2 ClientHello offering every suite; the node stops if a ServerHello
comes back, or if it cannot tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import warnings
from typing import TYPE_CHECKING

from residency.server.core.errors import ConfigError

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("residency.tls")

VARIABLE = "GRPC_SSL_CIPHER_SUITES"
# A suite gRPC's TLS library knows (so the list is valid) and that no server of ours can
# choose: it needs a pre-shared key, and none is ever configured.
TLS12_SUITES = "ECDHE-PSK-CHACHA20-POLY1305"
_HANDSHAKE, _SERVER_HELLO = 22, 2  # a TLS record's content type; a handshake message's type


def pin() -> None:
    """Sets the TLS 1.2 cipher list for gRPC in this process (and the processes it starts);
    a value the environment had is replaced: it could only have re-opened TLS 1.2."""
    os.environ[VARIABLE] = TLS12_SUITES


def accepts_tls12(host: str, port: int) -> bool:
    """Whether the listener at HOST:PORT answers a ClientHello of TLS 1.0 to 1.2, offering
    every suite this machine's OpenSSL has, with a ServerHello: the server has then chosen a
    version below 1.3 and a suite. No certificate is involved (the server chooses before it
    asks for one), so neither the client's nor the server's can make the answer wrong.
    Connection errors propagate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings(), contextlib.suppress(ValueError, ssl.SSLError):
        warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.0 is the point
        context.minimum_version = ssl.TLSVersion.TLSv1  # a build without it starts higher
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()  # writes the ClientHello, then waits for an answer it never gets
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(outgoing.read())
        answer = b""
        while len(answer) < 6 and (chunk := raw.recv(6 - len(answer))):
            answer += chunk
    # A record: content type (1 byte), version (2), length (2), then the message's type.
    return len(answer) == 6 and answer[0] == _HANDSHAKE and answer[5] == _SERVER_HELLO


def handshake(host: str, port: int, version: ssl.TLSVersion, cert: str, key: str, ca: str) -> str | None:
    """The version a client speaking only `version`, presenting `cert`, completes a handshake
    with HOST:PORT at; None when the handshake is refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca)
    context.load_cert_chain(cert, key)
    context.check_hostname = False
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                return tls.version()
        except ssl.SSLError:
            return None


async def verify(credentials: grpc.ServerCredentials) -> None:
    """ConfigError unless a listener of this process with `credentials` refuses TLS 1.2 (and
    older), or when that cannot be checked: a throwaway gRPC server on loopback, probed by
    `accepts_tls12`, stopped before the node serves anything."""
    import grpc

    server = grpc.aio.server()
    try:
        for host in ("127.0.0.1", "::1"):
            with contextlib.suppress(RuntimeError):  # grpcio's "Failed to bind"
                if port := server.add_secure_port(f"[{host}]:0" if ":" in host else f"{host}:0", credentials):
                    break
        else:
            raise ConfigError("cannot listen on loopback to check that TLS 1.2 is refused")
        await server.start()
        try:
            accepted = await asyncio.to_thread(accepts_tls12, host, port)
        except OSError as e:
            raise ConfigError(f"cannot connect to loopback to check that TLS 1.2 is refused: {e}") from None
    finally:
        await server.stop(None)
    if accepted:
        raise ConfigError(
            f"TLS 1.2 is accepted: {VARIABLE} was not {TLS12_SUITES!r} when gRPC loaded in this "
            "process (start nodes with the `residency` command, not from a program that imported grpc first)"
        )
    log.info("TLS 1.2 refused at the handshake: listeners serve TLS 1.3 only")
