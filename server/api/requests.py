"""Reading a request before any servicer sees it: bytes that are not the method's request
message, and numbers the store or the domain cannot hold, are refused `INVALID_ARGUMENT`
naming the field (`request` for unreadable bytes), for every method the node serves."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from residency.server.api.errors import refuse, status_for
from residency.server.api.wrapping import HandlerRewriter, kind_of
from residency.server.core.errors import InvalidRecord
from residency.v1 import common_pb2, replica_pb2

# SQLite's integers are signed 64-bit: a larger uint64 (a version, a sequence, a tree size)
# cannot be stored or compared with what is.
INT64_MAX = 2**63 - 1
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_SECONDS = (-62_135_596_800, 253_402_300_799)
_TIMESTAMP = "google.protobuf.Timestamp"
# Record field values are the schema's to check (`intake.check_records` names them the same
# way for PutRecord and PutRecords).
_VALUES = common_pb2.Value.DESCRIPTOR.full_name
_U64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
# A request larger than this is read only once the caller is known and allowed the method
# (`Pending`, read by the innermost wrapper, after `Gate`): before, 20 MB of empty entries
# from a revoked certificate held the event loop 15 s and took 1.3 GB (review finding).
READ_AFTER_CHECK_BYTES = 64 * 1024
# The largest request of each method: gRPC's own default, 4 MiB (CreateGrant's 10,000 user ids
# of up to 128 characters are 1.3 MB), but for the bulk methods, which carry up to 1,000 records
# or copies of up to 64 KiB each, and the consents, up to 1,000 of them with up to 2,000
# characters of evidence each (8,000 bytes of UTF-8) and 200 of recipient: about 9.4 MB.
LARGEST_REQUEST = 4 * 1024 * 1024
LARGER_REQUESTS = {
    "/residency.v1.RecordService/PutRecords": 64 * 1024 * 1024,
    "/residency.v1.ReplicaService/ApplyCopies": 64 * 1024 * 1024,
    "/residency.v1.ConsentService/GrantConsents": 16 * 1024 * 1024,
    "/residency.v1.ConsentService/WithdrawConsents": 16 * 1024 * 1024,
}


@dataclass(frozen=True, slots=True)
class Refused:
    """What the deserializer hands on instead of a request it cannot accept: why, and the
    request as read when it could be read (a number out of range), for the users it names."""

    error: InvalidRecord
    message: Any = None


@dataclass(frozen=True, slots=True)
class Pending:
    """A large request not read yet: read (`read()`: the request, or `Refused`) once the
    caller's certificate and role allow the method."""

    data: bytes
    reader: Callable[[bytes], Any]

    def read(self) -> Any:
        return self.reader(self.data)


def _refuse_unread(refusal: Refused) -> Callable[[bytes], Any]:
    return lambda _: refusal


def _checks(d: Descriptor, seen: dict[str, list[FieldDescriptor]]) -> list[FieldDescriptor]:
    """The fields of `d` that can hold a number out of range, directly or inside."""
    if d.full_name not in seen:
        seen[d.full_name] = []  # a message that contains itself adds nothing more
        seen[d.full_name] = [
            f
            for f in d.fields
            if f.type in _U64
            or (
                f.message_type is not None
                and f.message_type.full_name != _VALUES
                and (f.message_type.full_name == _TIMESTAMP or _checks(f.message_type, seen))
            )
        ]
    return seen[d.full_name]


_FIELDS: dict[str, list[FieldDescriptor]] = {}
_IN_RANGE: dict[str, Callable[[Message], bool]] = {}


def _in_range(d: Descriptor) -> Callable[[Message], bool]:
    """Whether a message of type `d` holds only numbers in range: what `out_of_range` finds
    nothing in, answered by a check made once per type (about a third of the walk's time for
    a region's copies, whose policies are a map of messages), so that only a request with a
    number out of range is walked again for the paths."""
    name = d.full_name
    if name in _IN_RANGE:
        return _IN_RANGE[name]
    if name == _TIMESTAMP:
        low, high = _SECONDS
        _IN_RANGE[name] = lambda m: low <= m.seconds <= high and 0 <= m.nanos <= 999_999_999
        return _IN_RANGE[name]
    _IN_RANGE[name] = lambda m: _IN_RANGE[name](m)  # a type inside itself: looked up when called
    checks = tuple(_field_in_range(f) for f in _checks(d, _FIELDS))

    def in_range(m: Message) -> bool:
        return all(check(m) for check in checks)

    _IN_RANGE[name] = in_range
    return in_range


def _field_in_range(f: FieldDescriptor) -> Callable[[Message], bool]:
    n = f.name
    if f.type in _U64:
        if f.is_repeated:
            return lambda m: max(getattr(m, n), default=0) <= INT64_MAX
        return lambda m: getattr(m, n) <= INT64_MAX
    if f.message_type.GetOptions().map_entry:
        v = f.message_type.fields_by_name["value"]
        if v.message_type is None:  # a map of numbers
            return lambda m: max(getattr(m, n).values(), default=0) <= INT64_MAX
        value = _in_range(v.message_type)
        return lambda m: all(map(value, getattr(m, n).values()))
    inner = _in_range(f.message_type)
    if f.is_repeated:
        return lambda m: all(map(inner, getattr(m, n)))
    return lambda m: not m.HasField(n) or inner(getattr(m, n))


