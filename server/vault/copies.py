"""A region node's copies: checking that its home signed each copy it is sent, itself or through
the batch's signed high-water mark (`refusals`), and applying them idempotently by version,
with each copy's wrapped data key kept in the keyring rather than in the copy. A batch with
one refused copy is applied not at all.
The keys commit first, in a transaction of their own (`prepare_copy_keys`), and a copy is
applied only once the keyring holds its own key: a crash never leaves a copy without it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from residency.server.core.errors import StaleLeaseEpoch
from residency.server.core.sealing import COPY_FORMAT, MAX_BATCH
from residency.server.core.signed import UnknownFields, copy_bytes, copy_digest, copy_hash, key_id, verifies
from residency.server.core.transform import known
from residency.server.storage.records import Row
from residency.server.storage.replication import FenceStore
from residency.server.storage.thread import Unprepared
from residency.server.vault.copy_policy import describe_applied
from residency.server.vault.inbound import IncomingCopy, Sender, applied, born, log_refused, reborn
from residency.server.vault.records import Records
from residency.v1 import replica_pb2


@dataclass(frozen=True, slots=True)
class Home:
    """What a region node trusts: its home region and that region's copy-signing public key."""

    region: str
    public_raw: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)


def refusals(
    home: Home,
    region: str,
    mark: replica_pb2.HighWater | None,
    copies: Sequence[replica_pb2.SealedCopy],
    sent: Sequence[bytes] = (),
) -> list[tuple[str, str]]:
    """Why copies of a batch sent to `region` are not its home's, as (field path, reason):
    unsigned, signed by another key or changed since, made for another region, or above the
    batch's signed high-water mark (which must itself be the home's, for this region).
    `sent`: each copy's bytes as received, which the mark's `copy_hashes` are taken over."""
    if not copies:
        return []  # an empty batch: nothing to vouch for, nothing to apply
    out = [
        (f"high_water{p}", why) for p, why in _listing(mark) or _signed(home, region, mark, "high-water mark")
    ]
    # Versions are checked against a mark the home signed only (else that is the refusal),
    # and only such a mark vouches for unsigned copies.
    top = mark.version if mark is not None and not out else None
    vouched = Vouched(mark if mark is not None and not out else replica_pb2.HighWater())
    for i, c in enumerate(copies):
        if c.format != COPY_FORMAT:
            out.append(
                (f"copies[{i}].format", f"is {c.format}; this node takes copies of format {COPY_FORMAT} only")
            )
            continue
        checked = (
            _signed(home, region, c, "copy")
            if c.signature
            else _vouched(home, region, c, vouched.refusal(c, sent[i] if sent else None))
        )
        bad = checked or [
            (f".policies[{n}].form", f"is {p.form!r}: not a transformation this node knows")
            for n, p in sorted(c.policies.items())
            if p.form and not known(p.form)
        ]
        out += [(f"copies[{i}]{p}", why) for p, why in bad]
        if not bad and top is not None and c.version > top:
            out.append((f"copies[{i}].version", "is above the home's signed high-water mark for this batch"))
    return out


def _listing(mark: replica_pb2.HighWater | None) -> list[tuple[str, str]]:
    """Why a mark's lists cannot be a batch's, checked before anything is encoded to verify it
    (a forged mark of millions of entries would cost that much memory): at most `MAX_BATCH`
    entries of 32 bytes each."""
    if mark is None:
        return []
    return [
        (f".{name}", f"lists {len(listed)} entries; a batch has at most {MAX_BATCH}, each 32 bytes")
        for name, listed in (("copy_hashes", mark.copy_hashes), ("copy_digests", mark.copy_digests))
        if len(listed) > MAX_BATCH or any(len(x) != 32 for x in listed)
    ]


def _signed(
    home: Home, region: str, m: replica_pb2.SealedCopy | replica_pb2.HighWater | None, what: str
) -> list[tuple[str, str]]:
    if m is None:
        return [("", f"is required: the home's signed {what}")]
    if not m.signature:
        return [(".signature", f"is missing: the {what} is unsigned")]
    if m.signing_key_id != home.key_id:
        return [
            (
                ".signing_key_id",
                f"names key {m.signing_key_id or '(none)'}; this node trusts {home.region}'s "
                f"copy-signing key {home.key_id} (its config's home.signing_key)",
            )
        ]
    if not verifies(home.public_raw, m):
        return [
            (
                ".signature",
                f"does not verify with {home.region}'s copy-signing key: the {what} was "
                "changed after signing, or forged",
            )
        ]
    if m.region != region:
        return [(".region", f"the {what} was made for region {m.region or '(none)'}, not {region}")]
    return []


