"""A key provider measured: the latency and errors of each call that reaches the key service,
as Prometheus metrics by provider and operation (never a key id, user or context)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Histogram

from residency.server.core.sealing import Context

CALLS = Histogram(
    "residency_key_provider_seconds",
    "Latency of key-provider calls (a KMS or OpenBao round trip; local: decryption on disk)",
    ["provider", "operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
ERRORS = Counter(
    "residency_key_provider_errors_total",
    "Key-provider calls that failed, by the error's kind (unavailable, denied, destroyed, ...)",
    ["provider", "operation", "error"],
)


class Measured:
    """Delegates to `provider`; times `new_data_key`, `wrap`, `unwrap` and `rewrap`."""

    def __init__(self, provider: Any):
        self._provider = provider
        self.name: str = provider.name

    def _measure(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:
            ERRORS.labels(self.name, operation, type(e).__name__).inc()
            raise
        finally:
            CALLS.labels(self.name, operation).observe(time.perf_counter() - start)

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]:
        return self._measure("new_data_key", self._provider.new_data_key, context)

    def wrap(self, plaintext: bytes, context: Context) -> bytes:
        return self._measure("wrap", self._provider.wrap, plaintext, context)

    def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        return self._measure("unwrap", self._provider.unwrap, wrapped, context)

    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        return self._measure("rewrap", self._provider.rewrap, wrapped, context)

    def ping(self) -> None:
        self._measure("ping", self._provider.ping)

    def __getattr__(self, name: str) -> Any:  # rotate, retire, refresh, destroy, close, ...
        return getattr(self._provider, name)
