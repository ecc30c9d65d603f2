"""`residency subject export|verify`: a data subject's own export (GDPR Art. 15 and 20, PIPL
Art. 45) written as a folder a person reads, and checked offline against the log's key."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from residency.cli.channel import add_caller, call_context, open_channel
from residency.cli.log import KEY_HELP, _key, _trust, offline_check
from residency.v1 import records_pb2, records_pb2_grpc

PURPOSE = "essential.legal_obligation"  # the one an export is answered for (`api.subject`)


async def _export(args: argparse.Namespace) -> int:
    from residency.server.core.checkpoint import CheckpointError
    from residency.server.vault import subject_archive

    try:  # before the node is asked: a refused folder costs no export
        subject_archive.prepare(args.out, args.zip)
    except (subject_archive.ArchiveError, OSError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 2
    try:
        reply = await _ask(args)
    except BaseException:
        subject_archive.discard(args.out, args.zip)
        raise
    try:
        zipped = subject_archive.write(args.out, reply, args.zip)
    except (subject_archive.ArchiveError, CheckpointError) as e:
        print(f"FAILED: the node's answer does not verify against its own key: {e}", file=sys.stderr)
        return 1
    out = {
        "out": str(args.out),
        "user_id": reply.record.user_id,
        "entries": len(reply.entries),
        "tree_size": reply.checkpoint.tree_size,
        "log_sequence": reply.log_sequence,
    }
    if zipped is not None:
        out["zip"] = str(zipped)
    print(json.dumps(out))
    return 0


async def _ask(args: argparse.Namespace) -> records_pb2.ExportSubjectResponse:
    reply = records_pb2.ExportSubjectResponse()
    async with open_channel(args) as channel:
        stream = records_pb2_grpc.RecordServiceStub(channel).ExportSubject(
            records_pb2.ExportSubjectRequest(context=call_context(args), user_id=args.user),
            timeout=args.timeout,
        )
        async for message in stream:  # the later messages carry entries and proofs only
            reply.MergeFrom(message)
    return reply


def _verify(args: argparse.Namespace) -> int:
    from residency.server.vault import subject_archive

    v = offline_check(
        lambda: subject_archive.verify(args.dir, _key(args.key) if args.key else None, args.origin),
        subject_archive.ArchiveError,
        "export",
    )
    if v is None:
        return 1
    out = {
        **_trust(v.key, v.pinned, "export"),
        "verified": True,
        "user_id": v.user_id,
        "entries": v.entries,
        "origin": v.checkpoint.origin,
        "tree_size": v.checkpoint.size,
        "root_hash": v.checkpoint.root.hex(),
    }
    print(json.dumps(out))
    return 0


def add_subject(sub: argparse._SubParsersAction) -> None:
    su = sub.add_parser("subject", help="a data subject's own export, and its offline check").add_subparsers(
        dest="action", required=True
    )
    s = su.add_parser(
        "export", help="write everything held about a user, where it went, and the log's proof, to a folder"
    )
    add_caller(s, PURPOSE)
    s.add_argument("user", help="the user id")
    s.add_argument(
        "--out", required=True, type=Path, help="a new or empty folder to write the export into (made 0700)"
    )
    s.add_argument("--zip", action="store_true", help="also write OUT.zip of the folder")
    s.set_defaults(run=lambda a: asyncio.run(_export(a)))

    s = su.add_parser("verify", help="check an export offline; exits 1 naming what fails")
    s.add_argument("dir", type=Path)
    s.add_argument("--key", help=KEY_HELP)
    s.add_argument("--origin", help="the log the checkpoint must be of (default: the key's name)")
    s.set_defaults(run=_verify)