class Vouched:
    """What a batch's signed mark vouches for: the hashes of copies' bytes as sent, or (from
    a home older than `copy_hashes`) the digests of their canonical encoding. Neither is
    worked out for a batch whose mark vouches for nothing."""

    def __init__(self, mark: replica_pb2.HighWater):
        self.hashes, self.digests = frozenset(mark.copy_hashes), frozenset(mark.copy_digests)

    def refusal(self, c: replica_pb2.SealedCopy, sent: bytes | None) -> tuple[str, str] | None:
        """Why the mark does not vouch for copy `c`, read from the bytes `sent` (None: it does)."""
        if self.hashes and sent is not None and copy_hash(sent) in self.hashes:
            # The bytes are the home's; what was read from them must be all they hold. (Only a
            # copy refused for it loses anything here.)
            c.DiscardUnknownFields()
            if copy_bytes(c) == sent:  # (a size alone can hide a field: a map entry sent short)
                return None
            return (
                "",
                "holds fields this node does not know (from a newer home?), or is not encoded "
                "as this node encodes what it holds: upgrade region nodes before their home",
            )
        try:
            if self.digests and copy_digest(c) in self.digests:
                return None
        except UnknownFields:
            pass
        return (
            ".signature",
            "is missing: the copy is unsigned, and the batch's signed high-water mark does "
            "not vouch for it (changed after the mark was signed, or forged)",
        )


def _vouched(
    home: Home, region: str, c: replica_pb2.SealedCopy, refusal: tuple[str, str] | None
) -> list[tuple[str, str]]:
    """Why an unsigned copy is not one its batch's signed mark vouches for (none: it is)."""
    if refusal is not None:
        return [refusal]
    if c.signing_key_id != home.key_id:
        return [
            (
                ".signing_key_id",
                f"names key {c.signing_key_id or '(none)'}; this node trusts {home.region}'s "
                f"copy-signing key {home.key_id} (its config's home.signing_key)",
            )
        ]
    if c.region != region:
        return [(".region", f"the copy was made for region {c.region or '(none)'}, not {region}")]
    return []


def incoming(c: replica_pb2.SealedCopy) -> IncomingCopy:
    """A copy as it arrived, split into what the keyring keeps (its key material) and what
    the store keeps (the rest: sealed fields and the policies they travel with)."""
    keys = (c.key_id, c.wrapped_data_key, c.transit_key_id, c.wrapped_transit_key)
    fields, recipient, forms = describe_applied(c)
    if not c.deleted:
        for name in ("wrapped_data_key", "transit_key_id", "wrapped_transit_key"):
            c.ClearField(name)
    # Checked by `refusals`, and not checkable again once the key material is gone: not kept.
    c.ClearField("signature")
    return IncomingCopy(
        c.user_id,
        c.version,
        c.deleted,
        *keys,
        stored=c.SerializeToString(),
        home_region=c.home_region,
        rules_version=c.rules_version,
        fields=fields,
        recipient=recipient,
        reason=c.reason,
        forms=forms,
        born=(c.created_at.seconds, c.created_at.nanos),
    )


def check_lease_epoch(store: FenceStore, sender: Sender, remember: bool = False) -> None:
    """Raises StaleLeaseEpoch when the batch's lease epoch (as the home signed it) is below
    the highest this node has taken a batch under from that home; with `remember`, a higher
    one becomes that highest."""
    if sender.lease_epoch is None:  # no mark of the home's: the batch is refused for that
        return
    seen = store.lease_epoch_seen(sender.home_region)
    if sender.lease_epoch < seen:
        raise StaleLeaseEpoch(sender.home_region, sender.lease_epoch, seen)
    if remember and sender.lease_epoch > seen:
        store.see_lease_epoch(sender.home_region, sender.lease_epoch)


def _plan(
    copies: list[IncomingCopy], held: dict[str, Row]
) -> tuple[list[tuple[str, str]], dict[str, IncomingCopy], int]:
    """What applying `copies` over the rows `held` does: (the replays refused, each user's
    newest copy to apply, how many copies are skipped as retries or superseded)."""
    replays = [
        (f"copies[{i}].version", "is older than the version this node holds (a replay)")
        for i, c in enumerate(copies)
        if (row := held.get(c.user_id)) is not None and c.version < row.version
    ]
    newest: dict[str, IncomingCopy] = {}
    skipped = 0
    for c in copies:
        have = newest.get(c.user_id) or held.get(c.user_id)
        if have is not None and have.version >= c.version:
            skipped += 1
            continue
        newest[c.user_id] = c
    return replays, newest, skipped


