"""TransferLogService: the transfer log for reviewers: tail and query entries, signed
checkpoints, inclusion and consistency proofs, a subject's report."""

from __future__ import annotations

import json

from residency.server.api.context import Node, check_user
from residency.server.api.errors import rpc
from residency.server.api.requests import INT64_MAX
from residency.server.core import codec, merkle, translog
from residency.server.core.errors import FailedPrecondition, InvalidRecord
from residency.server.core.report.figures import country_of
from residency.server.core.rules import Recipient
from residency.server.vault.transferlog import LogEntry, SignedCheckpoint, TransferLog
from residency.v1 import translog_pb2, translog_pb2_grpc


class TransferLogService(translog_pb2_grpc.TransferLogServiceServicer):
    PAGE = 1000
    QUERY_PAGE, QUERY_PAGE_MAX = 500, 5000
    QUERY_SCAN = 20_000  # entries looked at per store-thread turn

    def __init__(self, node: Node):
        self.node = node

    @property
    def log(self) -> TransferLog:
        if self.node.transfer_log is None:
            raise FailedPrecondition("this node has no log signing key; checkpoints and proofs are off")
        return self.node.transfer_log

    @rpc
    async def TailEntries(self, request, context):
        after, left = request.after_sequence, request.limit or None
        store = self.node.db.store
        while left is None or left > 0:
            page = await self.node.db.call(store.log_after, after, min(self.PAGE, left or self.PAGE))
            if not page:
                return
            for seq, data, chain in page:
                yield translog_pb2.TailEntriesResponse(
                    sequence=seq, entry_json=data.decode(), chain_hash=chain, leaf_hash=merkle.leaf_hash(data)
                )
            after = page[-1][0]
            if left is not None:
                left -= len(page)

    @rpc
    async def Query(self, request, context):
        f = translog.Filter(
            subject=request.subject,
            region=request.region,
            recipient=request.recipient,
            kind=request.kind,
            purpose=request.purpose,
            legal_basis=request.legal_basis,
            outcome=request.outcome,
            since=codec.seconds(request.since) if request.HasField("since") else None,
            until=codec.seconds(request.until) if request.HasField("until") else None,
        )
        page_size = request.page_size or self.QUERY_PAGE
        if page_size > self.QUERY_PAGE_MAX:
            raise InvalidRecord([("page_size", f"at most {self.QUERY_PAGE_MAX}")])
        after = _page_token(request.page_token)
        left = request.limit or None
        entries: list[LogEntry] = []
        while True:
            room = page_size - len(entries)
            want = min(room, left) if left is not None else room
            found, after, more = await self.node.db.call(self.log.query, f, after, want, self.QUERY_SCAN)
            entries += found
            if left is not None:
                left -= len(found)
            done = not more or left == 0
            if len(entries) == page_size or done:  # a page is full, or the last one
                yield translog_pb2.QueryResponse(
                    entries=[entry_message(e) for e in entries], next_page_token=str(after) if more else ""
                )
                entries = []
            if done:
                return

    @rpc
    async def GetCheckpoint(self, request, context):
        cp = await self.node.db.call(self.log.checkpoint, request.refresh)
        return self._checkpoint(cp)

    def _checkpoint(self, cp: SignedCheckpoint) -> translog_pb2.GetCheckpointResponse:
        return checkpoint_message(cp, self.log.verifier_key)

    @rpc
    async def ProveInclusion(self, request, context):
        log_ = self.log
        size = request.tree_size

        def prove() -> tuple[list[bytes], bytes, bytes]:
            hashes, leaf = log_.prove_inclusion(request.leaf_index, size)
            return hashes, leaf, log_.store.log_tree().root(size)

        hashes, leaf, root = await self.node.db.call(prove)
        return translog_pb2.ProveInclusionResponse(
            leaf_index=request.leaf_index, tree_size=size, hashes=hashes, leaf_hash=leaf, root_hash=root
        )

    @rpc
    async def ProveConsistency(self, request, context):
        hashes = await self.node.db.call(self.log.prove_consistency, request.from_size, request.tree_size)
        return translog_pb2.ProveConsistencyResponse(
            from_size=request.from_size, tree_size=request.tree_size, hashes=hashes
        )

    @rpc
    async def SubjectReport(self, request, context):
        check_user(request.subject)
        log_ = self.log
        # The checkpoint first: the entries are read up to the size it covers, a bounded
        # stretch per store-thread turn so writes keep flowing meanwhile.
        cp = await self.node.db.call(log_.checkpoint, True)
        entries = await subject_entries(self.node, log_, request.subject, cp.size)
        named = {r for e in entries for r in str(json.loads(e.data).get("recipient", "")).split(",") if r}
        rules = self.node.records.rules
        return translog_pb2.SubjectReportResponse(
            subject=request.subject,
            entries=[entry_message(e) for e in entries],
            recipients=[
                recipient_message(rules.recipients[r]) for r in sorted(named) if r in rules.recipients
            ],
            checkpoint=self._checkpoint(cp),
        )

    @rpc
    async def GetReviewContext(self, request, context):
        records = self.node.records
        return translog_pb2.GetReviewContextResponse(
            region=records.region,
            home_region=records.rules.home_region,
            recipients=[recipient_message(r) for _, r in sorted(records.rules.recipients.items())],
            sensitive_fields=sorted(n for n, f in records.schema.fields.items() if f.sensitive),
            rules_version=records.rules.version,
        )


def checkpoint_message(cp: SignedCheckpoint, verifier_key: str) -> translog_pb2.GetCheckpointResponse:
    return translog_pb2.GetCheckpointResponse(
        checkpoint=cp.note, tree_size=cp.size, root_hash=cp.root, verifier_key=verifier_key
    )


async def subject_entries(
    node: Node, log_: TransferLog, subject: str, size: int, sole: bool = False
) -> list[LogEntry]:
    """Every entry about `subject` up to tree size `size` (`sole`: about that subject alone),
    read a bounded stretch per store-thread turn so that writes keep flowing meanwhile."""
    f = translog.Filter(subject=subject, sole=sole)
    entries: list[LogEntry] = []
    after, more = 0, size > 0
    while more and after < size:
        found, after, more = await node.db.call(log_.query, f, after, 1 << 30, TransferLogService.QUERY_SCAN)
        entries += [e for e in found if e.sequence <= size]
    return entries


def entry_message(e: LogEntry) -> translog_pb2.LogEntry:
    return translog_pb2.LogEntry(
        sequence=e.sequence, leaf_index=e.leaf_index, entry_json=e.data.decode(), leaf_hash=e.leaf_hash
    )


def recipient_message(r: Recipient) -> translog_pb2.Recipient:
    return translog_pb2.Recipient(
        id=r.id, region=r.region, company=r.company, contact=r.contact, country=country_of(r)
    )


def _page_token(token: str) -> int:
    if not token:
        return 0
    if not (token.isascii() and token.isdigit() and len(token) <= 19) or int(token) > INT64_MAX:
        raise InvalidRecord([("page_token", "not a token this service issued")])
    return int(token)
