"""`residency records put|get|delete|find`: one user's record, or the users a lookup field's
value finds, as a caller in a region."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime
from typing import Any

from residency.cli.channel import add_identity, add_target, call_context, open_channel
from residency.v1 import records_pb2, records_pb2_grpc


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


async def _records(args: argparse.Namespace) -> int:
    from residency.server.core import codec

    ctx = call_context(args)
    async with open_channel(args) as channel:
        stub = records_pb2_grpc.RecordServiceStub(channel)
        if args.action == "put":
            record = records_pb2.Record(user_id=args.user_id, source=args.source or "")
            for name, value in args.fields:
                record.fields[name].CopyFrom(codec.to_value(value))
            reply = await stub.PutRecord(
                records_pb2.PutRecordRequest(context=ctx, record=record), timeout=args.timeout
            )
            print(json.dumps({"user_id": reply.user_id, "version": reply.version}))
        elif args.action == "get":
            reply = await stub.GetRecord(
                records_pb2.GetRecordRequest(context=ctx, user_id=args.user_id),
                timeout=args.timeout,
            )
            print(json.dumps(_record(reply), indent=2, ensure_ascii=False))
        elif args.action == "find":
            found = await stub.FindRecords(
                records_pb2.FindRecordsRequest(
                    context=ctx, field=args.field, value=args.value, limit=args.limit, page_token=args.after
                ),
                timeout=args.timeout,
            )
            out = {"results": [_record(r) for r in found.results], "next_page_token": found.next_page_token}
            print(json.dumps(out, indent=2, ensure_ascii=False))
        else:
            reply = await stub.DeleteRecord(
                records_pb2.DeleteRecordRequest(context=ctx, user_id=args.user_id),
                timeout=args.timeout,
            )
            print(json.dumps({"user_id": reply.user_id, "version": reply.version, "deleted": True}))
    return 0


def _record(reply: records_pb2.GetRecordResponse) -> dict[str, Any]:
    """A record as GetRecord answers it, as JSON."""
    from residency.server.core import codec

    r = reply.record
    out: dict[str, Any] = {
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
    if reply.forms:  # fields returned as a transformation, not their value
        out["forms"] = dict(sorted(reply.forms.items()))
    if reply.log_sequence:
        out["log_sequence"] = reply.log_sequence
    return out


def add_records(sub: argparse._SubParsersAction) -> None:
    rec = sub.add_parser("records", help="put, get, delete or find records").add_subparsers(
        dest="action", required=True
    )
    for action in ("put", "get", "delete", "find"):
        s = rec.add_parser(action)
        add_target(s)
        add_identity(s)
        s.add_argument("--location", default="", help="the caller's region (default: its certificate's)")
        s.add_argument("--purpose", required=True, help="a Fides data use, e.g. essential.service")
        if action == "find":
            s.add_argument("field", help="a lookup field of the schema, e.g. email or phone")
            s.add_argument("value", help="the value to find (normalised as the schema says)")
            s.add_argument("--limit", type=int, default=0, help="at most this many users, 1-100 (default 10)")
            s.add_argument("--after", default="", help="a previous answer's next_page_token")
            s.set_defaults(run=lambda a: asyncio.run(_records(a)))
            continue
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
