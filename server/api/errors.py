"""The one mapping of domain errors to gRPC statuses (with rich error details), and `rpc`,
the decorator that applies it to every servicer method."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from residency.server.core.errors import (
    CallerDenied,
    ConfigError,
    FailedPrecondition,
    InvalidRecord,
    KeyUnavailable,
    NotFound,
    OutOfRange,
    PolicyDenied,
    ResidencyError,
    TransferDenied,
)
from residency.server.core.sealing import SealError

_CODES = {
    InvalidRecord: code_pb2.INVALID_ARGUMENT,
    ConfigError: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    OutOfRange: code_pb2.OUT_OF_RANGE,
    TransferDenied: code_pb2.PERMISSION_DENIED,
    PolicyDenied: code_pb2.PERMISSION_DENIED,
    CallerDenied: code_pb2.PERMISSION_DENIED,
    KeyUnavailable: code_pb2.UNAVAILABLE,
    SealError: code_pb2.FAILED_PRECONDITION,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
}


def status_for(e: ResidencyError) -> status_pb2.Status:
    """The status a domain error becomes; an invalid record's violations ride along as a
    `google.rpc.BadRequest`, one field violation each."""
    code = next((c for t, c in _CODES.items() if isinstance(e, t)), code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=str(e))
    if isinstance(e, InvalidRecord):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in e.violations
                ]
            )
        )
        status.details.append(detail)
    return status


def rpc(method: Callable) -> Callable:
    """Maps domain errors raised by a servicer method (unary or streaming) to statuses."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async for item in method(self, request, context):
                    yield item
            except ResidencyError as e:
                await context.abort_with_status(rpc_status.to_status(status_for(e)))

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ResidencyError as e:
            await context.abort_with_status(rpc_status.to_status(status_for(e)))

    return unary
