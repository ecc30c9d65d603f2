"""What the standard gRPC health service says: `liveness` (the process answers) apart from
`readiness` (started, not draining, its store and key service usable), each a service name of
the health protocol, reported as the overall status ("") and per API service too. Served on
the node's mutual-TLS port only: probes run `residency health --config NODE.yaml`, which asks
over mutual TLS with the node's own certificate (`cli/health.py`)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health, health_pb2

from residency.server.core.errors import ResidencyError

LIVENESS, READINESS = "liveness", "readiness"
# Trailing metadata of every Check answer: which process answered. Front ends sharing one
# address (SO_REUSEPORT) share its connections, so `residency health` compares it with what
# the process of its own config wrote at start (`storage.running.hold_serving`).
INSTANCE = "residency-instance"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

log = logging.getLogger("residency.health")


class Health:
    """Readiness and its reasons; `problems` is what `residency status` shows."""

    def __init__(self, services: list[str]):
        self.instance = secrets.token_hex(8)
        self.servicer = _Answering(self.instance)
        self.services = services
        self.problems: list[str] = ["starting"]

    async def begin(self) -> None:
        """Alive, not ready (starting)."""
        await self.servicer.set(LIVENESS, SERVING)
        await self._set(NOT_SERVING)

    async def _set(self, status: Any) -> None:
        for name in ("", READINESS, *self.services):
            await self.servicer.set(name, status)

    async def ready(self, problems: list[str]) -> None:
        if problems != self.problems:
            if problems:
                log.warning("not ready: %s", "; ".join(problems))
            else:
                log.info("ready")
        self.problems = problems
        await self._set(NOT_SERVING if problems else SERVING)

    async def watch(
        self,
        store_call: Any,
        keyring: Any,
        every: float = 5.0,
        timeout: float = 5.0,
        more: Callable[[], list[str]] = list,
    ) -> None:
        """Checks the store and the key service every `every` seconds, and `more` (what the
        node knows without asking anyone: `notices.Hearing`) every second, readiness following."""
        while True:
            checked = await check(store_call, keyring, timeout)
            for _ in range(max(1, round(every))):
                await self.ready(checked + more())
                await asyncio.sleep(every / max(1, round(every)))

    async def draining(self) -> None:
        """Not ready from now on (still alive, until the process ends)."""
        self.problems = ["draining"]
        await self._set(NOT_SERVING)

    async def close(self) -> None:
        await self.servicer.set(LIVENESS, NOT_SERVING)


class _Answering(health.aio.HealthServicer):
    """The standard servicer, each Check answer naming the process that gave it."""

    def __init__(self, instance: str):
        super().__init__()
        self._named = ((INSTANCE, instance),)

    async def Check(self, request: Any, context: Any) -> Any:
        context.set_trailing_metadata(self._named)
        return await super().Check(request, context)


async def check(store_call: Any, keyring: Any, timeout: float) -> list[str]:
    """What keeps the node from serving: the store does not answer a read, or the key service
    does not answer (skipped once the region's key is shredded: the node serves to say so)."""
    problems = []
    try:
        await asyncio.wait_for(store_call(), timeout)
    except TimeoutError:
        problems.append(f"store: no answer within {timeout:.0f} s")
    except Exception as e:  # what the store raised, by kind: its text may name paths
        problems.append(f"store: {type(e).__name__}")
    if keyring is not None and not keyring.shredded:
        try:
            await asyncio.wait_for(asyncio.to_thread(keyring.provider.ping), timeout)
        except TimeoutError:
            problems.append(f"key service ({keyring.provider.name}): no answer within {timeout:.0f} s")
        except ResidencyError as e:
            problems.append(f"key service ({keyring.provider.name}): {e}")
        except Exception as e:
            problems.append(f"key service ({keyring.provider.name}): {type(e).__name__}")
    return problems
