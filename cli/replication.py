"""`residency replication status|pause|resume|retry` (on the primary) and `residency replicate`
(a standalone replication worker)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from residency.cli.channel import add_target, open_channel
from residency.cli.logs import add_log_format
from residency.v1 import admin_pb2, admin_pb2_grpc


async def _replication(args: argparse.Namespace) -> int:
    async with open_channel(args) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        if args.action == "status":
            reply: Any = await stub.ReplicationStatus(
                admin_pb2.ReplicationStatusRequest(), timeout=args.timeout
            )
        elif args.action == "pause":
            reply = await stub.PauseReplication(
                admin_pb2.PauseReplicationRequest(region=args.region), timeout=args.timeout
            )
        elif args.action == "resume":
            reply = await stub.ResumeReplication(
                admin_pb2.ResumeReplicationRequest(region=args.region), timeout=args.timeout
            )
        else:
            reply = await stub.RetryDeadLetters(
                admin_pb2.RetryDeadLettersRequest(region=args.region or ""), timeout=args.timeout
            )
    print(json.dumps(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
    return 0


def _replicate(args: argparse.Namespace) -> int:
    from residency.replicator.standalone import run_worker
    from residency.server.config.node import load_config

    c = load_config(args.config)
    serve, reread = _worker_metrics(args.metrics_listen, c.tls) if args.metrics_listen else (None, None)
    asyncio.run(run_worker(c, args.region or None, serve, reread))
    return 0


def _worker_metrics(
    listen: str, tls_config: Any
) -> tuple[Callable[[Any], Callable[[], None]], Callable[[], None]]:
    """A standalone worker's metrics server (the process's metrics and its leases, over mutual
    TLS with its config's certificate, as a node's metrics port), and what a SIGHUP rereads:
    that certificate, its CA and the revocation list."""
    from residency.replicator.metrics import Leases
    from residency.server.api.https import serve_metrics_tls
    from residency.server.api.tls import ServerTls
    from residency.server.core.errors import ConfigError

    tls = ServerTls(tls_config)

    def serve(replicator: Any) -> Callable[[], None]:
        try:
            return serve_metrics_tls(listen, tls, (Leases(replicator),))
        except OSError as e:
            raise ConfigError(f"--metrics-listen {listen}: cannot listen there ({e.strerror or e})") from e

    return serve, tls.reload


def add_replicate(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("replicate", help="run a replication worker for a primary until SIGTERM/SIGINT")
    s.add_argument("--config", required=True, help="the primary's config file")
    s.add_argument(
        "--region", action="append", help="ship only to this destination (repeat for more; default: all)"
    )
    s.add_argument(
        "--metrics-listen",
        type=_listen,
        metavar="HOST:PORT",
        help="serve Prometheus metrics there (the worker's batches and leases; default: none)",
    )
    add_log_format(s)
    s.set_defaults(run=_replicate)


def _listen(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not (port.isascii() and port.isdecimal()) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT with a port from 1 to 65535")
    return value


def add_replication(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser(
        "replication", help="replication status, pause and resume, dead-letter retry (on the primary)"
    ).add_subparsers(dest="action", required=True)
    s = rp.add_parser("status", help="per destination: lag, pending, dead letters, last error, paused")
    add_target(s)
    s.set_defaults(run=lambda a: asyncio.run(_replication(a)))
    for action, what in (("pause", "stop shipping to"), ("resume", "resume shipping to")):
        s = rp.add_parser(action, help=f"{what} a destination region (every worker obeys)")
        add_target(s)
        s.add_argument("--region", required=True, help="the destination region")
        s.set_defaults(run=lambda a: asyncio.run(_replication(a)))
    s = rp.add_parser("retry", help="re-drive dead letters (their users' current versions)")
    add_target(s)
    s.add_argument("--region", help="only this destination (default: all)")
    s.set_defaults(run=lambda a: asyncio.run(_replication(a)))
