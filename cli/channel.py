"""The one way a command reaches a node: the `--target`/`--timeout` and certificate flags
(`--cert --key --ca`, defaulting to RESIDENCY_CERT, RESIDENCY_KEY and RESIDENCY_CA), the mutual
TLS channel to the target, the caller's call context; and a reply printed as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import json_format

from residency.server.keys.pki import Identity, identity_of
from residency.v1 import common_pb2

ENVIRONMENT = {"cert": "RESIDENCY_CERT", "key": "RESIDENCY_KEY", "ca": "RESIDENCY_CA"}


@dataclass(frozen=True)
class Credentials:
    """A caller's client certificate and key, and the CA its nodes' certificates come from."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def of(cls, args: argparse.Namespace) -> Credentials:
        """From `--cert --key --ca`, else the environment; a missing one is a usage error."""
        if getattr(args, "identity", None):
            print(
                "residency: --identity no longer names the caller; the client certificate does",
                file=sys.stderr,
            )
        found = certificate_paths(args)
        missing = [f"--{k} (or {ENVIRONMENT[k]})" for k, v in found.items() if not v]
        if missing:
            raise SystemExit(f"residency: a client certificate is required: {', '.join(missing)}")
        return cls(Path(found["cert"]), Path(found["key"]), Path(found["ca"]))

    @classmethod
    def files(cls, prefix: Path, ca: Path) -> Credentials:
        """`PREFIX.crt` and `PREFIX.key` (as `certs issue` and `init` write them) and `ca`."""
        return cls(prefix.with_name(prefix.name + ".crt"), prefix.with_name(prefix.name + ".key"), ca)

    def identity(self) -> Identity:
        ident = identity_of(x509.load_pem_x509_certificate(self.cert.read_bytes()))
        if ident is None:
            raise SystemExit(f"residency: {self.cert} names no spiffe://TD/ROLE/REGION/NAME identity")
        return ident

    def channel(self, target: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        """A mutual TLS channel to the node at `target` (HOST:PORT); use it as `async with`."""
        try:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(),
                private_key=self.key.read_bytes(),
                certificate_chain=self.cert.read_bytes(),
            )
        except OSError as e:
            raise SystemExit(f"residency: cannot read a certificate file: {e}") from e
        return grpc.aio.secure_channel(target, creds, options=options)


def certificate_paths(args: argparse.Namespace) -> dict[str, str]:
    """`cert`, `key` and `ca`: from `--cert --key --ca`, else the environment ("" if neither)."""
    return {k: getattr(args, k, None) or os.environ.get(env, "") for k, env in ENVIRONMENT.items()}


def add_certificate(parser: argparse.ArgumentParser, key_flag: str = "--key") -> None:
    """`--cert --key --ca`. `key_flag` renames `--key` where a command already uses it for
    something else (`log report`: the log's verifier key)."""
    for key, env in ENVIRONMENT.items():
        flag = key_flag if key == "key" else f"--{key}"
        parser.add_argument(flag, dest=key, help=f"the caller's {key} file, PEM (default: ${env})")


def add_target(parser: argparse.ArgumentParser, required: bool = True, key_flag: str = "--key") -> None:
    """The flags of every command that calls a node."""
    parser.add_argument("--target", required=required, help="HOST:PORT of a node")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    add_certificate(parser, key_flag)


def add_identity(parser: argparse.ArgumentParser) -> None:
    """`--identity` named the caller before mutual TLS; scripts that pass it keep working, but
    the caller is whoever the certificate names (`Credentials.of` says so on stderr)."""
    parser.add_argument("--identity", help="no longer used: the caller is its certificate's identity")


def add_caller(parser: argparse.ArgumentParser, purpose: str = "essential.service") -> None:
    """The target flags, and from where (default: the certificate's region) for what."""
    add_target(parser)
    add_identity(parser)
    parser.add_argument("--location", default="", help="the caller's region (default: its certificate's)")
    parser.add_argument("--purpose", default=purpose, help=f"the call's data use (default {purpose})")


def open_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """A mutual TLS channel to `--target` with the caller's certificate; use it as `async with`."""
    return Credentials.of(args).channel(args.target)


def call_context(args: argparse.Namespace) -> common_pb2.CallContext:
    """The caller's location and purpose, from `--location` and `--purpose`."""
    return common_pb2.CallContext(location=args.location, purpose=args.purpose)


def print_message(message: Any) -> None:
    print(
        json.dumps(
            json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False
        )
    )
