"""`residency consent`, `residency grants`, `residency disclose` and `residency disclosures`:
users' consents (policy 2a, 2c, 5), third parties' time-bound access (2a) and disclosures
(3a-3g), asked for by one identity, approved by another, released to the first."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime

from residency.cli.channel import add_caller, add_target, call_context, open_channel, print_message
from residency.v1 import consent_pb2, consent_pb2_grpc, disclosure_pb2, disclosure_pb2_grpc

# The grounds of policy 3a-3g, as DisclosureGround names them (without its prefix).
GROUNDS = [
    "consent",
    "requested_service",
    "judicial_or_administrative_request",
    "violation_of_law_or_agreement",
    "ip_complaint",
    "transaction_dispute",
    "other_legal_basis",
]


async def _consent(args: argparse.Namespace) -> int:
    ctx = call_context(args)
    async with open_channel(args) as channel:
        stub = consent_pb2_grpc.ConsentServiceStub(channel)
        if args.action == "list":
            reply = await stub.ListConsents(
                consent_pb2.ListConsentsRequest(context=ctx, user_id=args.user_id),
                timeout=args.timeout,
            )
            print_message(reply)
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
                consent_pb2.GrantConsentsRequest(context=ctx, consents=consents),
                timeout=args.timeout,
            )
        else:
            reply = await stub.WithdrawConsents(
                consent_pb2.WithdrawConsentsRequest(context=ctx, consents=consents),
                timeout=args.timeout,
            )
        print(json.dumps({"user_id": args.user_id, "changed": reply.changed}))
    return 0


async def _grant(args: argparse.Namespace) -> int:
    from residency.server.core import codec

    ctx = call_context(args)
    async with open_channel(args) as channel:
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
                consent_pb2.CreateGrantRequest(context=ctx, grant=grant), timeout=args.timeout
            )
            print(json.dumps({"id": reply.id}))
        elif args.action == "revoke":
            reply = await stub.RevokeGrant(
                consent_pb2.RevokeGrantRequest(context=ctx, id=args.id), timeout=args.timeout
            )
            print(json.dumps({"id": args.id, "revoked": reply.revoked}))
        else:
            print_message(
                await stub.ListGrants(consent_pb2.ListGrantsRequest(context=ctx), timeout=args.timeout)
            )
    return 0


async def _disclose(args: argparse.Namespace) -> int:
    """Asks for a disclosure: the request's id, for an approver to approve and then for this
    caller to release."""
    if args.approver:
        print(
            "residency: --approver no longer approves anything: an approver approves with its own "
            "certificate (residency disclosures approve ID)",
            file=sys.stderr,
        )
    ground = disclosure_pb2.DisclosureGround.Value("DISCLOSURE_GROUND_" + args.ground.upper())
    req = disclosure_pb2.RequestDisclosureRequest(
        context=call_context(args),
        user_id=args.user_id,
        third_party=args.to,
        destination_country=args.country,
        ground=ground,
        fields=args.field,
        reference=args.reference or "",
        provision=args.provision or "",
        service=args.service or "",
    )
    async with open_channel(args) as channel:
        stub = disclosure_pb2_grpc.DisclosureServiceStub(channel)
        reply = await stub.RequestDisclosure(req, timeout=args.timeout)
    print(
        json.dumps(
            {
                "id": reply.id,
                "user_id": args.user_id,
                "to": args.to,
                "country": args.country,
                "ground": args.ground,
                "state": "requested",
                "expires_at": reply.expires_at.ToJsonString(),
                "log_sequence": reply.log_sequence,
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


async def _disclosures(args: argparse.Namespace) -> int:
    from residency.server.core import codec

    async with open_channel(args) as channel:
        stub = disclosure_pb2_grpc.DisclosureServiceStub(channel)
        if args.action == "list":
            state = "DISCLOSURE_STATE_" + args.state.upper() if args.state else "DISCLOSURE_STATE_UNSPECIFIED"
            req = disclosure_pb2.ListDisclosuresRequest(state=disclosure_pb2.DisclosureState.Value(state))
            print_message(await stub.ListDisclosures(req, timeout=args.timeout))
        elif args.action == "approve":
            reply = await stub.ApproveDisclosure(
                disclosure_pb2.ApproveDisclosureRequest(id=args.id), timeout=args.timeout
            )
            print(json.dumps({"id": args.id, "state": "approved", "log_sequence": reply.log_sequence}))
        elif args.action == "deny":
            reply = await stub.DenyDisclosure(
                disclosure_pb2.DenyDisclosureRequest(id=args.id, reason=args.reason), timeout=args.timeout
            )
            print(json.dumps({"id": args.id, "state": "denied", "log_sequence": reply.log_sequence}))
        else:
            released = await stub.ReleaseDisclosure(
                disclosure_pb2.ReleaseDisclosureRequest(id=args.id), timeout=args.timeout
            )
            d = released.disclosure
            out = {
                "id": args.id,
                "user_id": d.user_id,
                "to": d.third_party,
                "country": d.destination_country,
                "ground": disclosure_pb2.DisclosureGround.Name(d.ground)
                .removeprefix("DISCLOSURE_GROUND_")
                .lower(),
                "fields": {n: codec.to_json(codec.from_value(v)) for n, v in sorted(released.fields.items())},
                "withheld": [{"field": w.field, "reason": w.reason} for w in released.withheld],
                "log_sequence": released.log_sequence,
            }
            print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def add_consent(sub: argparse._SubParsersAction) -> None:
    con = sub.add_parser("consent", help="users' consents (policy 2a, 2c, 5)").add_subparsers(
        dest="action", required=True
    )
    for action in ("grant", "withdraw", "list"):
        s = con.add_parser(action)
        add_caller(s)
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
            s.add_argument(
                "--evidence",
                default="",
                help="how it was given, e.g. 'signup form v3, box 2' (needed to grant; not to withdraw)",
            )
        s.set_defaults(run=lambda a: asyncio.run(_consent(a)))


def add_grants(sub: argparse._SubParsersAction) -> None:
    gr = sub.add_parser("grants", help="third parties' time-bound access (policy 2a)").add_subparsers(
        dest="action", required=True
    )
    s = gr.add_parser("create")
    add_caller(s)
    s.add_argument("--id", help="grant id (default: generated)")
    s.add_argument("--recipient", required=True, help="recipient id from the rules file")
    s.add_argument("--for", dest="grant_purpose", required=True, help="the data use it may read for")
    s.add_argument("--legal-basis", default="contract")
    s.add_argument("--category", action="append", required=True, help="a Fides category (repeatable)")
    s.add_argument("--until", required=True, help="end time, ISO-8601")
    s.add_argument("users", nargs="+", help="user ids")
    s.set_defaults(run=lambda a: asyncio.run(_grant(a)))
    s = gr.add_parser("revoke")
    add_caller(s)
    s.add_argument("id")
    s.set_defaults(run=lambda a: asyncio.run(_grant(a)))
    s = gr.add_parser("list")
    add_caller(s)
    s.set_defaults(run=lambda a: asyncio.run(_grant(a)))


def add_disclose(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "disclose",
        help="ask to disclose a user's data to a third party under policy 3a-3g (prints the request id)",
    )
    add_caller(s, purpose="third_party_sharing.legal_obligation")
    s.add_argument("user_id")
    s.add_argument("--to", required=True, help="the third party receiving the data")
    s.add_argument(
        "--country",
        required=True,
        help="the country the third party receives it in: ISO 3166-1 alpha-2 code, e.g. CN, SG, US",
    )
    s.add_argument("--ground", required=True, choices=GROUNDS)
    s.add_argument(
        "--field", action="append", default=[], help="a field to disclose (repeatable; default all)"
    )
    s.add_argument("--reference", help="reference number of the request, case, complaint or transaction")
    s.add_argument(
        "--approver",
        help="no longer used: an approver approves with its own certificate (disclosures approve)",
    )
    s.add_argument("--provision", help="the legal provision cited (ground other_legal_basis)")
    s.add_argument("--service", help="the service the user requested (ground requested_service)")
    s.set_defaults(run=lambda a: asyncio.run(_disclose(a)))


def add_disclosures(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser(
        "disclosures", help="disclosure requests: list, approve or deny (approvers), release (the requester)"
    ).add_subparsers(dest="action", required=True)
    s = ds.add_parser("list", help="requests and their states (no field values)")
    add_target(s)
    s.add_argument("--state", choices=["requested", "approved", "denied", "released", "expired"])
    s.set_defaults(run=lambda a: asyncio.run(_disclosures(a)))
    for action, says in (
        ("approve", "approve a request (an approver other than the requester)"),
        ("deny", "deny a request, saying why (an approver)"),
        ("release", "receive an approved request's fields (the requester, once)"),
    ):
        s = ds.add_parser(action, help=says)
        add_target(s)
        s.add_argument("id", help="the request id `residency disclose` printed")
        if action == "deny":
            s.add_argument("--reason", required=True, help="why it is denied (written to the transfer log)")
        s.set_defaults(run=lambda a: asyncio.run(_disclosures(a)))
