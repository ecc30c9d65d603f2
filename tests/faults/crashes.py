"""What the crash and disk-full tests share: writers that stop at a gate while a node is down
and know which of their writes were acknowledged and which are in doubt, and the checks that
nothing acknowledged was lost, that every region holds each user's newest copy, and that a
node's transfer-log export verifies against the key `residency init` wrote for it."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from residency.cli.main import main
from residency.server.config.node import load_config
from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import admin_pb2
from tests.conftest import Cluster, values
from tests.faults.tools import until
from tests.test_replication import allowed_fields

# Reads and checks run this many calls at a time (a few hundred users, two regions).
CONCURRENCY = 16


def fields_of(user: str, n: int) -> dict[str, Any]:
    """The fields of write number `n`: each write's values are its own, so a record read back
    names the one write it came from."""
    return {"email": f"{user}.{n}@example.cn", "name": f"N {n}", "language": "zh-CN"}


@dataclass(frozen=True, slots=True)
class Failed:
    """A write whose call failed: when it was sent (time.monotonic()), and whether the gate
    was still open when it failed (the node was meant to be up)."""

    user: str
    code: grpc.StatusCode
    details: str
    sent: float
    gate_open: bool


class GatedWriters:
    """`n` writers to the primary, each writing its own users (a new one half the time until
    it has `users_each`, else an update of one) one write at a time, while `go` is set. A
    writer parks at the gate once `go` is cleared; a crash test clears it just before it kills
    the node, so writes are in flight at the kill, and none is sent while the node is down.

    Remembers each user's newest acknowledged write (`acked`), the writes sent since whose
    call failed (`doubt`: those may or may not have committed), every failure (`failed`), when
    each acknowledged write was sent and answered (`answered`), and as `unexpected` an
    acknowledged version that does not rise (an acknowledged write before it was lost)."""

    def __init__(self, cluster: Cluster, n: int = 8, users_each: int = 25, prefix: str = "w", seed: int = 0):
        self.cluster, self.n, self.users_each, self.prefix = cluster, n, users_each, prefix
        self.random = random.Random(seed)
        self.acked: dict[str, tuple[int, dict[str, Any]]] = {}
        self.doubt: dict[str, list[dict[str, Any]]] = {}
        self.acknowledged = 0
        self.failed: list[Failed] = []
        self.answered: list[tuple[float, float]] = []
        self.unexpected: list[str] = []
        self.go = asyncio.Event()
        self._parked = 0
        self._stopped = False
        self._written = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def users(self) -> list[str]:
        return sorted({*self.acked, *self.doubt})

    def codes(self) -> dict[str, int]:
        return dict(Counter(f.code.name for f in self.failed))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(w), name=f"writer-{w}") for w in range(self.n)]

    async def park(self, deadline: float = 60.0) -> None:
        """Closes the gate (if the test has not already) and waits until every writer waits
        at it: nothing is in flight."""
        self.go.clear()
        await until(lambda: self._parked == self.n, deadline, "every writer parked at the gate", every=0.02)

    async def stop(self) -> None:
        self._stopped = True
        self.go.set()
        await asyncio.gather(*self._tasks)

    async def _run(self, w: int) -> None:
        mine: list[str] = []
        while True:
            if not self.go.is_set():
                self._parked += 1
                await self.go.wait()
                self._parked -= 1
            if self._stopped:
                return
            self._written += 1
            if len(mine) < self.users_each and (not mine or self.random.random() < 0.5):
                mine.append(f"{self.prefix}{w}-{len(mine)}")
                user = mine[-1]
            else:
                user = self.random.choice(mine)
            fields = fields_of(user, self._written)
            sent = time.monotonic()
            try:
                version = await self.cluster.put(user, fields)
            except grpc.aio.AioRpcError as e:
                self.doubt.setdefault(user, []).append(fields)
                self.failed.append(Failed(user, e.code(), e.details() or "", sent, self.go.is_set()))
                await asyncio.sleep(0.01)  # a refusal comes at once: do not spin on it
                continue
            self.answered.append((sent, time.monotonic()))
            before = self.acked.get(user, (0, {}))[0]
            if version <= before:
                self.unexpected.append(f"{user}: acknowledged version {version} after {before}: one was lost")
            self.acked[user] = (version, fields)
            self.doubt.pop(user, None)
            self.acknowledged += 1

    async def lost(self) -> list[str]:
        """With every writer parked: reads each user back from the primary. Returns the users
        whose newest acknowledged write it does not hold (a newer version must be one of the
        writes in doubt since). What it holds becomes the users' baseline for the next round:
        a write in doubt that committed is now as durable as an acknowledged one."""
        assert self._parked == self.n, "park the writers first"
        held = await read_all(self.cluster, self.users)
        lost = []
        for user in self.users:
            acked, doubt, got = self.acked.get(user), self.doubt.pop(user, []), held[user]
            if isinstance(got, str):
                ok = False  # the primary cannot read it back at all
            elif got is None:
                ok = acked is None  # never acknowledged, and none of its writes in doubt committed
            elif acked is not None and got[0] <= acked[0]:
                ok = got == acked
            else:
                ok = got[1] in doubt and got[0] - (acked[0] if acked else 0) <= len(doubt)
            if not ok:
                lost.append(f"{user}: acknowledged {acked}, holds {got}")
            if isinstance(got, tuple):
                self.acked[user] = got
        return lost


Held = tuple[int, dict[str, Any]] | None | str


async def read_all(cluster: Cluster, users: list[str]) -> dict[str, Held]:
    """Each user's record on the primary as (version, fields), None if it has none, or the
    status of a read that failed otherwise (e.g. FAILED_PRECONDITION: its data key is gone)."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(user: str) -> Held:
        async with gate:
            try:
                reply = await cluster.get(user)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                return f"{e.code().name}: {e.details()}"
            return reply.record.version, values(reply)

    return dict(zip(users, await asyncio.gather(*(one(u) for u in users)), strict=True))


