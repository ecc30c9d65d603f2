"""`residency health --config NODE.yaml`: a probe's question to the node on this host, asked
over mutual TLS with the node's own certificate (every listener is mutual TLS: there is no
plaintext health port). Exit status 0 when SERVING, 1 when not serving or no answer, 2 when the
config cannot be read. It runs every few seconds: the config model and the health stubs are
imported only when it runs, and it does not wait for a node that is not there.

Front ends of one host may share one listen address (gRPC binds it with SO_REUSEPORT): the
kernel then hands each new connection to one of them. Every answer names the process that gave
it, which also wrote its name into `DATA_DIR/serving-LISTEN.lock` at start; an answer from
another process is not this config's, nor is a failure on the way (a sibling stopping), and the
probe asks again on a new connection, up to `ATTEMPTS` times, until its own answers or the time
is up. A node that is gone is then not vouched for by its sibling; one whose lock file names no
process (never started here, or not readable by the probe's user) is not asked."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys

import grpc
from cryptography import x509

from residency.cli.channel import Credentials
from residency.server.core.errors import ConfigError

# New connections tried for the answer of this config's own process, when another process on
# the same address answers: with two front ends, a 1 in 2^16 chance of never reaching it.
ATTEMPTS = 16


class Elsewhere(Exception):
    """Only other processes sharing the address answered."""


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


async def check(creds: Credentials, target: str, name: str, service: str, timeout: float) -> tuple[int, str]:
    """One `grpc.health.v1.Health/Check` on a new connection: (the status, the name of the
    process that answered, "" if it gave none)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from residency.server.api.health import INSTANCE

    # A channel of its own, not one sharing a connection with the last: a new connection is a
    # new draw among the processes sharing the address.
    options = [("grpc.ssl_target_name_override", name), ("grpc.use_local_subchannel_pool", 1)]
    async with creds.channel(target, options) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        reply = await call
        answered = dict(await call.trailing_metadata() or ()).get(INSTANCE, "")
    return reply.status, str(answered)


async def ask(creds: Credentials, target: str, name: str, service: str, timeout: float, own: str) -> int:
    """The status this config's process (`own`: the name it wrote at start) gives within
    `timeout` seconds. An answer from another process sharing the address (one of an older
    version names none), or a failure on the way (a sibling stopping; a hung one, so each try
    gets half the time left, at least a second), is tried again on a new connection while time
    is left; then Elsewhere if only other processes answered, else the last failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    others: set[str] = set()
    failure: grpc.aio.AioRpcError | None = None
    for _ in range(ATTEMPTS):
        left = deadline - loop.time()
        if left <= 0 and (others or failure):
            break
        try:
            status, answered = await check(creds, target, name, service, max(min(left, 1.0), left / 2))
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            failure = e
            continue
        if answered == own:
            return status
        others.add(answered)
    if others:
        raise Elsewhere(f"only another process on this address answered ({len(others)} of them)")
    assert failure is not None  # one try at least was made
    raise failure


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2

    from residency.server.config.node import load_config
    from residency.server.storage.running import serving_instance, serving_lock

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
        own = serving_instance(config.data_dir, config.listen)
        if not own:
            lock = serving_lock(config.data_dir, config.listen)
            print(
                f"residency health: {label}: no `residency serve` of this config started on this "
                f"host ({lock} names none, or cannot be read)",
                file=sys.stderr,
            )
            return 1
        status = asyncio.run(ask(creds, target, name, args.service, args.timeout, own))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"no answer within {args.timeout:g} s"
        elif e.code() == grpc.StatusCode.NOT_FOUND:
            why = "the node has no health service of that name"
        else:
            why = f"{e.code().name}: {e.details()}"
        print(f"residency health: {label}: {why}", file=sys.stderr)
        return 1
    except Elsewhere as e:
        print(f"residency health: {label}: {e}, not the node of this config", file=sys.stderr)
        return 1
    except Exception as e:  # a probe says why in one line, never with a traceback
        print(f"residency health: {label}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if status == health_pb2.HealthCheckResponse.SERVING:
        print("SERVING")
        return 0
    print(f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status)} {label}")
    return 1


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


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
    s.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for the answer (default 3)")
    s.set_defaults(run=_health)
