"""`residency`: one program for every role. `residency --help` lists the commands."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.errors import ResidencyError

log = logging.getLogger("residency")


def _default_identity() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except Exception:
        return "operator"


def parse_assignment(text: str) -> tuple[str, Any]:
    """FIELD=text (a string), FIELD:=JSON (number, true/false, list of strings),
    FIELD@=ISO-8601 (a timestamp)."""
    for sep in ("@=", ":=", "="):
        name, found, raw = text.partition(sep)
        if found and name and "=" not in name and ":" not in name and "@" not in name:
            if sep == "=":
                return name, raw
            if sep == ":=":
                try:
                    return name, json.loads(raw)
                except json.JSONDecodeError as e:
                    raise argparse.ArgumentTypeError(f"{name}: not JSON: {e}") from e
            try:
                return name, datetime.fromisoformat(raw.replace("Z", "+00:00"))
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{name}: not an ISO-8601 time: {raw}") from e
    raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, FIELD:=JSON or FIELD@=TIME, got {text!r}")


def _print_rpc_error(e: grpc.aio.AioRpcError | grpc.RpcError) -> int:
    print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
    status = rpc_status.from_call(e) if hasattr(e, "trailing_metadata") else None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            for v in br.field_violations:
                print(f"  {v.field}: {v.description}", file=sys.stderr)
    return 1


async def _records(args: argparse.Namespace) -> int:
    from residency.v1 import common_pb2, records_pb2, records_pb2_grpc
    from server import codec

    ctx = common_pb2.CallContext(location=args.location, purpose=args.purpose)
    meta = (("x-residency-identity", args.identity),)
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = records_pb2_grpc.RecordServiceStub(channel)
        if args.action == "put":
            record = records_pb2.Record(user_id=args.user_id, source=args.source or "")
            for name, value in args.fields:
                record.fields[name].CopyFrom(codec.to_value(value))
            reply = await stub.PutRecord(
                records_pb2.PutRecordRequest(context=ctx, record=record), metadata=meta, timeout=args.timeout
            )
            print(json.dumps({"user_id": reply.user_id, "version": reply.version}))
        elif args.action == "get":
            reply = await stub.GetRecord(
                records_pb2.GetRecordRequest(context=ctx, user_id=args.user_id),
                metadata=meta,
                timeout=args.timeout,
            )
            r = reply.record
            out = {
                "user_id": r.user_id,
                "version": r.version,
                "source": r.source,
                "home_region": r.home_region,
                "fields": {n: codec.to_json(codec.from_value(v)) for n, v in sorted(r.fields.items())},
                "withheld": [
                    {"field": w.field, "category": w.category, "reason": w.reason, "detail": w.detail}
                    for w in reply.withheld
                ],
            }
            if reply.log_sequence:
                out["log_sequence"] = reply.log_sequence
            print(json.dumps(out, indent=2, ensure_ascii=False))
        else:
            reply = await stub.DeleteRecord(
                records_pb2.DeleteRecordRequest(context=ctx, user_id=args.user_id),
                metadata=meta,
                timeout=args.timeout,
            )
            print(json.dumps({"user_id": reply.user_id, "version": reply.version, "deleted": True}))
    return 0


async def _log_tail(args: argparse.Namespace) -> int:
    from residency.v1 import translog_pb2, translog_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = translog_pb2_grpc.TransferLogServiceStub(channel)
        req = translog_pb2.TailEntriesRequest(after_sequence=args.after, limit=args.limit)
        async for e in stub.TailEntries(req, timeout=args.timeout):
            sys.stdout.write(e.entry_json + "\n")
    return 0


async def _status(args: argparse.Namespace) -> int:
    from residency.v1 import admin_pb2, admin_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        node = await stub.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=args.timeout)
        out: dict[str, Any] = {
            "node": json_format.MessageToDict(node, always_print_fields_with_no_presence=True)
        }
        if node.role == "primary":
            rep = await stub.ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=args.timeout)
            out["replication"] = json_format.MessageToDict(rep, always_print_fields_with_no_presence=True)
    print(json.dumps(out, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.config import load_config
    from server.node import serve

    asyncio.run(serve(load_config(args.config)))
    return 0


def _init(args: argparse.Namespace) -> int:
    from server.deployment import init_deployment

    paths = init_deployment(args.dir)
    for region, path in paths.items():
        print(f"{region}: {path}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from server import keylife
    from server.config import load_config
    from server.errors import ConfigError

    config = load_config(args.config)
    if config.region != args.region:
        raise ConfigError(
            f"{config.path}: this config is for region {config.region}, not {args.region}; "
            "--region must name the config's region"
        )
    if args.action == "rotate":
        out = keylife.rotate(config, args.identity, progress=not args.quiet)
    elif args.action == "retire":
        out = keylife.retire(config, args.identity)
    else:
        if not args.yes:
            print(
                f"error: shredding the key of {args.region} makes every copy there unreadable, "
                "for good; add --yes to confirm",
                file=sys.stderr,
            )
            return 2
        out = keylife.shred(config, args.identity, args.reason)
    print(json.dumps(out))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    return run_demo(users=args.users, directory=Path(args.dir) if args.dir else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="residency", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="run a three-region deployment on loopback, load users, report")
    s.add_argument("--users", type=int, default=1000, help="synthetic users to write (default 1000)")
    s.add_argument("--dir", help="keep the deployment in DIR (default: a temporary folder)")
    s.set_defaults(run=_demo)

    s = sub.add_parser("init", help="write a local three-region deployment into DIR")
    s.add_argument("dir")
    s.set_defaults(run=_init)

    s = sub.add_parser("serve", help="run a node until SIGTERM/SIGINT")
    s.add_argument("--config", required=True)
    s.set_defaults(run=_serve)

    keys = sub.add_parser("keys", help="rotate, retire or shred a region's keys").add_subparsers(
        dest="action", required=True
    )
    for action, text in (
        ("rotate", "new key version; rewraps region.key and every data key (not the fields), with progress"),
        ("retire", "after a rotation: old key versions stop decrypting"),
        ("shred", "destroy a compromised region's key: every copy there becomes unreadable"),
    ):
        s = keys.add_parser(action, help=text)
        s.add_argument("--config", required=True, help="the config of the node that holds the key")
        s.add_argument("--region", required=True, help="the region whose key it is (must match the config)")
        s.add_argument("--identity", default=_default_identity(), help="who does it (logged)")
        if action == "rotate":
            s.add_argument("--quiet", action="store_true", help="no progress bar")
        if action == "shred":
            s.add_argument("--reason", default="key compromised", help="why (logged)")
            s.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
        s.set_defaults(run=_keys)

    def client(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--target", required=True, help="HOST:PORT of a node")
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")

    rec = sub.add_parser("records", help="put, get or delete a record").add_subparsers(
        dest="action", required=True
    )
    for action in ("put", "get", "delete"):
        s = rec.add_parser(action)
        client(s)
        s.add_argument("--location", required=True, help="the caller's region")
        s.add_argument("--purpose", required=True, help="a Fides data use, e.g. essential.service")
        s.add_argument("--identity", default=_default_identity(), help="the caller's identity")
        s.add_argument("user_id")
        if action == "put":
            s.add_argument("--source", help="registration, automatic or partner:NAME")
            s.add_argument(
                "fields",
                nargs="*",
                type=parse_assignment,
                metavar="FIELD=VALUE",
                help="FIELD=text, FIELD:=JSON (numbers, true/false, lists), FIELD@=ISO-8601 time",
            )
        s.set_defaults(run=lambda a: asyncio.run(_records(a)))

    lg = sub.add_parser("log", help="the transfer log").add_subparsers(dest="action", required=True)
    s = lg.add_parser("tail", help="print transfer-log entries as JSON lines")
    client(s)
    s.add_argument("--after", type=int, default=0, help="start after this sequence")
    s.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    s.set_defaults(run=lambda a: asyncio.run(_log_tail(a)))

    s = sub.add_parser("status", help="a node's status and, on the primary, replication status")
    client(s)
    s.set_defaults(run=lambda a: asyncio.run(_status(a)))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except grpc.RpcError as e:
        return _print_rpc_error(e)
    except ResidencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
