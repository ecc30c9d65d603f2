"""The one way a command reaches a node: the `--target`/`--timeout` (and caller) flags, the
channel to the target, the caller's metadata and call context; and a reply printed as JSON."""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

import grpc
from google.protobuf import json_format

from residency.v1 import common_pb2

IDENTITY_KEY = "x-residency-identity"


def default_identity() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except Exception:
        return "operator"


def add_target(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags of every command that calls a node."""
    parser.add_argument("--target", required=required, help="HOST:PORT of a node")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")


def add_caller(
    parser: argparse.ArgumentParser, location: str = "cn-north", purpose: str = "essential.service"
) -> None:
    """The target flags, and who calls from where for what, with defaults."""
    add_target(parser)
    parser.add_argument("--location", default=location, help=f"the caller's region (default {location})")
    parser.add_argument("--purpose", default=purpose, help=f"the call's data use (default {purpose})")
    parser.add_argument("--identity", default=default_identity(), help="the caller's identity")


def open_channel(target: str) -> grpc.aio.Channel:
    """A channel to the node at `target` (HOST:PORT); use it as `async with`."""
    return grpc.aio.insecure_channel(target)


def metadata(identity: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that names the caller."""
    return ((IDENTITY_KEY, identity),)


def call_context(args: argparse.Namespace) -> common_pb2.CallContext:
    """The caller's location and purpose, from `--location` and `--purpose`."""
    return common_pb2.CallContext(location=args.location, purpose=args.purpose)


def print_message(message: Any) -> None:
    print(
        json.dumps(
            json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False
        )
    )
