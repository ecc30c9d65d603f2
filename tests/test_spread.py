"""Workers share destinations evenly (replicator/spread.py): each announces itself in the
store, takes a free lease only while under its fair share (or while no other live worker that
could take it is under its own), and hands one over while it holds more. Each worker here has
a store connection of its own, as processes on several hosts would, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from residency.replicator.lease import Lease, StandDown
from residency.replicator.spread import Spread, Worker, hand_over_one, may_take
from residency.server.storage.postgres import PostgresStore
from residency.server.storage.sqlite import SqliteStore
from residency.server.storage.thread import StoreThread
from tests.conftest import BACKENDS
from tests.harness import eventually

Store = SqliteStore | PostgresStore
SG, EU = "ap-southeast-1", "eu-west-1"
REGIONS = [SG, EU]
# Short, so that expiries come quickly, yet long enough that renewals (every third of it, as
# in production) survive a loaded machine's stalls: a missed one would pass a lease on.
LEASE = 3.0


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every store test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


class Keeper:
    """One worker's leases, kept round after round as `Replicator` keeps them (`Spread.keep`,
    counting the rounds so that a test can wait for some to pass)."""

    def __init__(self, store: Store, owner: str, regions: list[str] = REGIONS):
        self.owner = owner
        self.db = StoreThread(store)
        self.spread = Spread(owner, regions, LEASE)
        self.wakes = {r: asyncio.Event() for r in regions}
        self.rounds = 0
        self.task: asyncio.Task | None = None

    def start(self) -> Keeper:
        self.db.start()
        self.task = asyncio.create_task(self._keep())
        return self

    async def _keep(self) -> None:
        while True:
            await self.spread.round(self.db, self.wakes)
            self.rounds += 1
            await asyncio.sleep(LEASE / 3)

    async def kill(self) -> None:
        """Stops at once, handing nothing over and leaving its presence (as SIGKILL would)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def stop(self) -> None:
        await self.kill()
        await self.spread.leave(self.db)

    def rounds_pass(self, n: int) -> Callable[[], bool]:
        until = self.rounds + n
        return lambda: self.rounds >= until


@pytest.fixture
async def workers(open_store: Callable[..., Store]) -> AsyncIterator[Callable[..., Keeper]]:
    started: list[Keeper] = []

    def start(owner: str, regions: list[str] = REGIONS) -> Keeper:
        w = Keeper(open_store(), owner, regions).start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.kill()
        await w.db.drain()


def holders(store: Store) -> dict[str, str]:
    """Each destination's lease holder now ('' if the lease is free)."""
    status = store.replication_status(REGIONS, time.time())["destinations"]
    return {r: status[r]["lease_owner"] for r in REGIONS}


def epochs(store: Store) -> dict[str, int]:
    rows = store._db.execute("SELECT destination, epoch FROM leases").fetchall()
    return {r: e for r, e in rows}


def counts(store: Store) -> dict[str, int]:
    held: dict[str, int] = {}
    for owner in holders(store).values():
        held[owner] = held.get(owner, 0) + 1
    return held


def live(store: Store) -> list[str]:
    return [owner for owner, *_ in store.live_workers(time.time(), time.time() + 2 * LEASE)]


async def one_each(observer: Store, workers: Callable[..., Keeper]) -> tuple[Keeper, Keeper, str]:
    """Workers a and b, started together, once they hold one lease each; and a's destination."""
    a, b = workers("a"), workers("b")
    await until(lambda: counts(observer) == {"a": 1, "b": 1}, "the workers hold one lease each")
    (region,) = [r for r in REGIONS if holders(observer)[r] == "a"]
    return a, b, region


async def until(check: Callable[[], bool], what: str, deadline: float = 10 * LEASE) -> None:
    async def holds() -> bool:
        return check()

    await eventually(holds, what, deadline)


async def test_a_lone_worker_takes_every_lease_and_hands_one_over_when_a_second_joins(
    open_store: Callable[..., Store], workers: Callable[..., Keeper]
):
    observer = open_store()
    workers("a")
    await until(lambda: counts(observer) == {"a": 2}, "the lone worker holds both leases")
    before = epochs(observer)
    workers("b")
    await until(lambda: counts(observer) == {"a": 1, "b": 1}, "the workers hold one lease each")
    (moved,) = [r for r in REGIONS if holders(observer)[r] == "b"]
    # The lease passed on: its epoch went up by one, the other's did not move.
    assert epochs(observer) == before | {moved: before[moved] + 1}


async def test_two_workers_starting_together_end_with_one_lease_each(
    open_store: Callable[..., Store], workers: Callable[..., Keeper]
):
    await one_each(open_store(), workers)


async def test_a_third_worker_takes_nothing_away_from_two_holding_their_share(
    open_store: Callable[..., Store], workers: Callable[..., Keeper]
):
    observer = open_store()
    a, b, _ = await one_each(observer, workers)
    held, before = holders(observer), epochs(observer)
    c = workers("c")
    # Every worker renews several times with the third one live: shares stay 1, 1, 0.
    passed = [w.rounds_pass(4) for w in (a, b, c)]
    await until(lambda: all(p() for p in passed), "four rounds of every worker")
    assert live(observer) == ["a", "b", "c"]
    assert holders(observer) == held and epochs(observer) == before


