"""Destinations: the affiliate regions a worker ships to, each with its sink, its sealing keys
and the worker's place in the outbox."""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from residency.replicator.copies import CopyKeys
from residency.replicator.sinks import Sink, make_sink
from residency.server.config.node import NodeConfig
from residency.server.config.tls import TlsConfig
from residency.server.core import translog
from residency.server.core.errors import CallerDenied, ConfigError
from residency.server.keys import pki
from residency.server.keys.cache import KeyCache
from residency.server.keys.copykey import CopySigner, load_copy_key
from residency.server.keys.region import RecipientKey
from residency.server.storage.database import UnitOfWork
from residency.server.storage.thread import StoreThread
from residency.server.vault.records import Records
from residency.v1 import replica_pb2

log = logging.getLogger("residency.replicator")


class KeyHold(Exception):
    """The destination no longer holds the key copies are sealed to: nothing more goes
    there until its new key is learned."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Destination:
    """One affiliate region as this worker ships to it."""

    region: str
    keys: CopyKeys
    sink: Sink
    # The home's copy-signing key: every copy sent here is signed with it, by itself or through
    # its batch's high-water mark (`finish`, `mark`).
    signer: CopySigner
    # the last outbox sequence this destination has applied, as this worker last read it
    cursor: int = 0
    last_error: str = ""
    # records/s at most (0: no limit), and the monotonic time before which the next batch
    # may not ship under that limit
    max_rate: float = 0.0
    not_before: float = 0.0

    def finish(self, copy: replica_pb2.SealedCopy) -> replica_pb2.SealedCopy:
        """`copy`, made for this destination: signed where each copy must carry its own
        signature (a bucket's object), else stamped for the batch's mark to vouch for. The
        last change made to a copy, so whatever was set before is covered."""
        if self.sink.signs_each_copy:
            return self.signer.sign_copy(copy, self.region)
        return self.signer.stamp(copy, self.region)

    def mark(
        self, version: int, lease_epoch: int, copies: list[replica_pb2.SealedCopy]
    ) -> replica_pb2.HighWater:
        """The batch's signed high-water mark, vouching for its unsigned copies."""
        return self.signer.high_water(
            self.region, version, lease_epoch, [c for c in copies if not c.signature]
        )

    def use_key(self, key: RecipientKey) -> None:
        """Seals to `key` from now on (a region's new key, learned after a rekey)."""
        self.keys = CopyKeys(key, KeyCache(self.keys.cache.max_entries, self.keys.cache.max_age))


# How far a region key statement's `issued_at` may be from this node's clock: the region node
# signs a new one for every ask, so an older one is a replay (or clocks that disagree).
STATEMENT_MAX_SKEW = 600.0
# The random bytes of each ask for a region's key, which the statement must carry back.
NONCE_BYTES = 16


def statement_key(region: str, evidence: bytes) -> RecipientKey:
    """The key a stored GetRegionKeyResponse states (checked with `verified_key` when learned)."""
    return RecipientKey(region, _statement(evidence).public_key)


def verified_key(
    region: str,
    evidence: bytes,
    tls: TlsConfig,
    nonce: bytes,
    held: bytes | None = None,
    now: float | None = None,
) -> tuple[RecipientKey | None, str]:
    """(the region's current key, or None while it has none; the node identity that signed)
    of a region node's GetRegionKeyResponse: signed with the key of a certificate of the
    deployment's CA naming spiffe://TD/node/REGION/..., for this region, stating a key whose
    id is that of its public key, answering the ask that sent `nonce`, issued within
    `STATEMENT_MAX_SKEW` of `now` and after the statement `held` (the one the store keeps, if
    any), so that a statement recorded earlier (of a key since shredded) cannot be played
    back. Raises CallerDenied naming what fails."""
    reply = replica_pb2.GetRegionKeyResponse.FromString(evidence)
    revoked = pki.revoked_serials(tls.revoked)
    signer = pki.verify_signed(
        reply.statement,
        reply.signature,
        reply.certificate,
        tls.ca.read_bytes(),
        role="node",
        trust_domain=tls.trust_domain,
        revoked=revoked,
    )
    s = replica_pb2.RegionKeyStatement.FromString(reply.statement)
    if signer.region != region or s.region != region:
        raise CallerDenied(f"{signer.uri} stated a key of region {s.region!r}; the destination is {region}")
    if not s.nonce:
        raise CallerDenied(
            f"{signer.uri} stated a key without this ask's nonce (a region node older than its "
            "primary signs none: upgrade it), or a statement played back"
        )
    if not hmac.compare_digest(s.nonce, nonce):
        raise CallerDenied(
            f"{signer.uri} stated a key in answer to another ask (its nonce is not this ask's): "
            "a statement played back"
        )
    issued = _issued(s)
    now = time.time() if now is None else now
    if abs(now - issued) > STATEMENT_MAX_SKEW:
        raise CallerDenied(
            f"{signer.uri} stated a key issued at {_utc(issued)}, more than {STATEMENT_MAX_SKEW:.0f} s "
            f"from this node's clock ({_utc(now)}): a statement played back, or clocks apart"
        )
    if held is not None and issued <= (before := _issued(_statement(held))):
        raise CallerDenied(
            f"{signer.uri} stated a key issued at {_utc(issued)}, not after the statement held "
            f"({_utc(before)}): a statement played back"
        )
    if not s.key_id:
        return None, signer.uri
    key = RecipientKey(region, s.public_key)
    if key.key_id != s.key_id:
        raise CallerDenied(f"{signer.uri} stated key id {s.key_id}, but its public key's id is {key.key_id}")
    return key, signer.uri


def _statement(evidence: bytes) -> replica_pb2.RegionKeyStatement:
    reply = replica_pb2.GetRegionKeyResponse.FromString(evidence)
    return replica_pb2.RegionKeyStatement.FromString(reply.statement)


def _issued(s: replica_pb2.RegionKeyStatement) -> float:
    return s.issued_at.seconds + s.issued_at.nanos / 1e9


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def destinations_for(config: NodeConfig, regions: list[str] | None = None) -> list[Destination]:
    """The config's destinations (only `regions`, if given)."""
    unknown = sorted(set(regions or ()) - {a.region for a in config.affiliates})
    if unknown:
        raise ConfigError(f"{config.path}: no destination {unknown} in 'affiliates'")
    signer = load_copy_key(config.region, config.copy_key)
    return [
        Destination(
            a.region,
            CopyKeys(
                RecipientKey.load(a.region, a.public_key),
                KeyCache(config.keys.cache_entries, config.keys.cache_seconds),
            ),
            make_sink(config, a),
            signer,
            max_rate=a.max_rate,
        )
        for a in config.affiliates
        if not regions or a.region in regions
    ]


async def learn_key(d: Destination, tls: TlsConfig | None, home: Records, db: StoreThread[KeyStore]) -> bool:
    """Asks a held destination's region for its key; a new one, signed by that region's
    node, ends the hold: sealed to from now on, kept with its statement in the store, logged,
    and every copy is sent again. False while there is none (or the sink cannot be asked: a
    bucket's new key comes with its config)."""
    nonce = os.urandom(NONCE_BYTES)
    evidence = await d.sink.region_key(nonce) if tls is not None else None
    if evidence is None or tls is None:
        return False
    _, held, _ = await db.call(db.store.key_state, d.region)
    key, signer = verified_key(d.region, evidence, tls, nonce, held)
    if key is None or key.key_id == d.keys.recipient.key_id:
        return False
    d.use_key(key)
    entry = translog.key_event(
        d.region,
        signer,
        home.rules.version,
        f"learned: the new key {key.key_id} of {d.region}; every copy is sent there again",
        source_region=home.region,
    )

    def store_it() -> None:
        db.store.set_region_key(d.region, evidence)
        db.store.log_append([entry])

    await db.write(store_it)
    log.warning("replication to %s: new region key %s; re-sending every copy", d.region, key.key_id)
    return True


class KeyStore(UnitOfWork, Protocol):
    def key_state(self, destination: str) -> tuple[str, bytes | None, str | None]: ...
    def set_region_key(self, destination: str, statement: bytes) -> None: ...
    def log_append(self, entries: list[dict[str, Any]]) -> list[int]: ...


# An S3 object's key names its user: never in a status or a log.
_OBJECT_KEY = re.compile(r"copies/[^\s'\"?]+")


def describe_error(e: BaseException | None) -> str:
    """A failure as status and replication logs say it: `TYPE: what it says` (an S3 object's
    key, which names a user, cut out)."""
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if e is None:
        return ""
    text = _OBJECT_KEY.sub("copies/...", str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
