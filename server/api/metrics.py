"""The gRPC edge's metrics: every call counted by service, method and status code, with its
latency (one server interceptor, outermost, so refusals by the gate are counted too), and
every refusal by its reason. Labels never carry a user id, a field or a value."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from residency.server.api.wrapping import HandlerRewriter, kind_of

if TYPE_CHECKING:
    from residency.server.api.context import Node

log = logging.getLogger("residency.metrics")

# The call being served, for the log: the caller's `x-request-id` if it sent a usable one.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

REQUESTS = Counter(
    "residency_rpc_requests_total", "gRPC calls answered, by status code", ["service", "method", "code"]
)
LATENCY = Histogram(
    "residency_rpc_duration_seconds",
    "gRPC call latency, from the call reaching the node to its answer",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
REFUSALS = Counter(
    "residency_refusals_total",
    "Calls refused, by reason (unauthenticated, caller_denied, invalid_record, not_found, ...)",
    ["reason"],
)


def refused(reason: str) -> None:
    """Counts one refusal; `reason` is an error's class name or a fixed word."""
    REFUSALS.labels(re.sub(r"(?<!^)(?=[A-Z])", "_", reason).lower()).inc()


def _code(context: grpc.aio.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name


class Measure(HandlerRewriter):
    """Counts and times every call by service, method and the status code it ended with."""

    def rewrite(self, method: str, handler: Any) -> Any:
        kind = kind_of(handler)
        service, _, name = method.lstrip("/").rpartition("/")
        return handler._replace(**{kind: _measured(service, name, getattr(handler, kind))})


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return secrets.token_hex(8)


def _measured(service: str, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    latency = LATENCY.labels(service, method)

    def done(context: grpc.aio.ServicerContext, start: float, failed: bool) -> None:
        latency.observe(time.perf_counter() - start)
        REQUESTS.labels(service, method, _code(context, failed)).inc()

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            REQUEST_ID.set(_request_id(context))
            start, failed = time.perf_counter(), True
            try:
                async for item in behavior(request, context):
                    yield item
                failed = False
            finally:
                done(context, start, failed)

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        REQUEST_ID.set(_request_id(context))
        start, failed = time.perf_counter(), True
        try:
            result = behavior(request, context)
            result = await result if inspect.isawaitable(result) else result
            failed = False
            return result
        finally:
            done(context, start, failed)

    return unary


class NodeMetrics(Collector):
    """What the store knows, read at each scrape on the store thread: replication per
    destination (lag, pending changes, dead letters, paused), the outbox, the transfer log's
    size and its latest checkpoint."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop, interval: float, timeout: float = 5.0):
        self.node, self.loop, self.interval, self.timeout = node, loop, interval, timeout

    def _gather(self) -> dict[str, Any]:
        store, now = self.node.db.store, time.time()
        size, signed_at = store.checkpoint_signed_at()
        out: dict[str, Any] = {"log": store.log_count(), "signed": size, "signed_at": signed_at, "now": now}
        if self.node.affiliates:
            out["outbox"] = store.outbox_depth()
            out["destinations"] = store.replication_status(list(self.node.affiliates), now)["destinations"]
        return out

    def describe(self) -> list[Metric]:
        # Registering would otherwise collect once, on the event loop, waiting on itself.
        return []

    def collect(self) -> Iterator[Metric]:
        if self.node.tls is not None:  # reread on SIGHUP: the certificate in use
            yield GaugeMetricFamily(
                "residency_certificate_expiry_timestamp_seconds",
                "When the node's TLS certificate expires (Unix time)",
                self.node.tls.expires.timestamp(),
            )
        yield GaugeMetricFamily(
            "residency_checkpoint_interval_seconds",
            "How often a checkpoint is signed while the log grows (the node's config)",
            self.interval,
        )
        try:
            s = asyncio.run_coroutine_threadsafe(self.node.db.call(self._gather), self.loop).result(
                self.timeout
            )
        except Exception:  # stopping, or the store busy past the scrape's patience: no sample
            log.warning("metrics: the store did not answer within %.0f s; figures left out", self.timeout)
            return
        yield GaugeMetricFamily("residency_transfer_log_entries", "Entries in the transfer log", s["log"])
        yield GaugeMetricFamily(
            "residency_transfer_log_unsigned_entries",
            "Transfer-log entries after the latest signed checkpoint",
            s["log"] - s["signed"],
        )
        if s["signed_at"]:
            yield GaugeMetricFamily(
                "residency_checkpoint_age_seconds",
                "Seconds since the latest checkpoint was signed",
                s["now"] - s["signed_at"],
            )
        if "destinations" not in s:
            return
        yield GaugeMetricFamily("residency_outbox_depth", "Changes kept in the outbox", s["outbox"])
        figures = {
            "lag_seconds": ("residency_replication_lag_seconds", "Age of the oldest change not yet applied"),
            "pending": ("residency_replication_pending", "Changes not yet applied at the destination"),
            "dead_lettered": ("residency_replication_dead_letters", "Users whose copy is dead-lettered"),
            "paused": ("residency_replication_paused", "1 while replication to the destination is paused"),
        }
        for key, (name, text) in figures.items():
            family = GaugeMetricFamily(name, text, labels=["destination"])
            for region, d in sorted(s["destinations"].items()):
                family.add_metric([region], float(d[key]))
            yield family
        failing = GaugeMetricFamily(
            "residency_replication_failing",
            "1 while the destination's last attempt failed",
            labels=["destination"],
        )
        for region, d in sorted(s["destinations"].items()):
            failing.add_metric([region], 1.0 if d["last_error"] else 0.0)
        yield failing


def serve_metrics(
    listen: str, node: Node, checkpoint_interval: float, more: tuple[Collector, ...] = ()
) -> Callable[[], None]:
    """Serves Prometheus text on `listen` (HOST:PORT) over the node's mutual TLS
    (`https.serve_metrics_tls`) from a thread, with the collectors in `more` (the in-process
    worker's leases); returns its stop."""
    from residency.server.api.https import serve_metrics_tls

    assert node.tls is not None  # the node's, set before it serves
    node_metrics = NodeMetrics(node, asyncio.get_running_loop(), checkpoint_interval)
    return serve_metrics_tls(listen, node.tls, (node_metrics, *more))