async def test_the_survivor_takes_a_killed_workers_lease_once_it_expires(
    open_store: Callable[..., Store], workers: Callable[..., Keeper]
):
    observer = open_store()
    a, _, lost = await one_each(observer, workers)
    await a.kill()  # no release: its lease and its presence expire
    before = epochs(observer)
    (expires,) = observer._db.execute("SELECT expires_at FROM leases WHERE destination=?", (lost,)).fetchone()
    await until(lambda: counts(observer) == {"b": 2}, "the survivor holds both leases")
    assert time.time() >= expires  # taken once expired, not before
    assert epochs(observer)[lost] == before[lost] + 1


async def test_a_presence_nobody_renews_counts_only_until_it_expires(
    open_store: Callable[..., Store], workers: Callable[..., Keeper]
):
    observer = open_store()
    now = time.time()
    with observer.transaction():
        # A worker that announced itself and never came back (its row expires in a lease),
        # and a row further ahead than any worker renews to (a clock far off, or by hand).
        observer.worker_present("gone", REGIONS, now, LEASE)
        observer.worker_present("far-ahead", REGIONS, now, 3600)
    gone_until = now + LEASE
    workers("a")
    # While "gone" counts, the fair share is one lease, and "gone", under it, could take the other.
    await until(lambda: counts(observer).get("a") == 1, "the worker holds one lease")
    if time.time() < gone_until - LEASE / 3:  # a round surely ran with "gone" still live
        assert counts(observer) == {"a": 1, "": 1}
    await until(lambda: counts(observer) == {"a": 2}, "the worker holds both leases")
    assert time.time() >= gone_until
    assert live(observer) == ["a"]
    gone = observer._db.execute("SELECT count(*) FROM workers WHERE owner='gone'").fetchone()[0]
    assert gone == 0  # an expired presence is deleted by the next worker that renews its own


async def test_a_stopping_worker_leaves_and_the_other_takes_its_share_at_once(
    open_store: Callable[..., Store], workers: Callable[..., Keeper]
):
    observer = open_store()
    a, _, left = await one_each(observer, workers)
    await a.stop()
    # Released and gone at once, not after the lease and the presence expire.
    assert holders(observer)[left] == ""
    assert live(observer) == ["b"]
    await until(lambda: counts(observer) == {"b": 2}, "the other worker holds both leases")


async def test_a_hand_over_waits_for_the_batch_under_way(open_store: Callable[..., Store]):
    """The worker stops shipping at once (`check` and every fence refuse), the batch under
    way still commits what landed (the store names this worker until the release), and only
    then is the lease released; the next holder takes it under a higher epoch."""
    store = open_store()
    db = StoreThread(store)
    db.start()
    lease, wake = Lease(SG, "a", LEASE), asyncio.Event()
    try:
        await lease.renew(db, wake)
        assert lease.held and lease.epoch == 1
        fence = lease.fence(lease.epoch)
        async with lease.shipping:  # a batch is under way
            handing = asyncio.create_task(lease.hand_over(db))
            await until(lambda: not lease.held, "the hand-over begins")
            with pytest.raises(StandDown):
                lease.check()
            with pytest.raises(StandDown):
                fence.remaining()
            # The batch's commit still passes: the lease is this worker's until the release.
            await db.write(lambda: lease.confirm(store, time.time()))
            assert not handing.done()
        await handing
        assert holders(store)[SG] == ""
        assert await db.write(lambda: store.lease_take(SG, "b", time.time(), LEASE)) == (True, False, 2)
    finally:
        await db.drain()


def w(owner: str, held: int, regions: list[str] = REGIONS) -> Worker:
    return Worker(owner, frozenset(regions), held)


def test_a_worker_alone_takes_every_free_lease():
    assert may_take(w("a", 0), SG, []) and may_take(w("a", 1), EU, [])
    assert hand_over_one(w("a", 2), REGIONS, []) is None


def test_a_worker_at_its_share_leaves_a_free_lease_to_one_under_its_share():
    assert may_take(w("a", 0), SG, [w("b", 0)])  # under its share: takes
    assert not may_take(w("a", 1), EU, [w("b", 0)])  # at its share, b is under: leaves it
    assert may_take(w("a", 1), EU, [w("b", 1)])  # nobody is under: a lease is never left unheld
    # Three workers, two destinations: shares are 1, so the third may take a free lease, but
    # the two holding theirs hand nothing over to it.
    assert may_take(w("c", 0), SG, [w("a", 1), w("b", 1)])
    assert hand_over_one(w("a", 1), [SG], [w("b", 1), w("c", 0)]) is None


def test_a_worker_over_its_share_hands_over_only_what_the_other_can_take():
    assert hand_over_one(w("a", 2), REGIONS, [w("b", 0)]) == EU
    assert hand_over_one(w("a", 2), REGIONS, [w("b", 0, [SG])]) == SG  # b ships to SG only
    # b ships to a third region only: nothing a holds is of use to it.
    assert hand_over_one(w("a", 2), REGIONS, [w("b", 0, ["us-east-1"])]) is None
    # Nor does a leave a free lease to a worker that cannot take it.
    assert may_take(w("a", 1), EU, [w("b", 0, [SG])])
