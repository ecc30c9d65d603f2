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

from residency.server.core.errors import ResidencyError

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
    from residency.server.core import codec
    from residency.v1 import common_pb2, records_pb2, records_pb2_grpc

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


async def fetch_log(target: str, timeout: float) -> tuple[Any, list[bytes], list[bytes]]:
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
    from residency.server.vault import bundle

    cp, entries, leaves = await fetch_log(args.target, args.timeout)
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

    from residency.server.core import report
    from residency.v1 import translog_pb2, translog_pb2_grpc

    cp, entries, leaves = await fetch_log(args.target, args.timeout)
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


async def _replication(args: argparse.Namespace) -> int:
    from residency.v1 import admin_pb2, admin_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
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

    asyncio.run(run_worker(load_config(args.config), args.region or None))


def _meta(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("x-residency-identity", args.identity),)


def _ctx(args: argparse.Namespace) -> Any:
    from residency.v1 import common_pb2

    return common_pb2.CallContext(location=args.location, purpose=args.purpose)


def _print_message(message: Any) -> None:
    print(
        json.dumps(
            json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False
        )
    )


async def _consent(args: argparse.Namespace) -> int:
    from residency.v1 import consent_pb2, consent_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = consent_pb2_grpc.ConsentServiceStub(channel)
        if args.action == "list":
            reply = await stub.ListConsents(
                consent_pb2.ListConsentsRequest(context=_ctx(args), user_id=args.user_id),
                metadata=_meta(args),
                timeout=args.timeout,
            )
            _print_message(reply)
            return 0
        consents = [
            consent_pb2.Consent(
                user_id=args.user_id,
                purpose=args.consent_purpose,
                recipient=args.recipient,
                sensitive=args.sensitive,
                evidence=args.evidence,
            )
        ]
        if args.action == "grant":
            reply = await stub.GrantConsents(
                consent_pb2.GrantConsentsRequest(context=_ctx(args), consents=consents),
                metadata=_meta(args),
                timeout=args.timeout,
            )
        else:
            reply = await stub.WithdrawConsents(
                consent_pb2.WithdrawConsentsRequest(context=_ctx(args), consents=consents),
                metadata=_meta(args),
                timeout=args.timeout,
            )
        print(json.dumps({"user_id": args.user_id, "changed": reply.changed}))
    return 0


async def _grant(args: argparse.Namespace) -> int:
    from residency.server.core import codec
    from residency.v1 import consent_pb2, consent_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = consent_pb2_grpc.GrantServiceStub(channel)
        if args.action == "create":
            ends = datetime.fromisoformat(args.until.replace("Z", "+00:00")).timestamp()
            grant = consent_pb2.Grant(
                id=args.id or "",
                recipient=args.recipient,
                purpose=args.grant_purpose,
                legal_basis=args.legal_basis,
                categories=args.category,
                user_ids=args.users,
                ends_at=codec.timestamp(ends),
            )
            reply = await stub.CreateGrant(
                consent_pb2.CreateGrantRequest(context=_ctx(args), grant=grant),
                metadata=_meta(args),
                timeout=args.timeout,
            )
            print(json.dumps({"id": reply.id}))
        elif args.action == "revoke":
            reply = await stub.RevokeGrant(
                consent_pb2.RevokeGrantRequest(context=_ctx(args), id=args.id),
                metadata=_meta(args),
                timeout=args.timeout,
            )
            print(json.dumps({"id": args.id, "revoked": reply.revoked}))
        else:
            _print_message(
                await stub.ListGrants(
                    consent_pb2.ListGrantsRequest(context=_ctx(args)),
                    metadata=_meta(args),
                    timeout=args.timeout,
                )
            )
    return 0


