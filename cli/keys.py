"""`residency keys init`: a node's keys made with its own provider, before it first starts.
`residency keys rotate|rewrap|retire|shred|rekey|rotate-index`: a region's key lifecycle, by an operator
whose certificate the node's CA vouches for (its identity is the logged actor): sent to the
running node (`--target`), which acts and switches at once, or done here for a stopped node
(`--config`; refused while the node runs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from residency.cli.channel import ENVIRONMENT, add_certificate, certificate_paths
from residency.server.core.errors import CallerDenied, ConfigError
from residency.server.keys import pki

if TYPE_CHECKING:
    from residency.server.config.node import NodeConfig


def operator_of(args: argparse.Namespace, config: NodeConfig) -> str:
    """The URI of the operator whose certificate and key `--cert --key` name, checked as the
    node checks its callers: against the node's `tls.ca`, revocation list and trust domain (a
    `--ca` of the caller's choosing decides nothing), and an operator of the node's region.
    Refused: one line, nothing done."""
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
    revoked = pki.revoked_serials(tls.revoked)
    try:
        ident = pki.authenticate(
            cert, key, ca, role="operator", trust_domain=tls.trust_domain, revoked=revoked
        )
    except CallerDenied as e:
        raise CallerDenied(f"{paths['cert']} is refused: {e}; nothing was changed") from None
    if ident.region != config.region:  # as the node refuses it (`access.refusal`)
        raise CallerDenied(
            f"{paths['cert']} is refused: {ident.uri} is an operator of {ident.region}; the keys of "
            f"{config.region} are its own operators' to change; nothing was changed"
        )
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


async def _online(args: argparse.Namespace) -> dict[str, Any]:
    """The act, done by the running node at `--target`: it switches before it answers."""
    from residency.cli.channel import open_channel
    from residency.v1 import admin_pb2, admin_pb2_grpc

    async with open_channel(args) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        status = await admin.GetNodeStatus(admin_pb2.GetNodeStatusRequest(), timeout=args.timeout)
        if status.region != args.region:
            raise ConfigError(
                f"--target {args.target} is the node of {status.region}, not {args.region}; "
                "nothing was changed"
            )
        reply: Any
        if args.action == "rotate":
            request = admin_pb2.RotateKeysRequest(from_version=status.key_version)
            reply = await admin.RotateKeys(request, timeout=args.timeout)
        elif args.action == "rotate-index":
            request = admin_pb2.RotateIndexKeyRequest(from_version=status.index_key_version)
            reply = await admin.RotateIndexKey(request, timeout=args.timeout)
        elif args.action == "rewrap":
            reply = await admin.RewrapKeys(admin_pb2.RewrapKeysRequest(), timeout=args.timeout)
        elif args.action == "retire":
            reply = await admin.RetireKeys(admin_pb2.RetireKeysRequest(), timeout=args.timeout)
        elif args.action == "shred":
            request = admin_pb2.ShredRegionKeyRequest(key_id=status.region_key_id, reason=args.reason)
            reply = await admin.ShredRegionKey(request, timeout=args.timeout)
        else:
            reply = await admin.RekeyRegionKey(admin_pb2.RekeyRegionKeyRequest(), timeout=args.timeout)
    return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}


def _offline(args: argparse.Namespace) -> dict[str, Any]:
    """The act, done here on a stopped node's keys and store; refused while the node runs."""
    from tqdm import tqdm

    from residency.server.config.node import load_config
    from residency.server.storage.running import hold_stopped

    config = load_config(args.config)
    if config.region != args.region:
        raise ConfigError(
            f"{config.path}: this config is for region {config.region}, not {args.region}; "
            "--region must name the config's region"
        )
    actor = operator_of(args, config)
    stopped = hold_stopped(config.data_dir)  # the node does not start while this works
    try:
        with tqdm(
            desc=f"rewrapping {args.region}",
            unit="key",
            file=sys.stderr,
            disable=args.action not in ("rotate", "rewrap") or getattr(args, "quiet", False),
        ) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            return asyncio.run(_act_offline(args, config, actor, progress))
    finally:
        os.close(stopped)


