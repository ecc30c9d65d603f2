"""`residency log tail|export|verify|prove|verify-proof|report`: the transfer log for
reviewers, read from a node or checked offline from an exported bundle, against the verifier
key the reviewer pinned."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from residency.cli.channel import Credentials, add_target, open_channel
from residency.cli.client import Client
from residency.v1 import translog_pb2, translog_pb2_grpc


class _Checked(Protocol):
    @property
    def pinned(self) -> bool: ...  # the reader gave the key (else it was the folder's own log.pub)


V = TypeVar("V", bound=_Checked)


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


def _key(value: str) -> str:
    """A verifier key given on the command line: the key itself, or a file holding it."""
    path = Path(value)
    return path.read_text().strip() if path.is_file() else value.strip()


def _trust(key: str, pinned: bool, folder: str = "bundle") -> dict[str, Any]:
    """What the checkpoint was checked against, first in every verifying command's output."""
    from residency.server.core.checkpoint import fingerprint

    if pinned:
        return {"key": "pinned", "key_fingerprint": fingerprint(key)}
    return {
        "key": f"taken from the {folder}'s log.pub, not pinned: pass --key with the log's verifier key",
        "key_fingerprint": fingerprint(key),
    }


async def _log_export(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from residency.server.vault import bundle

    async with Client(args.target, Credentials.of(args), timeout=args.timeout) as node:
        cp, entries, leaves = await node.fetch_log()
        ctx = await node.review_context()
    window = _window(entries, args.since, args.until)
    context = json_format.MessageToDict(ctx, preserving_proto_field_name=True)
    bundle.write(args.out, entries, leaves, cp.checkpoint, cp.verifier_key, window, context)
    print(json.dumps({"out": str(args.out), "tree_size": cp.tree_size, "root_hash": cp.root_hash.hex()}))
    return 0


def offline_check(check: Callable[[], V], refused: type[Exception], folder: str) -> V | None:
    """Runs an offline check of a folder (`check`); prints `FAILED: ...` and returns None for
    what it refuses, and warns when the checkpoint was checked with the folder's own key."""
    from residency.server.core.checkpoint import CheckpointError

    try:
        v = check()
    except OSError as e:
        print(f"FAILED: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return None
    except CheckpointError as e:
        print(f"FAILED: checkpoint: {e}", file=sys.stderr)
        return None
    except refused as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return None
    if not v.pinned:
        print(
            f"WARNING: the checkpoint was checked with the {folder}'s own key; pin yours with --key",
            file=sys.stderr,
        )
    return v


def _log_verify(args: argparse.Namespace) -> int:
    from residency.server.vault import bundle

    previous = Path(args.previous).read_text() if args.previous else None
    v = offline_check(
        lambda: bundle.verify(args.dir, previous, _key(args.key) if args.key else None, args.origin),
        bundle.BundleError,
        "bundle",
    )
    if v is None:
        return 1
    out: dict[str, Any] = {
        **_trust(v.key, v.pinned),
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
    """Prints a proof `log verify-proof` checks on its own: with the signed checkpoint of
    that tree size when the node's latest is of it, and for inclusion the entry itself."""
    if (args.index is None) == (args.from_size is None):
        print("error: give --index I (inclusion) or --from M (consistency)", file=sys.stderr)
        return 2
    async with open_channel(args) as channel:
        stub = translog_pb2_grpc.TransferLogServiceStub(channel)
        cp = await stub.GetCheckpoint(translog_pb2.GetCheckpointRequest(), timeout=args.timeout)
        size = args.size if args.size is not None else cp.tree_size
        out: dict[str, Any]
        if args.from_size is not None:
            c = await stub.ProveConsistency(
                translog_pb2.ProveConsistencyRequest(from_size=args.from_size, tree_size=size),
                timeout=args.timeout,
            )
            out = {"proof": "consistency", "from_size": c.from_size, "tree_size": c.tree_size}
            out["hashes"] = [h.hex() for h in c.hashes]
        else:
            p = await stub.ProveInclusion(
                translog_pb2.ProveInclusionRequest(leaf_index=args.index, tree_size=size),
                timeout=args.timeout,
            )
            req = translog_pb2.TailEntriesRequest(after_sequence=args.index, limit=1)
            entry = [e.entry_json async for e in stub.TailEntries(req, timeout=args.timeout)]
            out = {"proof": "inclusion", "leaf_index": p.leaf_index, "tree_size": p.tree_size}
            out |= {"hashes": [h.hex() for h in p.hashes], "entry": entry[0] if entry else ""}
        out["checkpoint"] = cp.checkpoint if cp.tree_size == size else ""
    print(json.dumps(out))
    return 0


def _log_verify_proof(args: argparse.Namespace) -> int:
    from residency.server.core import merkle
    from residency.server.core.checkpoint import CheckpointError, open_note, parse_verifier_key

    try:
        key = _key(args.key)
        proof = json.loads(Path(args.proof).read_text())
        note = Path(args.checkpoint).read_text() if args.checkpoint else proof.get("checkpoint", "")
        if not note:
            raise ValueError("the proof carries no checkpoint of its tree size: give --checkpoint FILE")
        cp = open_note(note, key)
        origin = args.origin or parse_verifier_key(key)[0]
        if cp.origin != origin:
            raise ValueError(f"the checkpoint is of log {cp.origin!r}, not {origin!r}")
        if cp.size != proof["tree_size"]:
            raise ValueError(f"the proof is for tree size {proof['tree_size']}, the checkpoint {cp.size}")
        hashes = [bytes.fromhex(h) for h in proof["hashes"]]
        out: dict[str, Any] = {**_trust(key, True), "verified": True, "proof": proof["proof"]}
        if proof["proof"] == "inclusion":
            index, entry = proof["leaf_index"], proof["entry"]
            if json.loads(entry)["sequence"] != index + 1:
                raise ValueError(f"the entry is not the one at leaf index {index}")
            merkle.verify_inclusion(index, cp.size, merkle.leaf_hash(entry.encode()), hashes, cp.root)
            out |= {"leaf_index": index, "entry": json.loads(entry)}
        else:
            if not args.from_checkpoint:
                raise ValueError(
                    "a consistency proof is checked against an older checkpoint: --from-checkpoint"
                )
            old = open_note(Path(args.from_checkpoint).read_text(), key)
            if old.origin != origin or old.size != proof["from_size"]:
                raise ValueError(f"the older checkpoint is of {old.origin!r} at size {old.size}")
            merkle.verify_consistency(old.size, cp.size, old.root, cp.root, hashes)
            out |= {"from_size": old.size, "from_root_hash": old.root.hex()}
    except (OSError, ValueError, KeyError, TypeError, CheckpointError, merkle.ProofError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**out, "origin": cp.origin, "tree_size": cp.size, "root_hash": cp.root.hex()}))
    return 0


async def _log_report(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from residency.server.core import report
    from residency.server.core.report import figures
    from residency.server.vault import bundle

    if (args.target is None) == (args.bundle is None):
        print("error: give --target HOST:PORT (a live node) or --bundle DIR (offline)", file=sys.stderr)
        return 2
    if args.bundle is not None:
        if not args.verifier_key:
            print("error: --bundle needs --key: the verifier key you trust", file=sys.stderr)
            return 2
        key = _key(args.verifier_key)
        entries = bundle.read_entries(args.bundle / bundle.ENTRIES)
        note = (args.bundle / bundle.CHECKPOINT).read_text()
        context_file = args.bundle / bundle.CONTEXT
        if not context_file.is_file():
            print(f"error: {context_file} is missing: export the bundle again", file=sys.stderr)
            return 1
        context = json.loads(context_file.read_text())
    else:
        async with Client(args.target, Credentials.of(args), timeout=args.timeout) as node:
            cp, entries, leaves = await node.fetch_log()
            ctx = await node.review_context()
        context = json_format.MessageToDict(ctx, preserving_proto_field_name=True)
        note, key = cp.checkpoint, _key(args.verifier_key) if args.verifier_key else cp.verifier_key
    integrity = figures.integrity(entries, note, key)
    text = report.render(args.format, entries, context, integrity, subject=args.subject)
    Path(args.out).write_text(text, encoding="utf-8")
    print(json.dumps({"out": str(args.out), "format": args.format, **integrity.summary()}))
    return 0


KEY_HELP = "the log's verifier key you trust (NAME+HASH+BASE64), or a file holding it"


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
    s.add_argument("--key", help=KEY_HELP)
    s.add_argument("--origin", help="the log the checkpoint must be of (default: the key's name)")
    s.add_argument("--previous", help="an earlier checkpoint file: check the log only grew since")
    s.set_defaults(run=_log_verify)

    s = lg.add_parser("prove", help="print an inclusion (or, with --from, consistency) proof as JSON")
    add_target(s)
    s.add_argument("--size", type=int, help="tree size the proof is for (default: the latest checkpoint's)")
    s.add_argument("--index", type=int, help="leaf index (sequence - 1) to prove included")
    s.add_argument("--from", dest="from_size", type=int, help="older tree size to prove consistency from")
    s.set_defaults(run=lambda a: asyncio.run(_log_prove(a)))

    s = lg.add_parser(
        "verify-proof", help="check the output of `log prove` against a pinned key; exits 1 if not"
    )
    s.add_argument("proof", type=Path, help="the JSON `log prove` printed")
    s.add_argument("--key", required=True, help=KEY_HELP)
    s.add_argument("--origin", help="the log the checkpoint must be of (default: the key's name)")
    s.add_argument(
        "--checkpoint", type=Path, help="a signed checkpoint of the proof's tree size (default: the proof's)"
    )
    s.add_argument("--from-checkpoint", type=Path, help="consistency: the older checkpoint the log grew from")
    s.set_defaults(run=_log_verify_proof)

    s = lg.add_parser("report", help="a reviewer's report: HTML (self-contained), CSV or JSON Lines")
    # `--key` is the log's verifier key here (offline, a reviewer's trust root); the caller's
    # own TLS key for --target is `--client-key` (or RESIDENCY_KEY).
    add_target(s, required=False, key_flag="--client-key")
    s.add_argument("--bundle", type=Path, help="build it offline from an exported bundle (with --key)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--subject", help="add a 'where did my data go' section for this user")
    s.add_argument("--format", choices=("html", "csv", "jsonl"), default="html")
    s.add_argument(
        "--key", dest="verifier_key", help=KEY_HELP + " (default with --target: the key the node states)"
    )
    s.set_defaults(run=lambda a: asyncio.run(_log_report(a)))
