"""`residency rules check|explain|apply|ropa`: validate a rules file offline, explain a transfer
decision, swap the primary's rules, and render the record of processing a regulator reads."""

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


def _rules_ropa(args: argparse.Namespace) -> int:
    """Offline: the rules file as a record of processing (HTML or CSV, by the suffix of
    `--out`), with the volumes of a log bundle once it verifies."""
    import time

    from residency.cli.log import _key, _trust
    from residency.server.config.rules import load_rules
    from residency.server.config.schema import load_schema
    from residency.server.core.checkpoint import CheckpointError
    from residency.server.core.report import ropa
    from residency.server.vault import bundle

    fmt = args.out.suffix.lower().lstrip(".")
    if fmt not in ("html", "csv"):
        print(f"error: --out {args.out}: name a .html or a .csv file", file=sys.stderr)
        return 2
    try:
        rules = load_rules(args.file, load_schema(args.schema))
    except ResidencyError as e:
        print(str(e), file=sys.stderr)
        return 1
    found, integrity = None, None
    if args.bundle is not None:
        try:
            v = bundle.verify(args.bundle, key=_key(args.verifier_key) if args.verifier_key else None)
        except (bundle.BundleError, CheckpointError) as e:
            print(f"FAILED: the bundle does not verify, no volumes are shown: {e}", file=sys.stderr)
            return 1
        if not v.pinned:
            print("WARNING: the bundle was checked with its own key; pin yours with --key", file=sys.stderr)
        found = ropa.volumes([json.loads(e) for e in v.entries], rules)
        integrity = {
            **_trust(v.key, v.pinned),
            "origin": v.checkpoint.origin,
            "tree_size": v.checkpoint.size,
            "root_hash": v.checkpoint.root.hex(),
        }
    if fmt == "csv":
        text = ropa.csv_text(rules, found)
    else:
        text = ropa.render_page(rules, found, integrity, time.time())
    args.out.write_text(text, encoding="utf-8")
    summary = {
        "out": str(args.out),
        "format": fmt,
        "recipients": len(rules.recipients),
        "rules": len(rules.rules),
    }
    if integrity is not None:
        summary |= {"bundle": integrity, "volumes": len(found or [])}
    print(json.dumps(summary))
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
    ru = sub.add_parser("rules", help="transfer rules: check, explain, apply, ropa").add_subparsers(
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
    s = ru.add_parser(
        "ropa", help="the record of processing (GDPR Art. 30) per recipient, as HTML or CSV; offline"
    )
    s.add_argument("file", help="the rules file")
    s.add_argument("--schema", required=True, help="the schema file the rules refer to")
    s.add_argument("--out", required=True, type=Path, help="FILE.html (a page) or FILE.csv")
    s.add_argument(
        "--bundle",
        type=Path,
        help="a `residency log export` bundle: add the volumes it shows, once it verifies",
    )
    s.add_argument(
        "--key",
        dest="verifier_key",
        help="with --bundle: the log's verifier key you trust, or a file holding it",
    )
    s.set_defaults(run=_rules_ropa)