async def _disclose(args: argparse.Namespace) -> int:
    from residency.server.core import codec
    from residency.v1 import disclosure_pb2, disclosure_pb2_grpc

    ground = disclosure_pb2.DisclosureGround.Value("DISCLOSURE_GROUND_" + args.ground.upper())
    req = disclosure_pb2.DiscloseRequest(
        context=_ctx(args),
        user_id=args.user_id,
        third_party=args.to,
        ground=ground,
        fields=args.field,
        reference=args.reference or "",
        approver=args.approver or "",
        provision=args.provision or "",
        service=args.service or "",
    )
    async with grpc.aio.insecure_channel(args.target) as channel:
        reply = await disclosure_pb2_grpc.DisclosureServiceStub(channel).Disclose(
            req, metadata=_meta(args), timeout=args.timeout
        )
    print(
        json.dumps(
            {
                "user_id": args.user_id,
                "to": args.to,
                "ground": args.ground,
                "fields": {n: codec.to_json(codec.from_value(v)) for n, v in sorted(reply.fields.items())},
                "withheld": [{"field": w.field, "reason": w.reason} for w in reply.withheld],
                "log_sequence": reply.log_sequence,
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


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
    from residency.v1 import admin_pb2, admin_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        reply = await admin_pb2_grpc.AdminServiceStub(channel).ExplainTransfer(
            admin_pb2.ExplainTransferRequest(user_id=args.user, to=args.to, purpose=args.purpose or ""),
            timeout=args.timeout,
        )
    if args.json:
        _print_message(reply)
        return 0
    print(
        f"{reply.user_id} -> {reply.to} for {reply.purpose or 'any rule purpose (replication)'}"
        f" under rules {reply.rules_version}:"
    )
    for f in reply.fields:
        if f.transferred:
            print(f"  {f.field:<18} goes      rule {f.rule} ({f.legal_basis}) to {f.recipient}")
        else:
            print(f"  {f.field:<18} withheld  {f.reason}: {f.detail}")
    return 0


async def _rules_apply(args: argparse.Namespace) -> int:
    from residency.v1 import admin_pb2, admin_pb2_grpc

    text = Path(args.file).read_text()
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        reply = await stub.ApplyRules(
            admin_pb2.ApplyRulesRequest(rules_yaml=text),
            metadata=(("x-residency-identity", args.identity),),
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
    return 0


def _keys(args: argparse.Namespace) -> int:
    from residency.server.config.node import load_config
    from residency.server.core.errors import ConfigError
    from residency.server.keys import lifecycle

    config = load_config(args.config)
    if config.region != args.region:
        raise ConfigError(
            f"{config.path}: this config is for region {config.region}, not {args.region}; "
            "--region must name the config's region"
        )
    if args.action == "rotate":
        out = lifecycle.rotate(config, args.identity, progress=not args.quiet)
    elif args.action == "retire":
        out = lifecycle.retire(config, args.identity)
    else:
        if not args.yes:
            print(
                f"error: shredding the key of {args.region} makes every copy there unreadable, "
                "for good; add --yes to confirm",
                file=sys.stderr,
            )
            return 2
        out = lifecycle.shred(config, args.identity, args.reason)
    print(json.dumps(out))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from residency.cli.demo import run_demo

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

    s = sub.add_parser("replicate", help="run a replication worker for a primary until SIGTERM/SIGINT")
    s.add_argument("--config", required=True, help="the primary's config file")
    s.add_argument(
        "--region", action="append", help="ship only to this destination (repeat for more; default: all)"
    )
    s.set_defaults(run=_replicate)

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

    rp = sub.add_parser(
        "replication", help="replication status, pause and resume, dead-letter retry (on the primary)"
    ).add_subparsers(dest="action", required=True)
    s = rp.add_parser("status", help="per destination: lag, pending, dead letters, last error, paused")
    client(s)
    s.set_defaults(run=lambda a: asyncio.run(_replication(a)))
    for action, what in (("pause", "stop shipping to"), ("resume", "resume shipping to")):
        s = rp.add_parser(action, help=f"{what} a destination region (every worker obeys)")
        client(s)
        s.add_argument("--region", required=True, help="the destination region")
        s.set_defaults(run=lambda a: asyncio.run(_replication(a)))
    s = rp.add_parser("retry", help="re-drive dead letters (their users' current versions)")
    client(s)
    s.add_argument("--region", help="only this destination (default: all)")
    s.set_defaults(run=lambda a: asyncio.run(_replication(a)))

    s = sub.add_parser("status", help="a node's status and, on the primary, replication status")
    client(s)
    s.set_defaults(run=lambda a: asyncio.run(_status(a)))

    def caller(
        parser: argparse.ArgumentParser, location: str = "cn-north", purpose: str = "essential.service"
    ) -> None:
        client(parser)
        parser.add_argument("--location", default=location, help=f"the caller's region (default {location})")
        parser.add_argument("--purpose", default=purpose, help=f"the call's data use (default {purpose})")
        parser.add_argument("--identity", default=_default_identity(), help="the caller's identity")

    con = sub.add_parser("consent", help="users' consents (policy 2a, 2c, 5)").add_subparsers(
        dest="action", required=True
    )
    for action in ("grant", "withdraw", "list"):
        s = con.add_parser(action)
        caller(s)
        s.add_argument("user_id")
        if action != "list":
            s.add_argument(
                "--for",
                dest="consent_purpose",
                required=True,
                help="the data use consented to, e.g. marketing.communications; "
                "functional.storage with no --recipient is cookie consent",
            )
            s.add_argument(
                "--recipient", default="", help="recipient id from the rules file (empty: the app)"
            )
            s.add_argument("--sensitive", action="store_true", help="separate consent for sensitive data")
            s.add_argument("--evidence", default="", help="how it was given, e.g. 'signup form v3, box 2'")
        s.set_defaults(run=lambda a: asyncio.run(_consent(a)))

    gr = sub.add_parser("grants", help="third parties' time-bound access (policy 2a)").add_subparsers(
        dest="action", required=True
    )
    s = gr.add_parser("create")
    caller(s)
    s.add_argument("--id", help="grant id (default: generated)")
    s.add_argument("--recipient", required=True, help="recipient id from the rules file")
    s.add_argument("--for", dest="grant_purpose", required=True, help="the data use it may read for")
    s.add_argument("--legal-basis", default="contract")
    s.add_argument("--category", action="append", required=True, help="a Fides category (repeatable)")
    s.add_argument("--until", required=True, help="end time, ISO-8601")
    s.add_argument("users", nargs="+", help="user ids")
    s.set_defaults(run=lambda a: asyncio.run(_grant(a)))
    s = gr.add_parser("revoke")
    caller(s)
    s.add_argument("id")
    s.set_defaults(run=lambda a: asyncio.run(_grant(a)))
    s = gr.add_parser("list")
    caller(s)
    s.set_defaults(run=lambda a: asyncio.run(_grant(a)))

    s = sub.add_parser("disclose", help="disclose a user's data to a third party under policy 3a-3g")
    caller(s, purpose="third_party_sharing.legal_obligation")
    s.add_argument("user_id")
    s.add_argument("--to", required=True, help="the third party receiving the data")
    s.add_argument(
        "--ground",
        required=True,
        choices=[
            "consent",
            "requested_service",
            "judicial_or_administrative_request",
            "violation_of_law_or_agreement",
            "ip_complaint",
            "transaction_dispute",
            "other_legal_basis",
        ],
    )
    s.add_argument(
        "--field", action="append", default=[], help="a field to disclose (repeatable; default all)"
    )
    s.add_argument("--reference", help="reference number of the request, case, complaint or transaction")
    s.add_argument("--approver", help="who approved the disclosure (not the caller)")
    s.add_argument("--provision", help="the legal provision cited (ground other_legal_basis)")
    s.add_argument("--service", help="the service the user requested (ground requested_service)")
    s.set_defaults(run=lambda a: asyncio.run(_disclose(a)))

    ru = sub.add_parser("rules", help="transfer rules: check, explain, apply").add_subparsers(
        dest="action", required=True
    )
    s = ru.add_parser("check", help="validate a rules file; print every error")
    s.add_argument("file")
    s.add_argument("--schema", required=True, help="the schema file the rules refer to")
    s.set_defaults(run=_rules_check)
    s = ru.add_parser("explain", help="why each field of a user's record would or would not go")
    client(s)
    s.add_argument("--user", required=True)
    s.add_argument("--to", required=True, help="destination region")
    s.add_argument("--purpose", help="a Fides data use (default: what replication sends)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=lambda a: asyncio.run(_rules_explain(a)))
    s = ru.add_parser("apply", help="swap the primary's rules; copies are withdrawn or backfilled")
    client(s)
    s.add_argument("file")
    s.add_argument("--identity", default=_default_identity())
    s.add_argument("--wait", action="store_true", help="show progress until every record is re-projected")
    s.set_defaults(run=lambda a: asyncio.run(_rules_apply(a)))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command in ("serve", "replicate") else logging.WARNING,
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
