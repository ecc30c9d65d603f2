"""`residency keys rotate|retire|shred`: a region's key lifecycle, on the node that holds it."""

from __future__ import annotations

import argparse
import getpass
import json
import sys


def default_identity() -> str:
    """Who changes a key, as the node's transfer log names them (key commands run on the node)."""
    try:
        return f"operator:{getpass.getuser()}"
    except Exception:
        return "operator"


def _keys(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from residency.server.config.node import load_config
    from residency.server.core.errors import ConfigError
    from residency.server.keys import lifecycle
    from residency.server.keys.providers import open_provider
    from residency.server.storage.sqlite import SqliteStore

    config = load_config(args.config)
    if config.region != args.region:
        raise ConfigError(
            f"{config.path}: this config is for region {config.region}, not {args.region}; "
            "--region must name the config's region"
        )
    if args.action == "shred" and not args.yes:
        print(
            f"error: shredding the key of {args.region} makes every copy there unreadable, "
            "for good; add --yes to confirm",
            file=sys.stderr,
        )
        return 2
    region, keys_dir = config.region, config.keys_dir
    provider = open_provider(config.keys)
    try:
        if args.action == "shred":
            out = lifecycle.shred(region, provider, keys_dir, args.identity, args.reason)
        else:
            store = SqliteStore(config.data_dir / "node.db")
            try:
                if args.action == "retire":
                    out = lifecycle.retire(region, provider, keys_dir, store, args.identity)
                else:
                    with tqdm(
                        desc=f"rewrapping {region}", unit="key", file=sys.stderr, disable=args.quiet
                    ) as bar:

                        def progress(done: int, total: int) -> None:
                            bar.total = total
                            bar.update(done - bar.n)

                        out = lifecycle.rotate(region, provider, keys_dir, store, args.identity, progress)
            finally:
                store.close()
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
    ):
        s = keys.add_parser(action, help=text)
        s.add_argument("--config", required=True, help="the config of the node that holds the key")
        s.add_argument("--region", required=True, help="the region whose key it is (must match the config)")
        s.add_argument("--identity", default=default_identity(), help="who does it (logged)")
        if action == "rotate":
            s.add_argument("--quiet", action="store_true", help="no progress bar")
        if action == "shred":
            s.add_argument("--reason", default="key compromised", help="why (logged)")
            s.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
        s.set_defaults(run=_keys)
