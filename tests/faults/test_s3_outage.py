"""The S3 endpoint of an affiliate's bucket down for 30 s while writes go on (issue 15,
point 8): replication status shows that destination failing while it is down and clears once
it has caught up; afterwards the bucket holds every acknowledged user's newest version (0
lost), each opened as the affiliate would, and no copy was logged as sent twice."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from residency.server.deployment import AFFILIATES
from tests.conftest import S3_REGION, Cluster
from tests.faults.tools import Writers, applied_twice, log_entries, report, until
from tests.test_replicator import bucket_object, manifest, open_with_region_key_alone, region_key

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

SG = AFFILIATES[0]
OUTAGE_SECONDS = float(os.environ.get("RESIDENCY_S3_OUTAGE_SECONDS", "30"))


async def test_s3_down_for_30_s_under_writes_then_the_bucket_catches_up_losing_nothing(
    s3_cluster: Cluster, tmp_path: Path
):
    c = s3_cluster
    assert c.s3 is not None
    writers = Writers(c, "s3", n=4, new_users=0.3, pause=0.05)
    writers.start()
    try:
        # Warm up under load first: SeaweedFS grows a bucket's volumes during its first
        # seconds of writes, a stall of its own that is not what this test measures.
        await until(lambda: len(writers.acked) >= 30, 60, "30 users written")
        await c.replicated(timeout=120)
        before = (await c.replication())[S3_REGION]
        assert not before.last_error, before.last_error

        await asyncio.to_thread(c.s3.stop)
        end = time.monotonic() + OUTAGE_SECONDS
        shown: list[tuple[int, str]] = []  # (pending, last error) while the endpoint was down
        sg_lag = 0.0
        while time.monotonic() < end:  # the outage: writes go on; status is read meanwhile
            s = await c.replication()
            shown.append((s[S3_REGION].pending, s[S3_REGION].last_error))
            sg_lag = max(sg_lag, s[SG].lag_seconds)
            await asyncio.sleep(0.5)
        t_restart = time.monotonic()
        await asyncio.to_thread(c.s3.start)
        t_back = time.monotonic()
        await asyncio.sleep(2.0)  # writes go on a little after the endpoint is back, too
        await writers.stop()
    finally:
        await writers.close()
    await c.replicated(timeout=180)
    catch_up = time.monotonic() - t_back
    after = (await c.replication())[S3_REGION]

    # Status told the truth: failing (an error, copies pending) while down, clear after.
    failing = [(p, e) for p, e in shown if p > 0 and e]
    assert failing, f"status never showed {S3_REGION} failing while its endpoint was down: {shown[-3:]}"
    assert failing == shown[shown.index(failing[0]) :], "status cleared while the endpoint was down"
    assert not after.last_error and after.pending == 0, after
    # Nothing acknowledged is lost: each user's newest version is in the bucket (and at the
    # region node), opened with the region's key as the affiliate would.
    m, key = manifest(c), region_key(c, S3_REGION)
    lost = []
    for user, (version, fields) in writers.acked.items():
        body = await asyncio.to_thread(bucket_object, c, user)
        got = open_with_region_key_alone(body, m, key) if body is not None else (0, {})
        if got[0] != version or (await c.held(user, SG)).record.version != version:
            lost.append(user)
            continue
        assert got[1]["email"] == fields["email"], user
    # Each copy is logged as sent to the bucket once (a batch retried through the outage is
    # logged when it lands, not at every try).
    duplicates, backwards = applied_twice(await log_entries(c), S3_REGION)
    report(
        tmp_path,
        "s3_outage",
        {
            "outage_seconds": OUTAGE_SECONDS,
            "writes_acknowledged": writers.writes,
            "users": len(writers.acked),
            "refused_writes": len(writers.refused),
            "lost": len(lost),
            "duplicate_applications": duplicates,
            "status_failing_samples": f"{len(failing)}/{len(shown)}",
            "last_error_shown": failing[-1][1][:120],
            "other_region_worst_lag_seconds": round(sg_lag, 1),
            "endpoint_restart_seconds": round(t_back - t_restart, 1),
            "catch_up_seconds": round(catch_up, 1),
        },
    )
    assert not lost and not duplicates and not backwards, (lost[:5], backwards[:5])
    assert not writers.refused, writers.refused[:3]  # the primary took every write meanwhile