async def _act_offline(
    args: argparse.Namespace, config: NodeConfig, actor: str, progress: Callable[[int, int], None]
) -> dict[str, Any]:
    from residency.server.config.rules import load_rules
    from residency.server.config.schema import load_schema
    from residency.server.keys.keyring import Keyring
    from residency.server.keys.providers import open_log_provider, open_provider
    from residency.server.storage.stores import open_store
    from residency.server.storage.thread import StoreThread
    from residency.server.vault.key_events import KeyEvents
    from residency.server.vault.key_lifecycle import KeyLifecycle
    from residency.server.vault.records import Records

    schema = load_schema(config.schema)
    keyring = Keyring(config.region, open_provider(config.keys), config.keys_dir)
    store = open_store(config)
    records = Records(
        config.region, config.is_primary, schema, load_rules(config.rules, schema), keyring, store
    )
    db = StoreThread(store)
    db.start()
    events = KeyEvents(config.region, config.is_primary, config.keys_dir, records, db, lambda _: None)
    log_keys = open_log_provider(config.keys, create=args.action in ("rotate", "retire"))
    keys = KeyLifecycle(events, db, log_keys, config.keys.kem)
    try:
        await events.apply()  # a shred made before counts here too
        if args.action == "rotate":
            return await keys.rotate(actor, keys.newest_version(), progress)
        if args.action == "rewrap":
            return await keys.rewrap(actor, progress)
        if args.action == "retire":
            return await keys.retire(actor)
        if args.action == "shred":
            return await keys.shred(actor, keys.region_key_id(), args.reason)
        return await keys.rekey(actor)
    finally:
        await db.drain()
        store.close()
        log_keys.close()
        keyring.provider.close()


def _keys(args: argparse.Namespace) -> int:
    if bool(args.target) == bool(args.config):
        raise SystemExit(
            "residency: name the node: --target HOST:PORT while it runs, or --config FILE while it is stopped"
        )
    if args.action == "rotate-index" and args.config:
        raise SystemExit(
            "residency: the running node rebuilds the index: rotate its index key with --target HOST:PORT"
        )
    if args.action == "shred" and not args.yes:
        print(
            f"error: shredding the key of {args.region} makes every copy there unreadable, "
            "for good; add --yes to confirm",
            file=sys.stderr,
        )
        return 2
    out = asyncio.run(_online(args)) if args.target else _offline(args)
    print(json.dumps(out))
    return 0


def _init(args: argparse.Namespace) -> int:
    from residency.server.bootstrap import init_node_keys

    print(json.dumps(init_node_keys(Path(args.config), Path(args.seed) if args.seed else None)))
    return 0


def add_keys(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser(
        "keys", help="create, rotate, rewrap, retire, shred or rekey a region's keys; rotate its index key"
    ).add_subparsers(dest="action", required=True)
    s = keys.add_parser(
        "init",
        help="create a node's keys in its keys.dir with its provider (Transit or KMS key "
        "included), keeping every key already there",
    )
    s.add_argument("--config", required=True, help="the node's config")
    s.add_argument(
        "--seed",
        help="a folder of key files (e.g. a mounted Secret) copied in first, each one the key folder lacks",
    )
    s.set_defaults(run=_init)
    for action, text in (
        ("rotate", "new key version; new data keys go under it at once, then every data key is rewrapped"),
        ("rewrap", "every data key under the newest key version (after a rotation cut short)"),
        (
            "retire",
            "after a rotation: old key versions stop decrypting (refused while a data key is under one)",
        ),
        ("shred", "destroy a compromised region's key: every copy there becomes unreadable"),
        ("rekey", "after a shred: a new region key pair; the primary learns it and sends every copy again"),
        (
            "rotate-index",
            "new blind-index key; the running node rebuilds the index under it, then drops the old one",
        ),
    ):
        s = keys.add_parser(action, help=text)
        s.add_argument("--target", help="HOST:PORT of the running node that holds the key")
        s.add_argument(
            "--config", help="the config of the node that holds the key, while that node is stopped"
        )
        s.add_argument(
            "--region", required=True, help="the region whose key it is (checked against the node)"
        )
        # A rewrap of millions of data keys takes minutes: the call waits for it.
        s.add_argument("--timeout", type=float, default=3600.0, help="seconds the call may take (--target)")
        add_certificate(s)
        s.add_argument(
            "--identity", help="no longer used: the operator is its certificate's identity (logged)"
        )
        if action in ("rotate", "rewrap"):
            s.add_argument("--quiet", action="store_true", help="no progress bar (--config)")
        if action == "shred":
            s.add_argument("--reason", default="key compromised", help="why (logged)")
            s.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
        s.set_defaults(run=_keys)
