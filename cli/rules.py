"""`residency rules check|explain|apply`: validate a rules file offline, explain a transfer
decision, and swap the primary's rules."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from residency.cli.channel import add_identity, add_target, open_channel, print_message
from residency.server.core.errors import ResidencyError
from residency.v1 import admin_pb2, admin_pb2_grpc


def _rules_check(args: argparse.Namespace) -> int:
    from residency.server.config.rules import load_rules
    from residency.server.config.schema import load_schema

    try:
        rules = load_rules(args.file, load_schema(args.schema))
    except ResidencyError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok, version {rules.version}, {len(rules.rules)} rules, "
        f"{len(rules.recipients)} recipients"
    )
    return 0


async def _rules_explain(args: argparse.Namespace) -> int:
    async with open_channel(args) as channel:
        reply = await admin_pb2_grpc.AdminServiceStub(channel).ExplainTransfer(
            admin_pb2.ExplainTransferRequest(user_id=args.user, to=args.to, purpose=args.purpose or ""),
            timeout=args.timeout,
        )
    if args.json:
        print_message(reply)
        return 0
    print(
        f"{reply.user_id} -> {reply.to} for {reply.purpose or 'any rule purpose (replication)'}"
        f" under rules {reply.rules_version}:"
    )
    for f in reply.fields:
        if f.transferred:
            goes = f"goes as {f.form}" if f.form else "goes"
            print(f"  {f.field:<18} {goes:<9} rule {f.rule} ({f.legal_basis}) to {f.recipient}")
        else:
            print(f"  {f.field:<18} withheld  {f.reason}: {f.detail}")
    return 0


async def _rules_apply(args: argparse.Namespace) -> int:
    text = Path(args.file).read_text()
    async with open_channel(args) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        reply = await stub.ApplyRules(
            admin_pb2.ApplyRulesRequest(rules_yaml=text),
            timeout=args.timeout,
        )
        print(
            f"rules {reply.previous_version} -> {reply.version}; "
            f"re-projecting {reply.records_to_reproject} records",
            file=sys.stderr,
        )
        if args.wait:
            from tqdm import tqdm

            with tqdm(
                total=reply.records_to_reproject, desc="re-projecting", unit="record", file=sys.stderr
            ) as bar:
                while True:
                    s = await stub.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=args.timeout)
                    bar.n = s.rules_backfill_done
                    bar.refresh()
                    if s.rules_version == reply.version and s.rules_backfill_done >= s.rules_backfill_total:
                        break
                    await asyncio.sleep(0.2)
    print(
        json.dumps(
            {
                "previous_version": reply.previous_version,
                "version": reply.version,
                "records_to_reproject": reply.records_to_reproject,
            }
        )
    )
    return 0


def add_rules(sub: argparse._SubParsersAction) -> None:
    ru = sub.add_parser("rules", help="transfer rules: check, explain, apply").add_subparsers(
        dest="action", required=True
    )
    s = ru.add_parser("check", help="validate a rules file; print every error")
    s.add_argument("file")
    s.add_argument("--schema", required=True, help="the schema file the rules refer to")
    s.set_defaults(run=_rules_check)
    s = ru.add_parser("explain", help="why each field of a user's record would or would not go")
    add_target(s)
    s.add_argument("--user", required=True)
    s.add_argument("--to", required=True, help="destination region")
    s.add_argument("--purpose", help="a Fides data use (default: what replication sends)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=lambda a: asyncio.run(_rules_explain(a)))
    s = ru.add_parser("apply", help="swap the primary's rules; copies are withdrawn or backfilled")
    add_target(s)
    add_identity(s)
    s.add_argument("file")
    s.add_argument("--wait", action="store_true", help="show progress until every record is re-projected")
    s.set_defaults(run=lambda a: asyncio.run(_rules_apply(a)))
