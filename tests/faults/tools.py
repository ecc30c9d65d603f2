"""Shared tools of the fault suite: waits on a condition with a deadline, the duplicate count
of a region's log, and the figures each fault test reports."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from residency.server.deployment import PRIMARY
from tests.conftest import Cluster

T = TypeVar("T")


async def until(check: Callable[[], T | Awaitable[T]], deadline: float, what: str, every: float = 0.1) -> T:
    """Calls (and awaits, if it is a coroutine) `check()` until it gives something truthy;
    raises TimeoutError saying `what` was awaited once `deadline` seconds have passed."""
    end = time.monotonic() + deadline
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {deadline:.0f} s")
        await asyncio.sleep(every)


def applied_twice(entries: list[dict[str, Any]], region: str) -> tuple[int, list[str]]:
    """In a region node's transfer log: (copies applied more than once, users whose applied
    versions went backwards). An applied copy is an allowed replication or erasure entry
    whose destination is the region; each (user, version) may appear once, in rising order."""
    seen: Counter[tuple[str, int]] = Counter()
    last: dict[str, int] = {}
    backwards = []
    for e in entries:
        if (
            e["kind"] in ("replication", "erasure")
            and e["outcome"] == "allowed"
            and (e["destination_region"] == region)
        ):
            user, version = e["subject"], int(e["record_version"])
            seen[(user, version)] += 1
            if version < last.get(user, 0):
                backwards.append(user)
            last[user] = max(version, last.get(user, 0))
    return sum(n - 1 for n in seen.values()), backwards


async def log_entries(cluster: Cluster, region: str = PRIMARY) -> list[dict[str, Any]]:
    return [json.loads(j) for _, j, _ in await cluster.log(region)]


def report(tmp_path: Path, name: str, figures: dict[str, Any]) -> None:
    """Prints the test's figures as one JSON line and keeps them in `tmp_path/figures.json`
    (the README's table of fault figures is made from these)."""
    line = json.dumps({"test": name, **figures}, sort_keys=False)
    (tmp_path / "figures.json").write_text(line + "\n")
    print(f"\nFIGURES {line}")