def out_of_range(message: Message, path: str = "") -> list[tuple[str, str]]:
    """(field path, description) for every number in `message` that is out of range."""
    d = message.DESCRIPTOR
    if not path and _in_range(d)(message):
        return []
    if d.full_name == _TIMESTAMP:
        seconds, nanos = message.seconds, message.nanos
        if _SECONDS[0] <= seconds <= _SECONDS[1] and 0 <= nanos <= 999_999_999:
            return []
        return [(path, "must be a time from 0001-01-01 to 9999-12-31 UTC")]
    bad: list[tuple[str, str]] = []
    for f in _checks(d, _FIELDS):
        value, where = getattr(message, f.name), f"{path}.{f.name}" if path else f.name
        if f.type in _U64:
            values = enumerate(value) if f.is_repeated else [(None, value)]
            bad += [
                (where if i is None else f"{where}[{i}]", f"must be at most {INT64_MAX} (2^63-1)")
                for i, v in values
                if v > INT64_MAX
            ]
        elif f.message_type.GetOptions().map_entry:
            numbers = f.message_type.fields_by_name["value"].message_type is None
            for k, v in value.items():
                if not numbers:
                    bad += out_of_range(v, f"{where}[{k}]")
                elif v > INT64_MAX:
                    bad.append((f"{where}[{k}]", f"must be at most {INT64_MAX} (2^63-1)"))
        elif f.is_repeated:
            bad += [x for i, v in enumerate(value) for x in out_of_range(v, f"{where}[{i}]")]
        elif message.HasField(f.name):
            bad += out_of_range(value, where)
    return bad


def _request_type(method: str) -> str:
    """The request message's name, from a method path `/package.Service/Method`."""
    service, _, name = method.strip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return f"request of {method}"
    return found.input_type.full_name if found is not None else f"request of {method}"


def _reader(method: str, read: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    unreadable = Refused(InvalidRecord([("request", f"not a serialized {_request_type(method)}")]))

    largest = LARGER_REQUESTS.get(method, LARGEST_REQUEST)
    too_large = Refused(InvalidRecord([("request", f"larger than {largest} bytes, the most {method} takes")]))

    def decode(data: bytes) -> Any:
        try:
            message = read(data)
        except Exception:  # whatever the parser says, these bytes are not this request
            return unreadable
        bad = out_of_range(message)
        return Refused(InvalidRecord(bad), message) if bad else message

    def deserialize(data: bytes) -> Any:
        if len(data) > largest:  # refused unread, once the caller may make the call at all
            return Pending(b"", _refuse_unread(too_large))
        return decode(data) if len(data) <= READ_AFTER_CHECK_BYTES else Pending(data, decode)

    return deserialize


def _refusing(behavior: Callable) -> Callable:
    """`behavior`, refusing a request the deserializer could not accept."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Pending):
                request = request.read()
            if isinstance(request, Refused):
                await refuse(context, status_for(request.error))
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Pending):
            request = request.read()
        if isinstance(request, Refused):
            await refuse(context, status_for(request.error))
        return await behavior(request, context)

    return unary


def _refusing_streams(behavior: Callable) -> Callable:
    """`behavior` for a streamed request, refusing at the first message it cannot accept."""

    async def accepted(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Pending):
                request = request.read()
            if isinstance(request, Refused):
                await refuse(context, status_for(request.error))
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async for item in behavior(accepted(requests, context), context):
                yield item

        return stream

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(accepted(requests, context), context)

    return unary


# Requests read in another message's shape, with the same fields, numbers and bytes: a region
# node hashes each copy of an ApplyCopies batch as sent (`HighWater.copy_hashes`) before
# reading it, and checks what it reads as `out_of_range` would have.
WIRE_VIEWS: dict[str, Callable[[bytes], Any]] = {
    "/residency.v1.ReplicaService/ApplyCopies": replica_pb2.ApplyCopiesWire.FromString,
}


def guarded(method: str, handler: Any) -> Any:
    """`handler` with a deserializer that refuses instead of raising, and behaviors that
    answer a refusal with its status. A handler that takes raw bytes reads them itself."""
    if handler is None or handler.request_deserializer is None:
        return handler
    kind = kind_of(handler)
    wrap = _refusing_streams if handler.request_streaming else _refusing
    return handler._replace(
        request_deserializer=_reader(method, WIRE_VIEWS.get(method, handler.request_deserializer)),
        **{kind: wrap(getattr(handler, kind))},
    )


class RequestGuard(HandlerRewriter):
    """Applies `guarded` to every method handler of a server (health and reflection too)."""

    def rewrite(self, method: str, handler: Any) -> Any:
        return guarded(method, handler)
