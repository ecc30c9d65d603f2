"""`residency`: one program for every role. `residency --help` lists the commands."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from datetime import UTC, datetime
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


def _time(text: str) -> float:
    """An ISO-8601 time (a date alone means its midnight UTC) as seconds since the epoch."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text}") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


async def _fetch_log(target: str, timeout: float) -> tuple[Any, list[bytes], list[bytes]]:
    """A fresh signed checkpoint and exactly the entries (and leaf hashes) it covers."""
    from residency.v1 import translog_pb2, translog_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = translog_pb2_grpc.TransferLogServiceStub(channel)
        cp = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(refresh=True), timeout=timeout)
        entries, leaves = [], []
        if cp.tree_size:
            req = translog_pb2.TailEntriesRequest(after_sequence=0, limit=cp.tree_size)
            async for e in stub.TailEntries(req, timeout=timeout):
                entries.append(e.entry_json.encode())
                leaves.append(e.leaf_hash)
    return cp, entries, leaves


def _window(entries: list[bytes], since: float | None, until: float | None) -> dict[str, Any] | None:
    if since is None and until is None:
        return None
    inside = [
        i
        for i, data in enumerate(entries)
        if (since is None or json.loads(data)["time"] >= since)
        and (until is None or json.loads(data)["time"] < until)
    ]
    return {
        "since": since,
        "until": until,
        "first_index": inside[0] if inside else None,
        "last_index": inside[-1] if inside else None,
        "entries": len(inside),
        "note": "entries.jsonl holds the whole tree from index 0: a root is recomputed from every leaf",
    }


async def _log_export(args: argparse.Namespace) -> int:
    from server import bundle

    cp, entries, leaves = await _fetch_log(args.target, args.timeout)
    window = _window(entries, args.since, args.until)
    bundle.write(args.out, entries, leaves, cp.checkpoint, cp.verifier_key, window)
    print(json.dumps({"out": str(args.out), "tree_size": cp.tree_size, "root_hash": cp.root_hash.hex()}))
    return 0


def _log_verify(args: argparse.Namespace) -> int:
    from server import bundle
    from server.checkpoint import CheckpointError

    previous = Path(args.previous).read_text() if args.previous else None
    try:
        v = bundle.verify(args.dir, previous)
    except bundle.BundleError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"FAILED: checkpoint: {e}", file=sys.stderr)
        return 1
    out: dict[str, Any] = {
        "verified": True,
        "origin": v.checkpoint.origin,
        "tree_size": v.checkpoint.size,
        "root_hash": v.checkpoint.root.hex(),
        "signer": v.signer,
    }
    if v.previous is not None:
        out["consistent_with"] = {"tree_size": v.previous.size, "root_hash": v.previous.root.hex()}
    if v.window is not None:
        out["window"] = v.window
    print(json.dumps(out))
    return 0


async def _log_prove(args: argparse.Namespace) -> int:
    from residency.v1 import translog_pb2, translog_pb2_grpc

    if (args.index is None) == (args.from_size is None):
        print("error: give --index I (inclusion) or --from M (consistency)", file=sys.stderr)
        return 2
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = translog_pb2_grpc.TransferLogServiceStub(channel)
        if args.from_size is not None:
            c = await stub.ProveConsistency(
                translog_pb2.ProveConsistencyRequest(from_size=args.from_size, tree_size=args.size),
                timeout=args.timeout,
            )
            out = {"from_size": c.from_size, "tree_size": c.tree_size, "hashes": [h.hex() for h in c.hashes]}
        else:
            p = await stub.ProveInclusion(
                translog_pb2.ProveInclusionRequest(leaf_index=args.index, tree_size=args.size),
                timeout=args.timeout,
            )
            out = {
                "leaf_index": p.leaf_index,
                "tree_size": p.tree_size,
                "hashes": [h.hex() for h in p.hashes],
            }
    print(json.dumps(out))
    return 0


async def _log_report(args: argparse.Namespace) -> int:
    from google.protobuf import json_format as jf

    from residency.v1 import translog_pb2, translog_pb2_grpc
    from server import report

    cp, entries, leaves = await _fetch_log(args.target, args.timeout)
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = translog_pb2_grpc.TransferLogServiceStub(channel)
        ctx = await stub.GetReviewContext(translog_pb2.GetReviewContextRequest(), timeout=args.timeout)
    context = jf.MessageToDict(ctx, preserving_proto_field_name=True)
    key = args.key.read_text() if args.key else cp.verifier_key
    integrity = report.integrity(entries, cp.checkpoint, key)
    text = report.render(args.format, entries, context, integrity, subject=args.subject)
    Path(args.out).write_text(text, encoding="utf-8")
    print(json.dumps({"out": str(args.out), "format": args.format, **integrity.summary()}))
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

    s = lg.add_parser("export", help="write a verifiable bundle: entries, signed checkpoint, key")
    client(s)
    s.add_argument("--out", required=True, type=Path, help="folder to write the bundle into")
    s.add_argument("--since", type=_time, help="ISO-8601 start of the window of interest (inclusive)")
    s.add_argument("--until", type=_time, help="ISO-8601 end of the window of interest (exclusive)")
    s.set_defaults(run=lambda a: asyncio.run(_log_export(a)))

    s = lg.add_parser("verify", help="check an exported bundle offline; exits 1 naming the first bad index")
    s.add_argument("dir", type=Path)
    s.add_argument("--previous", help="an earlier checkpoint file: check the log only grew since")
    s.set_defaults(run=_log_verify)

    s = lg.add_parser("prove", help="print an inclusion (or, with --from, consistency) proof as JSON")
    client(s)
    s.add_argument("--size", type=int, required=True, help="tree size the proof is for")
    s.add_argument("--index", type=int, help="leaf index (sequence - 1) to prove included")
    s.add_argument("--from", dest="from_size", type=int, help="older tree size to prove consistency from")
    s.set_defaults(run=lambda a: asyncio.run(_log_prove(a)))

    s = lg.add_parser("report", help="a reviewer's report: HTML (self-contained), CSV or JSON Lines")
    client(s)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--subject", help="add a 'where did my data go' section for this user")
    s.add_argument("--format", choices=("html", "csv", "jsonl"), default="html")
    s.add_argument("--key", type=Path, help="a log.pub to verify with (default: the key the node states)")
    s.set_defaults(run=lambda a: asyncio.run(_log_report(a)))

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
