"""Disk full on the primary (issue 15, point 8): writes are refused cleanly while it lasts,
nothing is half-written, the node stays up, and it resumes once space returns.

The primary's data dir is a tmpfs of `DISK_MIB` MiB mounted by the test (as root), so the
disk that fills is a real one: SQLite's writes of the store, its WAL and the keyring get
ENOSPC from the kernel. Eight writers write (a new user, or an update of one of their own)
while a filler file takes every free byte, and keep writing until enough writes were refused
for long enough; then the filler is deleted and they write on. Every refusal must be
RESOURCE_EXHAUSTED or UNAVAILABLE with a message saying what happened (never UNKNOWN or
INTERNAL); the process stays alive and its health answers SERVING or NOT_SERVING; every
acknowledged write reads back and no refused one does; after space returns new writes are
acknowledged, the regions catch up (each holds every user's newest copy) and the log's
export verifies. Erasures run beside the writes, of users written before: an acknowledged
one is gone from the primary and every region, a refused one left the record as it was."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.server.deployment import AFFILIATES, PRIMARY
from tests.conftest import Cluster
from tests.faults.crashes import GatedWriters, LogAudit, fields_of, internal_errors, missing_copies, read_all
from tests.faults.tools import applied_twice, log_entries, report, until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

DISK_MIB = 24
WRITERS = 8
ERASABLE = 300  # users written before the disk fills, for the eraser
# Refusals to see, and for how long at least, before space returns.
REFUSALS = 200
FULL_SECONDS = 3.0
DEADLINE = 90.0
CLEAN = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture
async def small_disk(idle_cluster: Cluster) -> AsyncIterator[Cluster]:
    """The deployment with the primary's data dir on a tmpfs of DISK_MIB MiB; unmounted once
    the primary has stopped."""
    c = idle_cluster
    data = c.data_dir(PRIMARY)
    data.mkdir(parents=True, mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0700", "tmpfs", str(data)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs (root and mount(8) needed): {mounted.stderr.strip()}")
    try:
        yield c
    finally:
        if PRIMARY in c.dep.procs:
            c.stop(PRIMARY)
        if (data / "node.log").exists():  # kept for a post-mortem: the tmpfs goes with its files
            shutil.copy(data / "node.log", c.dir / f"{PRIMARY}-node.log")
        subprocess.run(["umount", str(data)], check=True)


class Eraser:
    """Erases one user after another (`DeleteRecord`) until stopped or none is left, sending
    a refused erasure again as a caller would; remembers the users erased and every refusal."""

    def __init__(self, cluster: Cluster, users: list[str]):
        self.cluster, self.left = cluster, list(users)
        self.erased: list[str] = []
        self.refused: list[tuple[str, grpc.StatusCode, str]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while self.left and not self._stop.is_set():
            user = self.left[-1]
            try:
                await self.cluster.delete(user)
            except grpc.aio.AioRpcError as e:
                self.refused.append((user, e.code(), e.details() or ""))
                if e.code() not in CLEAN:  # not one to send again: the test reports it
                    self.left.pop()
                await asyncio.sleep(0.01)  # a refusal comes at once: do not spin on it
                continue
            self.erased.append(self.left.pop())


async def erasures_wrong(
    c: Cluster, users: dict[str, dict[str, Any]], erased: list[str]
) -> list[tuple[str, Any]]:
    """The users (written once, with `users[u]`) whose record on the primary is not what their
    erasures were answered: gone once one was acknowledged, else there as written."""
    held = await read_all(c, list(users))
    gone = set(erased)
    return [(u, held[u]) for u in users if held[u] != (None if u in gone else (1, users[u]))]


def fill(directory: Path) -> int:
    """Writes a file of zeros into `directory` until the disk is full; returns its size."""
    chunk = b"\0" * (1 << 20)
    size = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        while True:
            try:
                size += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]  # the last MiB may still hold a few KiB
                if len(chunk) < 4096:
                    return size


async def health(c: Cluster) -> int:
    stub = health_pb2_grpc.HealthStub(c.channel(PRIMARY, "operator", PRIMARY))
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)).status


async def test_a_full_disk_refuses_writes_cleanly_and_the_node_resumes_when_space_returns(
    small_disk: Cluster, tmp_path: Path
):
    c = small_disk
    await c.start()
    data = c.data_dir(PRIMARY)
    # Mostly new users: each needs a new data key, so the keyring's file is written too.
    writers = GatedWriters(c, n=WRITERS, users_each=1_000_000, prefix="full")
    erasable = {f"erase-{i}": fields_of(f"erase-{i}", i) for i in range(ERASABLE)}
    for user, fields in erasable.items():
        await c.put(user, fields)
    eraser = Eraser(c, list(erasable))
    writers.go.set()
    writers.start()
    eraser.start()
    try:
        await until(lambda: writers.acknowledged >= 200, DEADLINE, "200 writes before the disk fills")
        before = writers.acknowledged
        filled = time.monotonic()
        filler = await asyncio.to_thread(fill, data)
        await until(
            lambda: len(writers.failed) >= REFUSALS and time.monotonic() - filled >= FULL_SECONDS,
            DEADLINE,
            f"{REFUSALS} writes refused on the full disk",
        )
        during = writers.acknowledged - before
        proc = c.dep.procs[PRIMARY]
        assert proc.poll() is None, "the primary died of a full disk"
        health_while_full = await health(c)
        assert health_while_full in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        refused_while_full = len(writers.failed)
        (data / "filler").unlink()
        freed = time.monotonic()
        after = writers.acknowledged
        await until(lambda: writers.acknowledged >= after + 200, DEADLINE, "200 writes once space returned")
        await writers.park()
        await eraser.stop()
    finally:
        await writers.stop()
        await eraser.stop()

    unclean = [f for f in writers.failed if f.code not in CLEAN]
    assert not unclean, f"refusals other than {sorted(s.name for s in CLEAN)}: {unclean[:5]}"
    unclear = [f for f in writers.failed if "disk is full" not in f.details]
    assert not unclear, f"refusals that do not say why: {unclear[:5]}"
    assert refused_while_full >= REFUSALS
    # A write sent once the filler was gone commits: the node kept nothing of the full disk.
    refused_later = [f for f in writers.failed if f.sent >= freed]
    assert not refused_later, refused_later[:5]
    resumed = min(done for sent, done in writers.answered if sent >= freed) - freed
    assert not writers.unexpected, writers.unexpected[:5]
    assert proc.poll() is None
    assert await health(c) == health_pb2.HealthCheckResponse.SERVING

    # Nothing half-written: an acknowledged write reads back as it was acknowledged (a later
    # refused update did not change it), a user whose every write was refused has no record.
    held = await read_all(c, writers.users)
    wrong = [(u, held[u], writers.acked.get(u)) for u in writers.users if held[u] != writers.acked.get(u)]
    assert not wrong, wrong[:5]
    # The same of erasures: an acknowledged one left no record, a refused one the record whole.
    assert eraser.erased and eraser.refused, "the eraser saw no erasure acknowledged or none refused"
    unclean = [r for r in eraser.refused if r[1] not in CLEAN or "disk is full" not in r[2]]
    assert not unclean, unclean[:5]
    erased_wrong = await erasures_wrong(c, erasable, eraser.erased)
    assert not erased_wrong, erased_wrong[:5]

    await c.replicated(timeout=DEADLINE)
    live = {**writers.acked, **{u: (1, erasable[u]) for u in erasable if u not in eraser.erased}}
    missing = await missing_copies(c, live)
    assert not missing, missing[:10]
    for region in AFFILIATES:  # every acknowledged erasure reached the regions
        for user in eraser.erased:
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await c.held(user, region)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND, (user, region)
    # A batch the regions applied while the primary could not record it was sent again.
    for region in AFFILIATES:
        assert applied_twice(await log_entries(c, region), region) == (0, []), region
    await LogAudit(c, PRIMARY, tmp_path / "exports").verify()
    assert not internal_errors(c), internal_errors(c)[:5]
    report(
        tmp_path,
        "disk_full",
        {
            "disk_mib": DISK_MIB,
            "filler_mib": round(filler / (1 << 20), 1),
            "writes_acknowledged": writers.acknowledged,
            "acknowledged_while_full": during,
            "refused": len(writers.failed),
            "refused_by_code": writers.codes(),
            "half_written": len(wrong) + len(erased_wrong),
            "erasures_acknowledged": len(eraser.erased),
            "erasures_refused": len(eraser.refused),
            "health_while_full": health_pb2.HealthCheckResponse.ServingStatus.Name(health_while_full),
            "seconds_to_resume": round(resumed, 2),
            "users": len(writers.users),
        },
    )


async def test_an_erasure_committed_on_an_almost_full_disk_is_answered_as_committed(
    small_disk: Cluster, tmp_path: Path
):
    """An erasure clears the WAL files after it commits (erasure is final on disk), which
    needs room the commit itself did not: the database file grows as the frames are copied
    back. With the disk full, space returns 4 KiB at a time while one eraser erases: the
    first erasures to commit (into WAL space the writes before grew, or into the room just
    returned) do so with too little room to clear the WAL. Each erasure must
    be answered as what happened to it (acknowledged: gone; refused, RESOURCE_EXHAUSTED:
    still there), so must every write after it, and the log's export must still verify."""
    c = small_disk
    await c.start()
    data = c.data_dir(PRIMARY)
    users = {f"erase-{i}": fields_of(f"erase-{i}", i) for i in range(ERASABLE)}
    for user, fields in users.items():
        await c.put(user, fields)
    await asyncio.to_thread(fill, data)
    eraser = Eraser(c, list(users))
    eraser.start()
    filler = data / "filler"
    end = time.monotonic() + DEADLINE
    try:
        while len(eraser.erased) < 20 and filler.stat().st_size and time.monotonic() < end:
            os.truncate(filler, max(0, filler.stat().st_size - 4096))
            # Space returns page by page while the eraser runs: a pace, not a synchronisation.
            await asyncio.sleep(0.05)
    finally:
        await eraser.stop()
    unclean = [r for r in eraser.refused if r[1] not in CLEAN or "disk is full" not in r[2]]
    assert not unclean, unclean[:5]
    assert len(eraser.erased) >= 20, (len(eraser.erased), len(eraser.refused))
    wrong = await erasures_wrong(c, users, eraser.erased)
    assert not wrong, wrong[:5]

    filler.unlink()
    await c.put("after-1", fields_of("after-1", 1))
    assert (await c.get("after-1")).record.version == 1
    await LogAudit(c, PRIMARY, tmp_path / "exports").verify()
    report(
        tmp_path,
        "erasure_on_full_disk",
        {"erasures_acknowledged": len(eraser.erased), "erasures_refused": len(eraser.refused)},
    )
