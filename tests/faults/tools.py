"""Shared tools of the fault suite: a TCP proxy that can misbehave or go down (in a thread of
its own), writers that remember what was acknowledged, waits on a condition with a deadline,
the duplicate count of a region's log, and the figures each fault test reports."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml

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


@dataclass
class Chaos:
    """What the proxy does to the connections it carries. Each time a connection has lived
    a random time from `lifetime` it is closed (`drop`: a FIN both ways) with probability
    `drop`, reset (`reset`: an RST both ways, SO_LINGER 0) with probability `reset`, or lives
    another such time; each chunk of bytes is held back up to `max_delay` seconds with
    probability `delay`, and for `stall_seconds` with probability `stall` (longer than the
    caller's deadline: the caller gives up while its request may still arrive). Order within
    a connection is kept."""

    delay: float = 0.0
    max_delay: float = 0.3
    stall: float = 0.0
    stall_seconds: float = 6.0
    drop: float = 0.0
    reset: float = 0.0
    lifetime: tuple[float, float] = (0.3, 4.0)


class TcpProxy:
    """A TCP proxy from a free port of 127.0.0.1 (kept across `down`/`up`) to `upstream`,
    run by an event loop in a thread of its own so that the test's own work never holds its
    traffic up. `down()` closes the port and resets every connection (the endpoint is gone:
    connections are refused); `up()` listens on the same port again. `chaos` says how it
    misbehaves meanwhile, drawing from a generator seeded with `seed`; `counts` what it did."""

    def __init__(self, upstream: tuple[str, int], seed: int | None = None):
        self.upstream = upstream
        self.port = 0
        self.seed = random.randrange(2**32) if seed is None else seed
        self.chaos = Chaos()
        self.counts: Counter[str] = Counter()
        self._random = random.Random(self.seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._thread.start()
        self.up()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def up(self) -> None:
        self._run(self._listen())

    def down(self) -> None:
        self._run(self._close())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._close(finish=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self, finish: bool = False) -> None:
        """Stops listening and resets every connection; `finish`: and ends every task."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for pair in list(self._live):
            for w in pair:
                _reset(w)
        if finish:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.counts["upstream refused"] += 1
            _reset(client_w)
            return
        pair = (client_w, up_w)
        self._live.add(pair)
        pumps = [
            asyncio.create_task(self._pump(client_r, up_w)),
            asyncio.create_task(self._pump(up_r, client_w)),
        ]
        try:
            while True:  # at the end of each lifetime drawn, the connection's fate is drawn
                c = self.chaos
                done, _ = await asyncio.wait(
                    pumps, timeout=self._random.uniform(*c.lifetime), return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                weights = [max(0.0, 1 - c.drop - c.reset), c.drop, c.reset]
                fate = self._random.choices(["keep", "drop", "reset"], weights)[0]
                if fate != "keep":
                    self.counts[fate] += 1
                    for w in pair:
                        _reset(w) if fate == "reset" else w.close()
                    break
        finally:
            for t in pumps:
                t.cancel()
            for w in pair:
                w.close()
            self._live.discard(pair)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(65536):
                c = self.chaos
                roll = self._random.random()
                if roll < c.stall:
                    self.counts["stalled"] += 1
                    await asyncio.sleep(c.stall_seconds)
                elif roll < c.stall + c.delay:
                    self.counts["delayed"] += 1
                    await asyncio.sleep(self._random.uniform(0, c.max_delay))
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with an RST instead of a FIN: SO_LINGER on, 0 seconds, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Writers:
    """`n` concurrent writers to the primary: each write goes to a new user with probability
    `new_users`, else to one already acknowledged; with probability `erase`, a writer erases
    an acknowledged user instead. Remembers every acknowledged write (a user's newest version
    and fields), every acknowledged erasure (its version), and every refusal by status code,
    with what it tried."""

    cluster: Cluster
    prefix: str
    n: int = 4
    new_users: float = 0.3
    pause: float = 0.02
    erase: float = 0.0
    acked: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    erased: dict[str, int] = field(default_factory=dict)
    refused: list[tuple[str, bool, dict[str, Any], grpc.StatusCode, str]] = field(default_factory=list)
    writes: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _next: int = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.n)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def close(self) -> None:
        """Stops every writer at once, whatever it was doing (a test's cleanup: no writer may
        outlive its test on the session's event loop)."""
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def fields(self, user: str, i: int) -> dict[str, Any]:
        return {"email": f"{user}.{i}@example.cn", "name": f"N {i}", "language": "zh-CN"}

    async def write_once(self) -> grpc.StatusCode:
        self._next += 1
        i = self._next
        new = not self.acked or random.random() < self.new_users
        user = f"{self.prefix}-{i}" if new else random.choice(list(self.acked))
        fields = self.fields(user, i)
        try:
            version = await self.cluster.put(user, fields)
        except grpc.aio.AioRpcError as e:
            self.refused.append((user, new, fields, e.code(), e.details() or ""))
            return e.code()
        self.writes += 1
        if version > self.acked.get(user, (0, {}))[0]:
            self.acked[user] = (version, fields)
        return grpc.StatusCode.OK

    async def erase_once(self) -> grpc.StatusCode:
        live = list(self.newest()[0])
        if not live:
            return grpc.StatusCode.NOT_FOUND
        user = random.choice(live)
        try:
            version = await self.cluster.delete(user)
        except grpc.aio.AioRpcError as e:
            # Another writer erased the user a moment before: the answer a caller should get.
            if e.code() != grpc.StatusCode.NOT_FOUND:
                self.refused.append((user, False, {}, e.code(), e.details() or ""))
            return e.code()
        self.writes += 1
        self.erased[user] = max(version, self.erased.get(user, 0))
        return grpc.StatusCode.OK

    def newest(self) -> tuple[dict[str, tuple[int, dict[str, Any]]], set[str]]:
        """(users whose newest acknowledged change is a write: its version and fields, users
        whose newest is an erasure). A write may land after an erasure of the same user (two
        writers at once): then the user lives again."""
        live = {u: vf for u, vf in self.acked.items() if vf[0] > self.erased.get(u, 0)}
        return live, set(self.erased) - set(live)

    async def _run(self) -> None:
        while not self._stop.is_set():
            if self.acked and random.random() < self.erase:
                await self.erase_once()
            else:
                await self.write_once()
            await asyncio.sleep(self.pause)


def applied_twice(entries: list[dict[str, Any]], region: str) -> tuple[int, list[str]]:
    """In a region node's transfer log: (copies applied more than once, users whose applied
    versions went backwards). An applied copy is an allowed replication or erasure entry
    whose destination is the region and that names a version (the erasure of a copy whose
    user the home created anew names none: no tombstone of its own came); each (user,
    version) may appear once, in rising order."""
    seen: Counter[tuple[str, int]] = Counter()
    last: dict[str, int] = {}
    backwards = []
    for e in entries:
        if (
            e["kind"] in ("replication", "erasure")
            and e["outcome"] == "allowed"
            and (e["destination_region"] == region)
            and int(e["record_version"]) != 0
        ):
            user, version = e["subject"], int(e["record_version"])
            seen[(user, version)] += 1
            if version < last.get(user, 0):
                backwards.append(user)
            last[user] = max(version, last.get(user, 0))
    return sum(n - 1 for n in seen.values()), backwards


async def gone(cluster: Cluster, user: str, region: str) -> bool:
    """True when `region`'s node holds no copy of `user` (NOT_FOUND for every purpose)."""
    try:
        await cluster.held(user, region)
    except grpc.aio.AioRpcError as e:
        return e.code() == grpc.StatusCode.NOT_FOUND
    return False


def only_destination(cluster: Cluster, region: str, address: str | None = None) -> None:
    """Before the primary starts: it ships to `region` alone (one region node is all most
    faults need), at `address` if given (a proxy before the region's node)."""
    path = cluster.dep.configs[PRIMARY]
    config = yaml.safe_load(path.read_text())
    config["affiliates"] = [
        {**a, **({"address": address} if address else {})}
        for a in config["affiliates"]
        if a["region"] == region
    ]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


async def log_entries(cluster: Cluster, region: str = PRIMARY) -> list[dict[str, Any]]:
    return [json.loads(j) for _, j, _ in await cluster.log(region)]


def report(tmp_path: Path, name: str, figures: dict[str, Any]) -> None:
    """Prints the test's figures as one JSON line and keeps them in `tmp_path/figures.json`
    (the README's table of fault figures is made from these)."""
    line = json.dumps({"test": name, **figures}, sort_keys=False)
    (tmp_path / "figures.json").write_text(line + "\n")
    print(f"\nFIGURES {line}")


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies what `reader` gives to `writer` until it ends or a side breaks (a TCP proxy's half)."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
