"""`residency`: one program for every role. `residency --help` lists the commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from residency.cli import backup, health, keys, log, logs, node, policy, records, replication, rules, subject
from residency.server.core.errors import ResidencyError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="residency", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=logs.default_format(),
        help="text, or json: one event per line (default: $RESIDENCY_LOG_FORMAT, else text)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    # In the order `residency --help` lists them.
    node.add_demo(sub)
    node.add_init(sub)
    node.add_serve(sub)
    node.add_certs(sub)
    replication.add_replicate(sub)
    keys.add_keys(sub)
    backup.add_backup(sub)
    records.add_records(sub)
    subject.add_subject(sub)
    log.add_log(sub)
    replication.add_replication(sub)
    node.add_status(sub)
    health.add_health(sub)
    policy.add_consent(sub)
    policy.add_grants(sub)
    policy.add_disclose(sub)
    policy.add_disclosures(sub)
    rules.add_rules(sub)
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # What the command writes (configs, keys, stores, exports) is private to its user:
    # folders 0700, files 0600.
    os.umask(0o077)
    logs.configure(
        logging.INFO if args.verbose or args.command in ("serve", "replicate") else logging.WARNING,
        args.log_format,
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
