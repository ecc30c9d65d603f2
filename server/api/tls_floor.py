"""TLS 1.3 only, on every listener and client of the `residency` command.

grpcio has no setting for a minimum TLS version (neither server nor channel credentials take
one). What it does take, process-wide and read once when gRPC loads, is the list of TLS 1.2
(and older) cipher suites: `GRPC_SSL_CIPHER_SUITES`. TLS 1.3's suites are not governed by
that list. Naming only a pre-shared-key suite, with no pre-shared key configured anywhere,
leaves TLS 1.2 nothing it can agree on: a TLS 1.2 client is refused at the handshake (no
shared cipher), even one that offers that very suite, while TLS 1.3 negotiates as before.

`pin()` must run before anything imports grpc (`residency.cli` does it first). Because the
trick hangs on when gRPC reads its settings, the node does not trust it: after it starts
listening it tries a TLS 1.2 handshake with itself (`accepts_tls12`) and stops if one works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from residency.server.core.errors import ConfigError

if TYPE_CHECKING:
    from residency.server.config.tls import TlsConfig

log = logging.getLogger("residency.tls")

VARIABLE = "GRPC_SSL_CIPHER_SUITES"
# A suite gRPC's TLS library knows (so the list is valid) and that no server of ours can
# choose: it needs a pre-shared key, and none is ever configured.
TLS12_SUITES = "ECDHE-PSK-CHACHA20-POLY1305"


def pin() -> None:
    """Sets the TLS 1.2 cipher list for gRPC in this process (and the processes it starts);
    a value the environment had is replaced: it could only have re-opened TLS 1.2."""
    os.environ[VARIABLE] = TLS12_SUITES


def handshake(address: str, version: ssl.TLSVersion, cert: Path, key: Path, ca: Path) -> str | None:
    """The version a client speaking only `version`, presenting `cert`, agrees with the
    listener at ADDRESS (host:port, a wildcard host meaning this machine) on; None when the
    handshake is refused. Errors of connecting propagate."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.check_hostname = False  # whether the handshake completes is the question
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                return tls.version()
        except ssl.SSLError:
            return None


def check(address: str, cert: Path, key: Path, ca: Path) -> str | None:
    """Raises ConfigError when the listener at ADDRESS accepts a TLS 1.2 client; otherwise
    None, or why the floor could not be checked. TLS 1.3 with the same certificate comes
    first: a TLS 1.2 refusal proves nothing if that certificate is refused anyway."""
    if handshake(address, ssl.TLSVersion.TLSv1_3, cert, key, ca) != "TLSv1.3":
        return "a TLS 1.3 client with the node's own certificate is refused: the TLS 1.2 floor is unchecked"
    if handshake(address, ssl.TLSVersion.TLSv1_2, cert, key, ca) is not None:
        raise ConfigError(
            f"listener {address} accepts a TLS 1.2 client: {VARIABLE} was not {TLS12_SUITES!r} "
            "when gRPC loaded (start nodes with the `residency` command)"
        )
    return None


async def verify(listen: str, port: int, t: TlsConfig) -> None:
    """`check` for a node listening on LISTEN (its configured HOST:PORT) at PORT, logged:
    ConfigError when TLS 1.2 is accepted."""
    address = f"{listen.rpartition(':')[0]}:{port}"
    try:
        unchecked = await asyncio.to_thread(check, address, t.cert, t.key, t.ca)
    except OSError as e:
        unchecked = f"cannot connect to check the TLS 1.2 floor: {e}"
    if unchecked:
        log.warning("listener %s: %s", address, unchecked)
    else:
        log.info("listener %s: TLS 1.3 agreed, TLS 1.2 refused", address)