def _keys(copies: list[IncomingCopy]) -> tuple[dict[str, bytes], list[tuple[str, str, bytes]]]:
    """The keyring rows of live copies: (transit wrapping keys, (user, wrapping key id,
    wrapped data key)). The wrapped DEK goes to the keyring, not with the copy: erasing it
    later makes any earlier copy of node.db unreadable for this user."""
    transit: dict[str, bytes] = {}
    rows = []
    for c in copies:
        if c.deleted:
            continue
        if c.transit_key_id:
            wk_id = f"transit:{c.key_id}:{c.transit_key_id}"
            transit[wk_id] = c.wrapped_transit_key
        else:
            wk_id = f"hpke:{c.key_id}"
        rows.append((c.user_id, wk_id, c.wrapped_data_key))
    return transit, rows


def prepare_copy_keys(records: Records, copies: list[IncomingCopy], refused: list[tuple[str, str]]) -> None:
    """The `before` step of `apply_copies`: the data keys of the copies it will apply,
    committed to the keyring before them. A crash in between leaves a key that the copy
    held meanwhile does not open: that copy was superseded at the home, which sends the new
    one again until it is applied (or an erasure removes both)."""
    if refused:
        return
    held = records.store.rows(list({c.user_id for c in copies}))
    replays, newest, _ = _plan(copies, held)
    transit, rows = _keys(list(newest.values()))
    if rows and not replays:
        stored = records.store.data_keys([u for u, _, _ in rows])
        records.store.add_data_keys(transit, rows)
        # Keys that replace others (a new copy key): `apply_copies` tells the other processes.
        records.keys_replaced.update(u for u, wk, w in rows if u in stored and stored[u][::2] != (wk, w))


def apply_copies(
    records: Records, copies: list[IncomingCopy], sender: Sender, refused: list[tuple[str, str]]
) -> tuple[int, int, list[tuple[str, str]]]:
    """Applies signed copies idempotently: a version equal to the one held is skipped (a
    retry), an older one refused (a replay never goes back in time). With any refusal (those
    `refusals` found, or an older version), nothing is applied and each refused copy is a
    denied entry in this node's transfer log; each copy applied is an allowed one naming the
    sender (`sender.actor`) and its fields' policies. Returns (applied, skipped, refusals).
    Its `before` step is `prepare_copy_keys`: a copy whose key the keyring does not hold
    (another batch applied in between changed what was held) waits for it (`Unprepared`).

    Fenced first: a batch under a lease epoch below the highest taken from its home raises
    StaleLeaseEpoch before anything is read or written; a higher one is remembered, in the
    same transaction as the copies it came with."""
    store = records.store
    if copies:
        check_lease_epoch(store, sender, remember=True)
    held = store.rows(list({c.user_id for c in copies}))
    replays, newest, skipped = _plan(copies, held)
    refused = refused + replays
    if refused:
        log_refused(records, copies, sender, refused)
        return 0, 0, refused
    _, rows = _keys(list(newest.values()))
    stored = store.data_keys([u for u, _, _ in rows])
    if any(stored.get(u, ("", b"", b""))[::2] != (wk_id, wrapped) for u, wk_id, wrapped in rows):
        raise Unprepared("a copy's data key is not in the keyring yet")
    now = time.time()
    store.delete_data_keys([c.user_id for c in newest.values() if c.deleted])
    store.upsert([Row(c.user_id, c.version, c.deleted, c.stored, now) for c in newest.values()])
    # A tombstone for a copy this region never held (nothing was there to withdraw) is no event.
    held_live = {u for u, r in held.items() if not r.deleted}
    replaced = records.keys_replaced
    entries, again = [], []
    for u, c in newest.items():
        if c.deleted and u not in held_live:
            continue
        # A copy of a user the home wrote anew (erased, then written again) erases the one
        # held; it comes under a new key, so only copies whose key changed are looked at.
        if not c.deleted and u in held_live and u in replaced and (was := born(held[u].blob)) != c.born:
            again.append(u)
            entries.append(reborn(records.region, c, sender.actor, held[u].version, was))
        entries.append(applied(records.region, c, sender.actor))
    store.log_append(entries)
    for user_id in newest:
        records.keyring.data_keys.drop(user_id)
    live = [u for u, c in newest.items() if not c.deleted and (u in replaced or u in again)]
    store.data_keys_replaced(live, erasure=bool(again))  # the erased copies' pages scrubbed
    replaced.difference_update(newest)
    # The region's own blind index follows the copies it holds, under its own index key.
    records.index.copies_changed(newest)
    return len(newest), skipped, []