async def missing_copies(
    cluster: Cluster, current: dict[str, tuple[int, dict[str, Any]]], regions: tuple[str, ...] = AFFILIATES
) -> list[str]:
    """The copies the region nodes do not hold as they should: each user's current version
    (`current`: what the primary holds) with exactly the fields the rules send there."""
    allowed = {r: allowed_fields(cluster, r) for r in regions}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(user: str, region: str) -> str:
        version, fields = current[user]
        want = {n: v for n, v in fields.items() if n in allowed[region]}
        async with gate:
            try:
                copy = await cluster.held(user, region)
            except grpc.aio.AioRpcError as e:
                return f"{user} in {region}: {e.code().name}"
        got = (copy.record.version, values(copy))
        return "" if got == (version, want) else f"{user} in {region}: holds {got}, not {(version, want)}"

    found = await asyncio.gather(*(one(u, r) for u in current for r in regions))
    return [f for f in found if f]


async def head_sequence(cluster: Cluster) -> int:
    reply = await cluster.admin().ReplicationStatus(admin_pb2.ReplicationStatusRequest(), timeout=10)
    return reply.head_sequence


async def catch_up(cluster: Cluster, head: int, deadline: float) -> float:
    """Waits until every destination has applied the primary's outbox up to `head`; returns
    when that was first seen (time.monotonic()). On timeout, says where each one stands."""

    async def applied() -> float:
        done = all(d.applied_sequence >= head for d in (await cluster.replication()).values())
        return time.monotonic() if done else 0.0

    try:
        return await until(applied, deadline, f"the regions applying the outbox up to {head}", every=0.05)
    except TimeoutError as e:
        where = "; ".join(
            f"{r}: applied {d.applied_sequence}, last error {d.last_error!r}"
            for r, d in (await cluster.replication()).items()
        )
        raise TimeoutError(f"{e} ({where})") from None


async def cli(*args: str) -> int:
    """A `residency` command in-process, off the event loop (it runs its own)."""
    return await asyncio.to_thread(main, list(args))


class LogAudit:
    """Exports a node's transfer log and verifies it offline as a reviewer would: signed by
    the log key `residency init` made for that node (pinned: its `log.pub`), and consistent
    with the previous export (the log only grew: nothing committed was rewritten or lost)."""

    def __init__(self, cluster: Cluster, region: str, directory: Path):
        self.cluster, self.region, self.directory = cluster, region, directory
        self.key = load_config(cluster.dep.configs[region]).keys_dir / "log.pub"
        self.previous: Path | None = None
        self.exports = 0

    async def verify(self) -> None:
        self.exports += 1
        out = self.directory / f"export-{self.exports}"
        target = self.cluster.target("reviewer", region=self.region)
        assert await cli("log", "export", *target, "--out", str(out)) == 0, f"export {self.exports} failed"
        previous = ["--previous", str(self.previous)] if self.previous else []
        code = await cli("log", "verify", str(out), "--key", str(self.key), *previous)
        assert code == 0, f"{self.region}'s export {self.exports} does not verify (stderr says why)"
        self.previous = out / "checkpoint"


def internal_errors(cluster: Cluster, region: str = PRIMARY) -> list[str]:
    """Lines of a node's log that report an internal error (a call answered INTERNAL)."""
    log = cluster.data_dir(region) / "node.log"
    return [line for line in log.read_text(errors="replace").splitlines() if "internal error" in line]
