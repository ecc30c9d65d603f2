"""A data subject's export, as the store holds it (GDPR Art. 15 and 20, PIPL Art. 45): the
record opened, consents and disclosure requests, read in the transaction that logs the export."""

from __future__ import annotations

from dataclasses import dataclass

from residency.server.core import translog
from residency.server.core.errors import NotFound
from residency.server.core.policy.disclosure import Request
from residency.server.core.report import subject as page
from residency.server.core.rules import CREDENTIAL, Withheld
from residency.server.storage.consents import ConsentRow
from residency.server.vault.policy import Policy
from residency.server.vault.records import Caller, Opened

REASON = (
    "subject export: the record, consents, disclosures and transfer-log entries, "
    "for the data subject (GDPR Art. 15 and 20, PIPL Art. 45)"
)


@dataclass(frozen=True)
class Exported:
    record: Opened
    withheld: dict[str, Withheld]
    consents: list[ConsentRow]
    disclosures: list[Request]
    log_sequence: int  # the export's own entry


def export_subject(
    policy: Policy,
    user_id: str,
    caller: Caller,
    earlier: list[bytes],
    rules_file: str,
    erased_at: float = 0.0,
) -> Exported:
    """Reads what is held about `user_id` at home and logs the export as an `access` entry
    naming every field handed over (names and categories, never values) and committing to
    the export (`core.report.subject.commitment`): `earlier` the leaf hashes of every entry
    about the user so far, in log order, and `rules_file` the rules.json it ships. Runs on the
    store thread inside a write: the entry commits with the read or not at all. Consents and
    disclosure requests from before `erased_at` (the id's last erasure: `Records.delete`)
    were the previous holder's and are left out."""
    records = policy.records
    row = records.store.rows([user_id]).get(user_id)
    if row is None or row.deleted:
        raise NotFound(f"user {user_id} has no record in {records.region}")
    rec = records.open_row(row)
    specs = records.schema.fields
    withheld = {}
    for name in [n for n in rec.fields if (spec := specs.get(n)) is not None and spec.credential]:
        del rec.fields[name]  # kept only as a hash: never readable, not even by its owner
        withheld[name] = Withheld(CREDENTIAL)
    entry = translog.entry(
        "access",
        subject=user_id,
        source_region=records.region,
        destination_region=caller.location,
        outcome="allowed",
        actor=caller.identity,
        rules_version=records.rules.version,
        purpose=caller.purpose,
        fields=[
            {"name": n, "category": s.category if (s := specs.get(n)) else ""} for n in sorted(rec.fields)
        ],
        withheld=translog.described_withheld(records.schema, withheld),
        version=rec.version,
        reason=REASON,
        export=page.commitment(earlier, rules_file),
    )
    (seq,) = records.store.log_append([entry])
    consents = [c for c in records.store.consents([user_id], True) if c[4] >= erased_at]
    disclosures = [r for r in policy.disclosure_requests(user_id=user_id) if r.requested_at >= erased_at]
    return Exported(rec, withheld, consents, disclosures, seq)
