"""Disclosures (policy 3a-3g) as a store operation: decide on the user's record as stored,
and log the disclosure, given or refused, in the same transaction."""

from __future__ import annotations

from typing import Any

from residency.server.core import translog
from residency.server.core.errors import NotFound
from residency.server.core.policy import disclosure
from residency.server.core.policy.consent import shares_with
from residency.server.core.policy.disclosure import GROUNDS, Disclosure
from residency.server.core.rules import Withheld
from residency.server.vault.records import Caller, Records


class Disclosures:
    records: Records

    def disclose(self, d: Disclosure, caller: Caller) -> tuple[dict[str, Any], dict[str, Withheld], int, str]:
        """Hands the fields the ground allows to a third party, or refuses for missing
        evidence; logged either way. Returns (fields, withheld, log sequence, refusal)."""
        records, rules = self.records, self.records.rules
        schema = records.schema.fields
        disclosure.check_request(d, schema)
        row = records.store.rows([d.user_id]).get(d.user_id)
        if row is None or row.deleted:
            raise NotFound(f"user {d.user_id} has no record")
        consented = d.ground == "consent" and shares_with(
            records.standing_consents([d.user_id]), d.third_party
        )
        refusal = disclosure.refusal(d, caller.identity, consented)
        rec = records.open_row(row)
        sent, withheld = disclosure.select(d, rec.fields, schema, refusal)
        basis = GROUNDS[d.ground].legal_basis
        entry = translog.entry(
            "disclosure",
            subject=d.user_id,
            source_region=rules.home_region,
            destination_region="",
            destination_country=d.destination_country,
            recipient=d.third_party,
            purpose=caller.purpose,
            outcome="denied" if refusal or not sent else "allowed",
            actor=caller.identity,
            rules_version=rules.version,
            version=rec.version,
            fields=[
                {"name": n, "category": schema[n].category, "legal_basis": basis, "ground": d.ground}
                for n in sorted(sent)
            ],
            withheld=records.describe_withheld(withheld),
            reason=disclosure.log_reason(d, refusal),
        )
        (seq,) = records.store.log_append([entry])
        return sent, withheld, seq, refusal
