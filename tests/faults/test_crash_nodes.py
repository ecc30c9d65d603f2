"""SIGKILL of a region node mid-batch, and of a standalone replication worker (`residency
replicate`) mid-batch (issue 15, point 8): no copy is lost or applied twice in effect.

Each round updates every user at once (one PutRecords call), which the replicator ships in
batches of `BATCH` copies back to back; once a destination has applied part of the round and
not all of it, the region node or the worker is killed at a random point of the next batch's
way (within one batch's time: sealed, shipped, applied or being recorded). What the region
holds is then compared with what the sender recorded as acknowledged: when the region holds
more of the round, the kill fell after the region's commit and before the sender recorded
it, and the batch is sent again (`applied_not_acknowledged` counts those kills). After
the restart and the catch-up, every region holds each user's newest version with exactly
the fields the rules send it, no region's log holds a copy applied twice or a version going
back, the primary logged each version once per destination, and a killed region node's log
export verifies (consistent with the export before the kill)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from residency.server.core import codec
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import records_pb2
from tests.conftest import Cluster, ctx
from tests.faults.crashes import LogAudit, fields_of, head_sequence, missing_copies
from tests.faults.tools import applied_twice, log_entries, report, until
from tests.test_replicator import assert_versions_only_increase, start_worker

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

USERS = 200
BATCH = 10
KILLS = 5
# A round whose batches all landed before the test saw one land is tried again, this often.
TRIES = 4
DEADLINE = 90.0


class Rounds:
    """Updates every user in one call per round; remembers what the primary acknowledged."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.users = [f"mid-{i}" for i in range(USERS)]
        self.current: dict[str, tuple[int, dict[str, Any]]] = {}
        self.n = 0
        self.random = random.Random()
        self.batch_seconds = 0.0  # how long one batch takes to reach a region, about

    async def first(self) -> None:
        """Writes every user and waits until both regions hold them; times a batch."""
        started = time.monotonic()
        await self.write()
        await replicated(self.cluster)
        self.batch_seconds = (time.monotonic() - started) / (USERS / BATCH)

    async def write(self) -> tuple[int, int]:
        """One round; returns the outbox sequences it spans, (after, last]."""
        self.n += 1
        after = await head_sequence(self.cluster)
        records, fields = [], {}
        for u in self.users:
            fields[u] = fields_of(u, self.n)
            rec = records_pb2.Record(user_id=u, source="registration")
            for name, value in fields[u].items():
                rec.fields[name].CopyFrom(codec.to_value(value))
            records.append(rec)
        request = records_pb2.PutRecordsRequest(context=ctx(PRIMARY, "essential.service"), records=records)
        reply = await self.cluster.records().PutRecords(request, timeout=60)
        for u, result in zip(self.users, reply.results, strict=True):
            self.current[u] = (result.version, fields[u])
        return after, after + USERS


async def applied(c: Cluster, region: str) -> int:
    return (await c.replication())[region].applied_sequence


async def last_error(c: Cluster, region: str) -> str:
    return (await c.replication())[region].last_error


async def mid_round(c: Cluster, region: str, span: tuple[int, int]) -> bool:
    """Waits until `region` has applied part of the round and not all of it; False if the
    whole round landed before that was seen."""
    after, last = span
    while True:
        seq = await applied(c, region)
        if after < seq < last:
            return True
        if seq >= last:
            return False
        await asyncio.sleep(0.005)  # polls the cursor; batches land every few tens of ms


def held_in_store(c: Cluster, region: str, round_n: int) -> int:
    """How many users a killed region node's store holds at round `round_n`'s version or
    newer, read from its files as the kill left them (read-only: the process is gone)."""
    ((n,),) = c.query(region, "SELECT count(*) FROM records WHERE version >= ?", (round_n,))
    return int(n)


async def replicated(c: Cluster) -> None:
    head = await head_sequence(c)

    async def done() -> bool:
        return all(d.applied_sequence >= head and d.pending == 0 for d in (await c.replication()).values())

    await until(done, DEADLINE, f"every destination applying the outbox up to {head}")


async def duplicates(c: Cluster) -> tuple[int, list[str]]:
    twice, backwards = 0, []
    for region in AFFILIATES:
        n, back = applied_twice(await log_entries(c, region), region)
        twice += n
        backwards += back
    return twice, backwards


async def check_everything(c: Cluster, rounds: Rounds) -> tuple[int, int]:
    missing = await missing_copies(c, rounds.current)
    assert not missing, missing[:10]
    twice, backwards = await duplicates(c)
    assert twice == 0 and not backwards, (twice, backwards[:10])
    assert_versions_only_increase(await log_entries(c, PRIMARY))
    return twice, len(missing)


