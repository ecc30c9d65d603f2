"""`residency health --config NODE.yaml`: a probe's question to the node on this host, asked
over mutual TLS with the node's own certificate (every listener is mutual TLS: there is no
plaintext health port). Exit status 0 when SERVING, 1 when not serving or no answer, 2 when the
config cannot be read. It runs every few seconds: the config model and the health stubs are
imported only when it runs, and it asks once, without waiting for a node that is not there."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys

import grpc
from cryptography import x509

from residency.cli.channel import Credentials
from residency.server.core.errors import ConfigError


def local_target(listen: str) -> str:
    """The node's `listen` address as a caller on its host dials it: a wildcard host (0.0.0.0,
    [::]) is loopback of its family."""
    host, _, port = listen.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return listen  # a host name
    if not ip.is_unspecified:
        return listen
    return f"[::1]:{port}" if ip.version == 6 else f"127.0.0.1:{port}"


def server_name(cert_pem: bytes, host: str) -> str:
    """A name the node's certificate is checked against: `host` if the certificate names it,
    else its first DNS name (loopback may be none of its SANs), else its first IP address."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    dns = [
        # A wildcard names every host of its domain: check against one of them.
        f"health.{n[2:]}" if n.startswith("*.") else n
        for n in sans.get_values_for_type(x509.DNSName)
    ]
    ips = [str(a) for a in sans.get_values_for_type(x509.IPAddress)]
    if host.strip("[]") in dns + ips:
        return host.strip("[]")
    if not dns + ips:
        raise ValueError("it names no DNS name or IP address (subjectAltName)")
    return (dns + ips)[0]


async def check(creds: Credentials, target: str, name: str, service: str, timeout: float) -> int:
    """The node's answer to one `grpc.health.v1.Health/Check`: its status."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", name)]
    async with creds.channel(target, options) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return reply.status


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2

    from residency.server.config.node import load_config

    config = load_config(args.config)  # a ConfigError: `main` says so and exits 2
    tls, target = config.tls, local_target(config.listen)
    try:
        for path in (tls.key, tls.ca):
            path.read_bytes()  # readable, or the channel would say so less clearly
        name = server_name(tls.cert.read_bytes(), target.rpartition(":")[0])
    except OSError as e:
        raise ConfigError(f"{config.path}: cannot read 'tls': {e}") from None
    except ValueError as e:
        raise ConfigError(f"{config.path}: 'tls.cert' {tls.cert}: {e}") from None
    creds, label = Credentials(tls.cert, tls.key, tls.ca), f"{args.service!r} at {target}"
    try:
        status = asyncio.run(check(creds, target, name, args.service, args.timeout))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"no answer within {args.timeout:g} s"
        elif e.code() == grpc.StatusCode.NOT_FOUND:
            why = "the node has no health service of that name"
        else:
            why = f"{e.code().name}: {e.details()}"
        print(f"residency health: {label}: {why}", file=sys.stderr)
        return 1
    except Exception as e:  # a probe says why in one line, never with a traceback
        print(f"residency health: {label}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if status == health_pb2.HealthCheckResponse.SERVING:
        print("SERVING")
        return 0
    print(f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status)} {label}")
    return 1


def add_health(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "health",
        help="ask the node on this host whether it is ready (or alive) over mutual TLS, with its own "
        "certificate: for Kubernetes exec probes and Compose healthchecks",
    )
    s.add_argument("--config", required=True, help="the node's config: its listen address and tls files")
    s.add_argument(
        "--service",
        default="readiness",
        help='readiness (default), liveness, "" (the overall status) or an API service\'s name',
    )
    s.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    s.set_defaults(run=_health)
