"""A record and its withheld fields as API messages: what a read and a subject export return."""

from __future__ import annotations

from residency.server.core import codec
from residency.server.core.rules import Withheld
from residency.server.core.schema import Schema
from residency.server.vault.records import Opened
from residency.v1 import common_pb2, records_pb2


def record_message(rec: Opened) -> records_pb2.Record:
    out = records_pb2.Record(
        user_id=rec.user_id,
        version=rec.version,
        source=rec.source,
        home_region=rec.home_region,
        created_at=codec.timestamp(rec.created_at),
        updated_at=codec.timestamp(rec.updated_at),
    )
    for name, value in rec.fields.items():
        out.fields[name].CopyFrom(value)
    return out


def withheld_messages(schema: Schema, withheld: dict[str, Withheld]) -> list[common_pb2.WithheldField]:
    return [
        common_pb2.WithheldField(
            field=n, category=schema.fields[n].category, reason=w.reason, detail=w.detail
        )
        for n, w in sorted(withheld.items())
    ]
