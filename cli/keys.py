"""`residency keys rotate|retire|shred`: a region's key lifecycle, on the node that holds it, by
an operator whose certificate the node's CA vouches for (its identity is the logged actor)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from residency.cli.channel import ENVIRONMENT, add_certificate, certificate_paths
from residency.server.core.errors import CallerDenied, ConfigError
from residency.server.keys import pki

if TYPE_CHECKING:
    from residency.server.config.node import NodeConfig


def operator_of(args: argparse.Namespace, config: NodeConfig) -> str:
    """The URI of the operator whose certificate and key `--cert --key` name, checked as the
    node checks its callers: against the node's `tls.ca`, revocation list and trust domain (a
    `--ca` of the caller's choosing decides nothing). Refused: one line, nothing done."""
    paths = certificate_paths(args)
    missing = [f"--{k} (or {ENVIRONMENT[k]})" for k in ("cert", "key") if not paths[k]]
    if missing:
        raise SystemExit(f"residency: key commands need an operator certificate: {', '.join(missing)}")
    tls = config.tls
    try:
        cert, key = Path(paths["cert"]).read_bytes(), Path(paths["key"]).read_bytes()
    except OSError as e:
        raise SystemExit(f"residency: cannot read a certificate file: {e}") from None
    ca = _read(tls.ca)
    if ca is None:
        raise ConfigError(f"{config.path}: 'tls.ca': cannot read {tls.ca}")
    if paths["ca"] and _read(Path(paths["ca"])) != ca:
        print(
            f"residency: --ca is not used here: the certificate must chain to the node's CA, {tls.ca}",
            file=sys.stderr,
        )
    revoked = pki.read_serials(tls.revoked) if tls.revoked else frozenset()
    try:
        ident = pki.authenticate(
            cert, key, ca, role="operator", trust_domain=tls.trust_domain, revoked=revoked
        )
    except CallerDenied as e:
        raise CallerDenied(f"{paths['cert']} is refused: {e}; nothing was changed") from None
    if args.identity and args.identity != ident.uri:
        print(
            f"residency: --identity no longer names the caller; the client certificate does ({ident.uri})",
            file=sys.stderr,
        )
    return ident.uri


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _keys(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from residency.server.config.node import load_config
    from residency.server.keys import lifecycle
    from residency.server.keys.providers import KeyProvider, open_log_provider, open_provider
    from residency.server.keys.providers.local import LocalProvider
    from residency.server.storage.sqlite import SqliteStore

    config = load_config(args.config)
    if config.region != args.region:
        raise ConfigError(
            f"{config.path}: this config is for region {config.region}, not {args.region}; "
            "--region must name the config's region"
        )
    actor = operator_of(args, config)
    if args.action == "shred" and not args.yes:
        print(
            f"error: shredding the key of {args.region} makes every copy there unreadable, "
            "for good; add --yes to confirm",
            file=sys.stderr,
        )
        return 2
    region, keys_dir = config.region, config.keys_dir
    if args.action == "rekey" and config.keys.provider == "local":
        # After a shred the local provider has no key-encryption key: it makes a new one.
        provider: KeyProvider = LocalProvider.create(config.keys.dir, config.keys.passphrase)
    else:
        provider = open_provider(config.keys)
    try:
        if args.action == "shred":
            out = lifecycle.shred(region, provider, keys_dir, actor, args.reason)
        elif args.action == "rekey":
            if config.is_primary:
                raise ConfigError(
                    f"{config.path}: rekey is for a region node's key (copies are sealed to it); "
                    "this is the primary's config"
                )
            out = lifecycle.rekey(region, provider, keys_dir, config.keys.kem, actor)
        else:
            log_keys = open_log_provider(config.keys, create=True)
            store = SqliteStore(config.data_dir / "node.db")
            try:
                if args.action == "retire":
                    out = lifecycle.retire(region, provider, keys_dir, store, actor, log_keys=log_keys)
                else:
                    with tqdm(
                        desc=f"rewrapping {region}", unit="key", file=sys.stderr, disable=args.quiet
                    ) as bar:

                        def progress(done: int, total: int) -> None:
                            bar.total = total
                            bar.update(done - bar.n)

                        out = lifecycle.rotate(
                            region, provider, keys_dir, store, actor, progress, log_keys=log_keys
                        )
            finally:
                store.close()
                log_keys.close()
    finally:
        provider.close()
    print(json.dumps(out))
    return 0


def add_keys(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="rotate, retire or shred a region's keys").add_subparsers(
        dest="action", required=True
    )
    for action, text in (
        ("rotate", "new key version; rewraps region.key and every data key (not the fields), with progress"),
        ("retire", "after a rotation: old key versions stop decrypting"),
        ("shred", "destroy a compromised region's key: every copy there becomes unreadable"),
        ("rekey", "after a shred: a new region key pair; the primary learns it and sends every copy again"),
    ):
        s = keys.add_parser(action, help=text)
        s.add_argument("--config", required=True, help="the config of the node that holds the key")
        s.add_argument("--region", required=True, help="the region whose key it is (must match the config)")
        add_certificate(s)
        s.add_argument(
            "--identity", help="no longer used: the operator is its certificate's identity (logged)"
        )
        if action == "rotate":
            s.add_argument("--quiet", action="store_true", help="no progress bar")
        if action == "shred":
            s.add_argument("--reason", default="key compromised", help="why (logged)")
            s.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
        s.set_defaults(run=_keys)
