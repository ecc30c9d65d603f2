"""The one mapping of errors to gRPC statuses (with rich error details), and `rpc`, the
decorator that applies it to every servicer method: domain errors become their status, any
other exception `INTERNAL` with an error id that the node's log holds with the traceback."""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from residency.server.api.metrics import refused
from residency.server.core.errors import (
    AlreadyExists,
    CallerDenied,
    ConfigError,
    FailedPrecondition,
    InvalidRecord,
    KeyServiceDenied,
    KeyShredded,
    KeyUnavailable,
    NotFound,
    OutOfRange,
    PolicyDenied,
    RateLimited,
    ResidencyError,
    StaleLeaseEpoch,
    Stopping,
    StorageFull,
    StoreUnavailable,
    TransferDenied,
)
from residency.server.core.sealing import SealError

log = logging.getLogger("residency.errors")

_CODES = {
    InvalidRecord: code_pb2.INVALID_ARGUMENT,
    ConfigError: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    AlreadyExists: code_pb2.ALREADY_EXISTS,
    OutOfRange: code_pb2.OUT_OF_RANGE,
    TransferDenied: code_pb2.PERMISSION_DENIED,
    PolicyDenied: code_pb2.PERMISSION_DENIED,
    CallerDenied: code_pb2.PERMISSION_DENIED,
    KeyUnavailable: code_pb2.UNAVAILABLE,
    KeyServiceDenied: code_pb2.PERMISSION_DENIED,
    StorageFull: code_pb2.RESOURCE_EXHAUSTED,
    Stopping: code_pb2.UNAVAILABLE,
    StoreUnavailable: code_pb2.UNAVAILABLE,
    SealError: code_pb2.FAILED_PRECONDITION,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    RateLimited: code_pb2.RESOURCE_EXHAUSTED,
}

# A status travels in the trailers, which a client refuses above 8 KiB by default (gRPC's
# `grpc.max_metadata_size`, counting decoded bytes): the message is sent twice (grpc-message,
# and inside the status), so the whole stays under 7.5 KiB however many violations a
# request has.
MAX_VIOLATIONS = 100
_VIOLATIONS_BYTES = 6 * 1024 + 768
_MESSAGE_CHARS = 200
_PART_CHARS = 160  # a field path or description is cut to this (either may quote the request)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(text: str) -> str:
    """A status message in ASCII (grpc-message percent-encodes every other byte, tripling
    it), cut to `_MESSAGE_CHARS`."""
    return _cut(text.encode("ascii", "backslashreplace").decode(), _MESSAGE_CHARS)


def capped_violations(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first `MAX_VIOLATIONS` violations (fewer if they would not fit the trailers),
    then one saying how many more there are."""
    out: list[tuple[str, str]] = []
    size = 0
    for f, d in violations:
        f, d = _cut(f, _PART_CHARS), _cut(d, _PART_CHARS)
        size += len(f.encode()) + len(d.encode()) + 8  # field tags and lengths
        if len(out) == MAX_VIOLATIONS or size > _VIOLATIONS_BYTES:
            break
        out.append((f, d))
    if len(out) < len(violations):
        out.append(("request", f"and {len(violations) - len(out)} more"))
    return out


def status_for(e: ResidencyError) -> status_pb2.Status:
    """The status a domain error becomes; an invalid record's violations ride along as a
    `google.rpc.BadRequest` (capped), a rate limit's wait as a `google.rpc.RetryInfo`."""
    code = next((c for t, c in _CODES.items() if isinstance(e, t)), code_pb2.INTERNAL)
    refused(type(e).__name__)  # every status made here refuses a call
    status = status_pb2.Status(code=code, message=_message(str(e)))
    detail = any_pb2.Any()
    if isinstance(e, InvalidRecord):
        shown = capped_violations(e.violations)
        status.message = _message("; ".join(f"{f}: {d}" for f, d in shown))
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in shown
                ]
            )
        )
        status.details.append(detail)
    elif isinstance(e, CallerDenied) and e.permission:
        # Machine-readable for the calling service: which permission its identity lacks.
        detail.Pack(
            error_details_pb2.ErrorInfo(
                reason="PERMISSION_MISSING", domain="residency", metadata={"permission": e.permission}
            )
        )
        status.details.append(detail)
    elif isinstance(e, KeyShredded | StaleLeaseEpoch):
        # The primary's replicator tells these refusals from others by their reason.
        detail.Pack(error_details_pb2.ErrorInfo(reason=e.REASON, domain="residency", metadata=e.metadata()))
        status.details.append(detail)
    elif isinstance(e, RateLimited):
        wait = duration_pb2.Duration()
        wait.FromMilliseconds(max(1, round(e.retry_after * 1000)))
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=wait))
        status.details.append(detail)
    return status


def internal(method: str) -> status_pb2.Status:
    """An unexpected exception, logged with its traceback under a new error id (call from the
    `except` block); the caller gets the id, never the exception's text."""
    error_id = secrets.token_hex(6)
    refused("internal")
    log.exception("internal error %s in %s", error_id, method)
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error {error_id}; the node's log has its details under this id",
    )


def _domain_status(e: ResidencyError, method: str) -> status_pb2.Status:
    """A domain error's status; one that has no status of its own (a bundle's or archive's
    error reaching a call) is unexpected there: INTERNAL with an error id, not its text."""
    if any(isinstance(e, t) for t in _CODES):
        return status_for(e)
    return internal(method)


async def refuse(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    await context.abort_with_status(rpc_status.to_status(status))


def rpc(method: Callable) -> Callable:
    """Maps errors raised by a servicer method (unary or streaming) to statuses."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async for item in method(self, request, context):
                    yield item
            except ResidencyError as e:
                await refuse(context, _domain_status(e, method.__qualname__))
            except grpc.aio.AbortError:
                raise
            except Exception:
                await refuse(context, internal(method.__qualname__))

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ResidencyError as e:
            await refuse(context, _domain_status(e, method.__qualname__))
        except grpc.aio.AbortError:
            raise
        except Exception:
            await refuse(context, internal(method.__qualname__))

    return unary
