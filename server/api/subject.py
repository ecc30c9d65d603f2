"""RecordService.ExportSubject: the data subject's own export (GDPR Art. 15 and 20, PIPL Art.
45): who may ask, and the answer made of the record, consents, disclosures and the log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from residency.server.api.consent import consent_message
from residency.server.api.context import Node, check_user
from residency.server.api.disclosure import summary_of
from residency.server.api.identity import at_home_only, caller_of, refuse_caller
from residency.server.api.messages import record_message, withheld_messages
from residency.server.api.translog import (
    checkpoint_message,
    entry_message,
    recipient_message,
    subject_entries,
)
from residency.server.core import translog
from residency.server.core.errors import FailedPrecondition
from residency.server.core.report import subject as page
from residency.server.core.rules import RuleSet
from residency.server.vault.subject_export import Exported
from residency.server.vault.subject_export import export_subject as read_export
from residency.v1 import records_pb2, translog_pb2

# The one purpose an export is answered for: a data subject's request is a legal obligation
# of the controller (a service acting for the user states it; its access policy must allow it).
EXPORT_PURPOSE = "essential.legal_obligation"
# Entries (with their proofs: about 1.3 kB each) per streamed message, well under the 4 MiB
# a gRPC client takes by default.
ENTRIES_PER_MESSAGE = 1000


async def export_subject(
    node: Node, request: records_pb2.ExportSubjectRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[records_pb2.ExportSubjectResponse]:
    """The export's messages. Refused before anything is read: on a region node (it holds
    sealed copies only), a caller its access policy does not let state the purpose or that
    states another (`PERMISSION_DENIED`, logged against the user), and one located outside
    the home region (the data would leave it without a rule)."""
    node.primary_only()
    user = request.user_id
    caller = await caller_of(node, request.context, context, [user])
    check_user(user)
    if caller.purpose != EXPORT_PURPOSE:
        why = f"a subject export is answered for purpose {EXPORT_PURPOSE} only, not {caller.purpose}"
        permission = f"purpose {EXPORT_PURPOSE}"
        await refuse_caller(
            node, caller.identity, caller.location, "access", caller.purpose, why, [user], permission
        )
    what = "a subject export is answered to callers located in"
    await at_home_only(node, caller, "subjects.export", what, [user])
    log_ = node.transfer_log
    if log_ is None:
        raise FailedPrecondition("this node has no log signing key: an export could not be verified")
    # The user's entries so far, read a stretch per store-thread turn; those appended since
    # are read in the export's own transaction, so that its entry commits to all of them.
    scanned = await node.db.call(log_.store.log_count)
    before = await subject_entries(node, log_, user, scanned, sole=True)

    def export() -> tuple[Exported, RuleSet, int]:
        rules = node.records.rules
        since, _, _ = log_.query(translog.Filter(subject=user, sole=True), scanned, 1 << 30)
        history = [*before, *since]
        # Only the current record's: an id erased and given out again is another person's.
        cut, at = page.after_erasure([json.loads(e.data) for e in history])
        earlier = [e.leaf_hash for e in history if e.sequence > cut]
        return read_export(node.policy, user, caller, earlier, _rules_file(rules), at), rules, cut

    exported, rules, cut = await node.db.write(export)
    # Signed after the export's own entry committed, so that entry is among those proved.
    cp = await node.db.call(log_.checkpoint, True)
    # The user's own entries since the cut: a find's entry naming several users it withheld
    # is not handed over (nor committed to: `sole` above too).
    entries = [e for e in await subject_entries(node, log_, user, cp.size, sole=True) if e.sequence > cut]
    first = records_pb2.ExportSubjectResponse(
        record=record_message(exported.record),
        withheld=withheld_messages(node.records.schema, exported.withheld),
        consents=[consent_message(row) for row in exported.consents],
        disclosures=[summary_of(r) for r in exported.disclosures],
        checkpoint=checkpoint_message(cp, log_.verifier_key),
        recipients=[recipient_message(r) for _, r in sorted(rules.recipients.items())],
        rules=_rules(rules),
        log_sequence=exported.log_sequence,
        rules_version=rules.version,
    )
    for at in range(0, max(len(entries), 1), ENTRIES_PER_MESSAGE):
        chunk = entries[at : at + ENTRIES_PER_MESSAGE]
        # One store-thread turn per message, so that writes keep flowing meanwhile.
        found = await node.db.call(lambda c=chunk: [log_.prove_inclusion(e.leaf_index, cp.size) for e in c])
        message = first if at == 0 else records_pb2.ExportSubjectResponse()
        message.entries.extend(entry_message(e) for e in chunk)
        message.proofs.extend(
            translog_pb2.ProveInclusionResponse(
                leaf_index=e.leaf_index, tree_size=cp.size, hashes=hashes, leaf_hash=leaf, root_hash=cp.root
            )
            for e, (hashes, leaf) in zip(chunk, found, strict=True)
        )
        yield message


def _rules_file(rules: RuleSet) -> str:
    """rules.json as `residency subject export` writes it from this answer (`subject_archive`)."""

    def doc(m: Message) -> dict[str, Any]:
        return json_format.MessageToDict(m, preserving_proto_field_name=True)

    return page.rules_text(
        [doc(recipient_message(r)) for _, r in sorted(rules.recipients.items())],
        [doc(r) for r in _rules(rules)],
    )


def _rules(rules: RuleSet) -> list[records_pb2.ExportedRule]:
    return [
        records_pb2.ExportedRule(
            id=r.id,
            recipient=r.recipient,
            purposes=r.purposes,
            legal_basis=r.legal_basis,
            categories=r.categories,
            retention_days=r.retention_days or 0,
            safeguards=[records_pb2.Safeguard(kind=g.kind, reference=g.reference) for g in r.safeguards],
        )
        for r in rules.rules
    ]
