"""`residency log tail|export|verify|prove|report`: the transfer log for reviewers, read from
a node or checked offline from an exported bundle."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from residency.cli.channel import Credentials, add_target, open_channel
from residency.cli.client import Client
from residency.v1 import translog_pb2, translog_pb2_grpc


async def _log_tail(args: argparse.Namespace) -> int:
    async with open_channel(args) as channel:
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
    from residency.server.vault import bundle

    async with Client(args.target, Credentials.of(args), timeout=args.timeout) as node:
        cp, entries, leaves = await node.fetch_log()
    window = _window(entries, args.since, args.until)
    bundle.write(args.out, entries, leaves, cp.checkpoint, cp.verifier_key, window)
    print(json.dumps({"out": str(args.out), "tree_size": cp.tree_size, "root_hash": cp.root_hash.hex()}))
    return 0


def _log_verify(args: argparse.Namespace) -> int:
    from residency.server.core.checkpoint import CheckpointError
    from residency.server.vault import bundle

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
    if (args.index is None) == (args.from_size is None):
        print("error: give --index I (inclusion) or --from M (consistency)", file=sys.stderr)
        return 2
    async with open_channel(args) as channel:
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
    from google.protobuf import json_format

    from residency.server.core import report
    from residency.server.core.report import figures

    async with Client(args.target, Credentials.of(args), timeout=args.timeout) as node:
        cp, entries, leaves = await node.fetch_log()
        ctx = await node.review_context()
    context = json_format.MessageToDict(ctx, preserving_proto_field_name=True)
    key = args.log_key.read_text() if args.log_key else cp.verifier_key
    integrity = figures.integrity(entries, cp.checkpoint, key)
    text = report.render(args.format, entries, context, integrity, subject=args.subject)
    Path(args.out).write_text(text, encoding="utf-8")
    print(json.dumps({"out": str(args.out), "format": args.format, **integrity.summary()}))
    return 0


def add_log(sub: argparse._SubParsersAction) -> None:
    lg = sub.add_parser("log", help="the transfer log").add_subparsers(dest="action", required=True)
    s = lg.add_parser("tail", help="print transfer-log entries as JSON lines")
    add_target(s)
    s.add_argument("--after", type=int, default=0, help="start after this sequence")
    s.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    s.set_defaults(run=lambda a: asyncio.run(_log_tail(a)))

    s = lg.add_parser("export", help="write a verifiable bundle: entries, signed checkpoint, key")
    add_target(s)
    s.add_argument("--out", required=True, type=Path, help="folder to write the bundle into")
    s.add_argument("--since", type=_time, help="ISO-8601 start of the window of interest (inclusive)")
    s.add_argument("--until", type=_time, help="ISO-8601 end of the window of interest (exclusive)")
    s.set_defaults(run=lambda a: asyncio.run(_log_export(a)))

    s = lg.add_parser("verify", help="check an exported bundle offline; exits 1 naming the first bad index")
    s.add_argument("dir", type=Path)
    s.add_argument("--previous", help="an earlier checkpoint file: check the log only grew since")
    s.set_defaults(run=_log_verify)

    s = lg.add_parser("prove", help="print an inclusion (or, with --from, consistency) proof as JSON")
    add_target(s)
    s.add_argument("--size", type=int, required=True, help="tree size the proof is for")
    s.add_argument("--index", type=int, help="leaf index (sequence - 1) to prove included")
    s.add_argument("--from", dest="from_size", type=int, help="older tree size to prove consistency from")
    s.set_defaults(run=lambda a: asyncio.run(_log_prove(a)))

    s = lg.add_parser("report", help="a reviewer's report: HTML (self-contained), CSV or JSON Lines")
    add_target(s)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--subject", help="add a 'where did my data go' section for this user")
    s.add_argument("--format", choices=("html", "csv", "jsonl"), default="html")
    s.add_argument("--log-key", type=Path, help="a log.pub to verify with (default: the key the node states)")
    s.set_defaults(run=lambda a: asyncio.run(_log_report(a)))
