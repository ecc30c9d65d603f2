"""Field values between their wire form (residency.v1.Value) and plain Python values.

Sealed field plaintexts are serialized `Value` messages, so an affiliate can decode what it
opens with nothing but the .proto files.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from residency.server.core.schema import FieldValue
from residency.v1 import common_pb2

Value = common_pb2.Value


def from_value(v: Value) -> FieldValue | None:
    kind = v.WhichOneof("kind")
    if kind == "string_value":  # most fields: checked first, it is on every write's path
        return v.string_value
    if kind is None:
        return None
    if kind == "timestamp_value":
        when: datetime = v.timestamp_value.ToDatetime(tzinfo=UTC)
        return when
    if kind == "list_value":
        return list(v.list_value.values)
    value: FieldValue = getattr(v, kind)
    return value


def to_value(x: FieldValue) -> Value:
    if isinstance(x, bool):
        return Value(bool_value=x)
    if isinstance(x, int):
        return Value(int_value=x)
    if isinstance(x, str):
        return Value(string_value=x)
    if isinstance(x, bytes):
        return Value(bytes_value=x)
    if isinstance(x, datetime):
        ts = Timestamp()
        ts.FromDatetime(x if x.tzinfo else x.replace(tzinfo=UTC))
        return Value(timestamp_value=ts)
    if isinstance(x, list):
        return Value(list_value=common_pb2.StringList(values=x))
    raise TypeError(f"no wire form for {type(x).__name__}")


def encode(x: FieldValue) -> bytes:
    data: bytes = to_value(x).SerializeToString()
    return data


def to_json(x: Any) -> Any:
    """A JSON-friendly rendering of a decoded value (for the CLI)."""
    if isinstance(x, datetime):
        return x.isoformat()
    if isinstance(x, bytes):
        return x.hex()
    return x


def seconds(ts: Timestamp) -> float:
    """A protobuf Timestamp as seconds since the epoch."""
    return float(ts.seconds + ts.nanos / 1e9)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
