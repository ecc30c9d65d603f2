"""`residency serve`, `init`, `certs issue`, `status` and `demo`: run a node, write a
deployment, issue a client or node certificate, ask a node how it is, and run the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from residency.cli.channel import add_target, open_channel
from residency.cli.logs import add_log_format
from residency.v1 import admin_pb2, admin_pb2_grpc


def _serve(args: argparse.Namespace) -> int:
    from residency.server.config.node import load_config
    from residency.server.node import serve

    asyncio.run(serve(load_config(args.config)))
    return 0


def _init(args: argparse.Namespace) -> int:
    from residency.server.deployment import init_deployment

    paths = init_deployment(args.dir)
    for region, path in paths.items():
        print(f"{region}: {path}")
    if args.compose:
        from residency.server.bootstrap import write_compose_secrets

        print(f"compose: {write_compose_secrets(Path(args.dir).resolve())}")
    return 0


def _certs_issue(args: argparse.Namespace) -> int:
    from residency.server.core.errors import ConfigError
    from residency.server.keys import pki

    if args.host and args.role != "node":
        print("error: --host is for node certificates (--role node)", file=sys.stderr)
        return 2
    hosts = (tuple(args.host) or pki.NODE_HOSTS) if args.role == "node" else ()
    try:
        ident = pki.issue(
            Path(args.deployment) / "pki", args.role, args.region, args.name, Path(args.out), args.days, hosts
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}.crt, {args.out}.key: {ident.uri}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with open_channel(args) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        node = await stub.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=args.timeout)
        out: dict[str, Any] = {
            "node": json_format.MessageToDict(node, always_print_fields_with_no_presence=True)
        }
        if node.role == "primary":
            try:
                rep = await stub.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=args.timeout)
            except grpc.aio.AioRpcError as e:  # an operator of another region sees the node only
                if e.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                out["replication"] = {"notShown": e.details()}
            else:
                out["replication"] = json_format.MessageToDict(rep, always_print_fields_with_no_presence=True)
    print(json.dumps(out, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from residency.cli.demo import run_demo

    return run_demo(users=args.users, directory=Path(args.dir) if args.dir else None)


def add_demo(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("demo", help="run a three-region deployment on loopback, load users, report")
    s.add_argument("--users", type=int, default=1000, help="synthetic users to write (default 1000)")
    s.add_argument("--dir", help="keep the deployment in DIR (default: a temporary folder)")
    s.set_defaults(run=_demo)


def add_init(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("init", help="write a local three-region deployment into DIR")
    s.add_argument("dir")
    s.add_argument(
        "--compose",
        action="store_true",
        help="also write DIR/compose: the secrets deploy/compose.yaml needs (OpenBao's dev root "
        "token, the S3 key pair of SeaweedFS and the log archive)",
    )
    s.set_defaults(run=_init)


def add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run a node until SIGTERM/SIGINT")
    s.add_argument("--config", required=True)
    add_log_format(s)
    s.set_defaults(run=_serve)


def add_certs(sub: argparse._SubParsersAction) -> None:
    from residency.server.keys.pki import ROLES

    certs = sub.add_parser("certs", help="issue certificates from a deployment's CA").add_subparsers(
        dest="action", required=True
    )
    s = certs.add_parser(
        "issue", help="write PREFIX.crt and PREFIX.key (0600) for spiffe://TD/ROLE/REGION/NAME"
    )
    s.add_argument("--deployment", required=True, help="the deployment folder (its CA is in DIR/pki)")
    s.add_argument("--role", required=True, choices=ROLES)
    s.add_argument("--region", required=True, help="the holder's region: its location on every call")
    s.add_argument("--name", required=True, help="the holder's name (a recipient's id for a recipient)")
    s.add_argument("--out", required=True, help="PREFIX of the files written")
    s.add_argument("--days", type=int, default=365, help="days of validity (default 365)")
    s.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address the node serves on (repeat; node certificates only; "
        "default localhost and 127.0.0.1)",
    )
    s.set_defaults(run=_certs_issue)


def add_status(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("status", help="a node's status and, on the primary, replication status")
    add_target(s)
    s.set_defaults(run=lambda a: asyncio.run(_status(a)))
