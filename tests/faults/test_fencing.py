"""Fencing (issue 15.5): a worker whose lease passed to another while it stalled can land
nothing after the new holder: not in an affiliate's bucket (conditional PUTs, the batch's
deadline), not at a region node (the lease epoch every batch carries)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from residency.replicator.lease import Fence, Lease, StandDown
from residency.replicator.sinks.s3 import object_key
from residency.server.deployment import PRIMARY
from residency.server.keys.copykey import load_copy_key
from residency.server.storage.sqlite import SqliteStore
from residency.v1 import replica_pb2
from tests.conftest import S3_BUCKET, S3_PREFIX, S3_REGION, Cluster, SeaweedFS, values
from tests.faults.tools import pipe
from tests.test_policy import eventually
from tests.test_s3 import sink
from tests.test_signed_copies import signer

pytestmark = pytest.mark.faults

SG = "ap-southeast-1"
# Long enough that a holder's renewals (every third of it) survive a loaded machine's stalls.
LEASE = 6.0
REQUEST_LINES = (b"PUT /", b"HEAD /", b"DELETE /")


def test_a_lease_epoch_rises_whenever_the_lease_passes_on_and_never_goes_back(tmp_path: Path):
    store = SqliteStore(tmp_path / "node.db")
    t = 1000.0
    try:
        assert store.lease_take("r", "a", t, 10) == (True, False, 1)
        assert store.lease_take("r", "a", t + 5, 10) == (True, False, 1)  # renewed in time: one hold
        assert store.lease_take("r", "b", t + 6, 10) == (False, False, 0)  # held by a: not b's
        assert store.lease_held("r", "a", t + 6, 1) and not store.lease_held("r", "a", t + 6, 0)
        assert store.lease_take("r", "b", t + 16, 10) == (True, False, 2)  # expired: passes on
        assert not store.lease_held("r", "a", t + 16, 1)  # the stale holder cannot commit
        assert store.lease_take("r", "b", t + 27, 10) == (True, False, 3)  # its own, but expired
        store.lease_release("r", "b")
        assert store.lease_take("r", "a", t + 28, 10) == (True, False, 4)  # released: the epoch stays
        # a restarted process of the same owner takes it back at once, under a new epoch: its
        # predecessor's batches still on their way name the old one
        assert store.lease_take("r", "a", t + 29, 10, new_hold=True) == (True, False, 5)
        assert store.lease_take("r", "a", t + 30, 10) == (True, False, 5)
        assert not store.lease_held("r", "a", t + 30, 4)
    finally:
        store.close()


class HoldingProxy:
    """A TCP proxy between one worker and the S3 endpoint. While `holding`, it keeps what the
    worker sends instead of forwarding it; `release` delivers it late, on fresh connections:
    the network that delays a stale worker's PUT until after the new lease holder's DELETE."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.holding = False
        self.held: list[bytearray] = []
        self.received = bytearray()  # everything the worker sent, held or not
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def requests(self, since: int = 0) -> int:
        return sum(self.received[since:].count(line) for line in REQUEST_LINES)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        back = asyncio.create_task(pipe(up_reader, writer))
        held: bytearray | None = None
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
                if self.holding or held is not None:
                    if held is None:
                        held = bytearray()
                        self.held.append(held)
                    held += chunk
                else:
                    up_writer.write(chunk)
                    await up_writer.drain()
        except ConnectionError:
            pass
        finally:
            up_writer.close()
            writer.close()
            back.cancel()
            await asyncio.gather(back, return_exceptions=True)

    async def release(self) -> list[bytes]:
        """Delivers what was held; returns the endpoint's status lines for it."""
        self.holding = False
        answers: list[bytes] = []
        for data in self.held:
            reader, writer = await asyncio.open_connection(*self.upstream)
            writer.write(bytes(data))
            await writer.drain()
            got = bytearray()
            expected = sum(data.count(line) for line in REQUEST_LINES)
            while got.count(b"HTTP/1.1 ") < expected:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=30)
                if not chunk:
                    break
                got += chunk
            writer.close()
            answers += [line for line in bytes(got).split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
        self.held.clear()
        return answers


def start_worker(c: Cluster, config: Path, name: str) -> subprocess.Popen:
    out = open(c.dir / f"worker-{name}.log", "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(
        [sys.executable, "-m", "residency.cli.main", "replicate", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def bucket_has(s3: SeaweedFS, user_id: str) -> bool:
    client = s3.client()
    try:
        client.head_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}copies/{user_id}.sealedcopy")
    except client.exceptions.ClientError as e:
        if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def lease_epochs(c: Cluster) -> dict[str, int]:
    return {r: c.lease_epoch(r) for r in (SG, S3_REGION)}


async def test_a_stale_workers_late_put_never_brings_an_erased_users_object_back(
    tmp_path: Path, seaweed: SeaweedFS
):
    await asyncio.to_thread(seaweed.make_bucket, S3_BUCKET)
    c = Cluster(
        tmp_path / "deployment",
        s3=seaweed,
        replicator={"enabled": False, "lease_seconds": LEASE, "ship_timeout": 1.0},
    )
    proxy = HoldingProxy(seaweed.endpoint)
    workers: dict[str, subprocess.Popen] = {}
    try:
        await c.start(PRIMARY, SG)
        # The stale-to-be worker reaches the bucket through the proxy; the other directly.
        doc = yaml.safe_load(c.dep.configs[PRIMARY].read_text())
        for a in doc["affiliates"]:
            if a["region"] == S3_REGION:
                a["endpoint_url"] = await proxy.start()
        stale_config = c.dep.configs[PRIMARY].with_name("cn-north-stale-worker.yaml")
        stale_config.write_text(yaml.safe_dump(doc, sort_keys=False))
        workers["stale"] = start_worker(c, stale_config, "stale")

        async def owners() -> set[str]:
            return {d.lease_owner.split(":")[1] for d in (await c.replication()).values() if d.lease_owner}

        async def stale_holds_both() -> bool:
            return await owners() == {str(workers["stale"].pid)}

        await eventually(stale_holds_both, "the first worker holds both leases")
        await c.put("f-1", {"email": "first@example.cn", "language": "zh-CN"})
        await c.replicated()
        assert await asyncio.to_thread(bucket_has, seaweed, "f-1")
        stale_epochs = lease_epochs(c)

        # The worker ships f-1's next version; the network holds its PUT, and the worker stalls.
        proxy.holding = True
        await c.put("f-1", {"email": "second@example.cn"})

        async def put_held() -> bool:
            return any(b"PUT /" in h and b"f-1" in h for h in proxy.held)

        await eventually(put_held, "the stale worker's PUT is under way")
        workers["stale"].send_signal(signal.SIGSTOP)
        # The next worker starts only now: beside a live one, it would be handed one of the
        # two leases (workers share destinations evenly), maybe the bucket's.
        workers["next"] = start_worker(c, c.dep.configs[PRIMARY], "next")

        async def next_holds_both() -> bool:
            return await owners() == {str(workers["next"].pid)}

        await eventually(next_holds_both, "the lease passes to the other worker", 10 * LEASE)
        new_epochs = lease_epochs(c)
        assert all(new_epochs[r] > stale_epochs[r] for r in stale_epochs), (stale_epochs, new_epochs)

        # The user is erased meanwhile: the new holder deletes the object.
        await c.delete("f-1")
        await c.replicated()
        assert not await asyncio.to_thread(bucket_has, seaweed, "f-1")

        # The stale PUT arrives now, after the DELETE: refused, as it names the object it replaced.
        answers = await proxy.release()
        assert answers and all(a.startswith(b"HTTP/1.1 412") for a in answers), answers
        received = len(proxy.received)
        workers["stale"].send_signal(signal.SIGCONT)
        end = time.monotonic() + 2 * LEASE  # it resumes: its deadline has passed, so it stops
        while time.monotonic() < end:
            assert not await asyncio.to_thread(bucket_has, seaweed, "f-1"), "the erased user's object is back"
            await asyncio.sleep(0.2)
        assert proxy.requests(received) == 0, bytes(proxy.received[received:])[:200]
        assert workers["stale"].poll() is None and workers["next"].poll() is None
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await c.held("f-1", SG)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND

        for w in workers.values():
            w.terminate()  # hands its leases over and exits 0
            assert w.wait(30) == 0
        await the_region_node_refuses_a_stale_epoch(c, stale_epochs[SG], new_epochs[SG])
    finally:
        for w in workers.values():
            if w.poll() is None:
                w.send_signal(signal.SIGCONT)
                w.kill()
                w.wait()
        await proxy.close()
        await c.close()


async def the_region_node_refuses_a_stale_epoch(c: Cluster, stale: int, taken: int) -> None:
    """The liar: the stale worker's batch sent with the worker's own certificate and signed
    with the home's copy key, under the epoch it held: refused, and nothing changes. (`taken`:
    the epoch the other worker took the lease under; the node has seen it or a later one.)"""
    home = load_copy_key(PRIMARY, c.dir / "keys" / PRIMARY / "copy.key")
    copy = home.sign_copy(replica_pb2.SealedCopy(user_id="t-1", version=1, deleted=True, format=2), SG)

    def batch(epoch: int, mark_signer=home) -> replica_pb2.ApplyCopiesRequest:  # noqa: ANN001
        mark = mark_signer.high_water(SG, 10, epoch)
        return replica_pb2.ApplyCopiesRequest(source_region=PRIMARY, copies=[copy], high_water=mark)

    counts = await c.status(SG)
    seen = 0
    for epoch in (stale, 0):  # the epoch it held; none at all
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.replica(SG).ApplyCopies(batch(epoch), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        info = error_details_pb2.ErrorInfo()
        assert rpc_status.from_call(e.value).details[0].Unpack(info)
        assert (info.reason, info.metadata["epoch"]) == ("STALE_LEASE_EPOCH", str(epoch))
        seen = int(info.metadata["seen"])
        assert seen >= taken > stale
        assert f"lease epoch {epoch} is stale" in e.value.details()
        assert f"under epoch {seen}" in e.value.details()
    # An epoch above the current one, signed by a key that is not the home's: refused, and not
    # remembered (else it would fence out every honest worker).
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.replica(SG).ApplyCopies(batch(seen + 100, signer()), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    now = await c.status(SG)
    assert (now.records, now.tombstones) == (counts.records, counts.tombstones)
    assert not [e for _, e, _ in await c.log(SG) if '"t-1"' in e]
    # The same batch under the epoch the node has seen is taken: the refusals were for the lies.
    reply = await c.replica(SG).ApplyCopies(batch(seen), timeout=10)
    assert (reply.applied, reply.skipped) == (1, 0)
    assert (await c.status(SG)).tombstones == counts.tombstones + 1


def held_lease(seconds: float = 60.0) -> Lease:
    """A lease as its keeper leaves it just after taking it (epoch 1)."""
    lease = Lease(S3_REGION, "this-worker", seconds)
    lease.held, lease.epoch, lease.until = True, 1, time.monotonic() + seconds
    return lease


async def test_an_s3_batch_under_a_fence_stops_at_its_deadline_and_never_goes_back_in_time(
    seaweed: SeaweedFS,
):
    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    proxy = HoldingProxy(seaweed.endpoint)
    s, cold, slow = sink(seaweed.endpoint), sink(seaweed.endpoint), sink(await proxy.start(), timeout=5.0)
    client = seaweed.client()

    def version() -> str:
        return client.head_object(Bucket="bkt", Key=object_key("residency/", "u-1"))["Metadata"][
            "residency-version"
        ]

    try:
        lease = held_lease()
        await s.apply("cn-north", [replica_pb2.SealedCopy(user_id="u-1", version=2)], None, lease.fence(1))
        assert version() == "2"
        # Another worker (no remembered entity tag) with an older version: it looks first, and
        # leaves the newer copy alone.
        await cold.apply("cn-north", [replica_pb2.SealedCopy(user_id="u-1", version=1)], None, lease.fence(1))
        assert version() == "2"
        # Past the deadline, or with the lease lost or under another epoch: nothing is sent.
        old = replica_pb2.SealedCopy(user_id="u-1", version=3)
        stale = [
            Fence(lease, 1, time.monotonic() - 0.1),
            Fence(held_lease(), 0, time.monotonic() + 5),
        ]
        lost = held_lease()
        lost.held = False
        stale.append(Fence(lost, 1, time.monotonic() + 5))
        for fence in stale:
            with pytest.raises(StandDown):
                await s.apply("cn-north", [old], None, fence)
        assert version() == "2"
        short = held_lease()
        short.until = time.monotonic() + 20  # less than half of its 60 s left: no batch starts
        with pytest.raises(StandDown):
            short.fence(1)
        # An endpoint that does not answer: the batch ends at its deadline (one second here),
        # well before its requests' own timeout (five), and says so.
        proxy.holding = True
        began = time.monotonic()
        with pytest.raises(StandDown):
            await slow.apply("cn-north", [old], None, Fence(held_lease(), 1, time.monotonic() + 1.0))
        assert time.monotonic() - began < 3.0
        assert version() == "2"
    finally:
        for each in (s, cold, slow):
            await each.close()
        await proxy.close()


async def test_a_store_whose_lease_epochs_went_back_catches_up_with_its_region_node(cluster: Cluster):
    """A primary's store restored from a backup holds lower epochs than its region nodes have
    taken batches under: its worker, refused as stale while the store still names it holder
    under its epoch, moves the lease above the node's epoch, and shipping goes on."""
    c = cluster
    await c.put("r-1", {"email": "first@example.cn", "language": "zh-CN"})
    await c.replicated()
    home = load_copy_key(PRIMARY, c.dir / "keys" / PRIMARY / "copy.key")
    ahead = c.lease_epoch(SG) + 50
    copy = home.sign_copy(replica_pb2.SealedCopy(user_id="t-2", version=1, deleted=True, format=2), SG)
    mark = home.high_water(SG, 10, ahead)
    await c.replica(SG).ApplyCopies(
        replica_pb2.ApplyCopiesRequest(source_region=PRIMARY, copies=[copy], high_water=mark), timeout=10
    )
    await c.put("r-1", {"email": "second@example.cn"})
    await c.replicated()
    assert values(await c.held("r-1", SG))["email"] == "second@example.cn"
    assert c.lease_epoch(SG) == ahead + 1