async def kill_mid_round(c: Cluster, rounds: Rounds, region: str, kill: Callable[[], None]) -> int:
    """Writes rounds until one is caught half-applied at `region`, then calls `kill()`;
    returns the outbox sequence the round starts after."""
    for _ in range(TRIES):
        after, last = await rounds.write()
        # The kill falls at a random point of the next batch's way (sealed, shipped, applied,
        # recorded), not always just after the sender recorded one.
        if await mid_round(c, region, (after, last)):
            await asyncio.sleep(rounds.random.uniform(0, rounds.batch_seconds))
            if await applied(c, region) < last:
                kill()
                return after
        await replicated(c)
    raise AssertionError(f"{TRIES} rounds in a row landed at {region} before a kill could fall inside one")


def applied_in_round(entries: list[dict[str, Any]], region: str, version: int) -> int:
    """How many copies of version `version` a region's log says it applied."""
    return sum(
        e["kind"] == "replication"
        and e["outcome"] == "allowed"
        and e["destination_region"] == region
        and e["record_version"] == version
        for e in entries
    )


def report_kills(
    tmp_path: Path, name: str, rounds: Rounds, ahead: int, catch_up: list[float], started: float
) -> None:
    """The figures of a kill test, once its checks have passed (nothing lost or applied twice)."""
    report(
        tmp_path,
        name,
        {
            "kills": KILLS,
            "rounds": rounds.n,
            "copies_per_round": USERS * len(AFFILIATES),
            "batch_size": BATCH,
            "applied_not_acknowledged": ahead,
            "lost": 0,
            "duplicate_applications": 0,
            "longest_catch_up_seconds": round(max(catch_up), 2),
            "wall_seconds": round(time.monotonic() - started, 1),
        },
    )


@pytest.fixture
async def small_batches(tmp_path: Path):
    c = Cluster(tmp_path / "deployment", replicator={"batch_size": BATCH})
    try:
        await c.start()
        yield c
    finally:
        await c.close()


async def test_sigkill_of_a_region_node_mid_batch_loses_no_copy_and_applies_none_twice(
    small_batches: Cluster, tmp_path: Path
):
    c = small_batches
    rounds = Rounds(c)
    await rounds.first()
    audits = {r: LogAudit(c, r, tmp_path / f"exports-{r}") for r in AFFILIATES}
    for audit in audits.values():
        await audit.verify()
    ahead, catch_up = 0, []
    started = time.monotonic()
    for k in range(KILLS):
        region = AFFILIATES[k % 2]

        def kill(r: str = region) -> None:
            assert c.stop(r, signal.SIGKILL) == -signal.SIGKILL

        after = await kill_mid_round(c, rounds, region, kill)
        # Once a batch to the dead region has failed, the batch before it is recorded (or was
        # never acknowledged): the primary's cursor holds still until the region is back.
        await until(lambda r=region: last_error(c, r), DEADLINE, f"a batch to the killed {region} failing")
        ahead += held_in_store(c, region, rounds.n) > await applied(c, region) - after
        restarted = time.monotonic()
        c.dep.start(region)
        await c.dep.wait_serving(DEADLINE)
        await replicated(c)
        catch_up.append(time.monotonic() - restarted)
        await audits[region].verify()
        await check_everything(c, rounds)
    report_kills(tmp_path, "crash_region_node", rounds, ahead, catch_up, started)


async def test_sigkill_of_a_standalone_worker_mid_batch_loses_no_copy_and_applies_none_twice(
    tmp_path: Path,
):
    c = Cluster(
        tmp_path / "deployment",
        replicator={"enabled": False, "batch_size": BATCH, "lease_seconds": 3.0, "ship_timeout": 1.0},
    )
    worker: subprocess.Popen | None = None
    try:
        await c.start()
        worker = start_worker(c, 0)
        rounds = Rounds(c)
        await rounds.first()
        ahead, catch_up = 0, []
        started = time.monotonic()
        for k in range(KILLS):
            region = AFFILIATES[k % 2]

            def kill(w: subprocess.Popen = worker) -> None:
                w.send_signal(signal.SIGKILL)
                w.wait()

            after = await kill_mid_round(c, rounds, region, kill)
            # Nothing ships now; each copy the region applied is an entry in its log.
            acknowledged = await applied(c, region) - after
            ahead += applied_in_round(await log_entries(c, region), region, rounds.n) > acknowledged
            restarted = time.monotonic()
            worker = start_worker(c, k + 1)  # takes the leases over once the dead worker's expire
            await replicated(c)
            catch_up.append(time.monotonic() - restarted)
            await check_everything(c, rounds)
        report_kills(tmp_path, "crash_worker", rounds, ahead, catch_up, started)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        await c.close()
