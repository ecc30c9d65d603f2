"""SIGKILL of the primary, 30 times, while 8 writers write (issue 15, point 8): no acknowledged
write is lost, every one reaches the region nodes once in effect, and the transfer log's
export verifies after every restart.

Each cycle opens the writers' gate, kills the primary (`residency serve`, in-process
replicator and all) at a random moment 0.2 to 1.5 s later, with writes and replication
batches in flight, and starts it again on the same data dir. With the writers parked, it
then waits for the regions to apply everything committed before the kill (the catch-up),
reads every user back from the primary (an acknowledged write must be there; a write whose
call failed may or may not be), and exports the primary's log and verifies it offline,
pinned to the key `residency init` wrote and consistent with the previous cycle's export.
At the end every region node must hold each user's newest version with exactly the fields
the rules send it, and no region's log may show a copy applied twice or a version going
back. The figures are printed as one JSON line and kept in `figures.json`."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import pytest

from residency.server.deployment import AFFILIATES, PRIMARY
from tests.conftest import BACKENDS, Cluster
from tests.faults.crashes import (
    GatedWriters,
    LogAudit,
    catch_up,
    head_sequence,
    internal_errors,
    missing_copies,
)
from tests.faults.tools import applied_twice, log_entries, report
from tests.test_replicator import assert_versions_only_increase

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """The primary keeps its store in SQLite, then in PostgreSQL (issue 17, point 5)."""
    return str(request.param)


CYCLES = 30
WRITERS = 8
# Deadlines: a restart and its catch-up take seconds; these leave room for a loaded machine.
START_DEADLINE = 90.0
CATCH_UP_DEADLINE = 120.0


async def test_30_sigkills_of_the_primary_under_8_writers_lose_no_acknowledged_write(
    idle_cluster: Cluster, tmp_path: Path
):
    c = idle_cluster
    await c.start()
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    writers = GatedWriters(c, n=WRITERS, users_each=25, prefix="crash", seed=seed)
    audit = LogAudit(c, PRIMARY, tmp_path / "exports")
    lost: list[str] = []
    catch_ups: list[float] = []
    serving: list[float] = []
    started = time.monotonic()
    writers.start()
    try:
        for cycle in range(CYCLES):
            before = writers.acknowledged
            writers.go.set()
            await asyncio.sleep(rnd.uniform(0.2, 1.5))  # the moment of the fault, not a wait
            writers.go.clear()
            assert c.stop(PRIMARY, signal.SIGKILL) == -signal.SIGKILL
            await writers.park()
            assert writers.acknowledged > before, f"cycle {cycle}: no write was acknowledged before the kill"

            restarted = time.monotonic()
            c.dep.start(PRIMARY)
            await c.dep.wait_serving(START_DEADLINE)
            serving.append(time.monotonic() - restarted)
            # The regions catch up while the primary's records are read back.
            caught_up = asyncio.create_task(catch_up(c, await head_sequence(c), CATCH_UP_DEADLINE))
            lost += [f"cycle {cycle}: {why}" for why in await writers.lost()]
            try:
                catch_ups.append(await caught_up - restarted)
            except TimeoutError as e:
                raise AssertionError(f"cycle {cycle}: {e}; lost so far: {lost[:5]}") from None
            await audit.verify()
    finally:
        await writers.stop()

    current = {u: writers.acked[u] for u in writers.users if u in writers.acked}
    missing = await missing_copies(c, current)
    duplicates, backwards = 0, []
    for region in AFFILIATES:
        twice, back = applied_twice(await log_entries(c, region), region)
        duplicates += twice
        backwards += back
    figures = {
        "cycles": CYCLES,
        "writers": WRITERS,
        "users": len(current),
        "writes_acknowledged": writers.acknowledged,
        "writes_in_doubt": len(writers.failed),
        "in_doubt_by_code": writers.codes(),
        "lost": len(lost),
        "copies_missing": len(missing),
        "duplicate_applications": duplicates + len(backwards),
        "longest_catch_up_seconds": round(max(catch_ups), 2),
        "longest_restart_to_serving_seconds": round(max(serving), 2),
        # The in-process replicator starts before the node serves: most of a catch-up is the start.
        "longest_catch_up_after_serving_seconds": round(
            max(a - b for a, b in zip(catch_ups, serving, strict=True)), 2
        ),
        "catch_up_seconds": [round(s, 2) for s in catch_ups],
        "log_entries": len(await c.log()),
        "seed": seed,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    report(tmp_path, "crash_primary", figures)
    assert not writers.unexpected, writers.unexpected[:10]
    failed_while_up = [f for f in writers.failed if f.gate_open]
    assert not failed_while_up, failed_while_up[:10]
    assert not lost, lost[:10]
    assert not missing, missing[:10]
    assert duplicates == 0 and not backwards, (duplicates, backwards[:10])
    # The primary shipped (logged) each user's version once per destination, in rising order.
    assert_versions_only_increase(await log_entries(c, PRIMARY))
    assert not internal_errors(c), internal_errors(c)[:5]
