"""A replication worker's metrics: the leases it holds (`residency_replication_lease_held`),
beside the batch steps the loop times (`residency_replication_batch_seconds`). A node serves
its in-process worker's with its own on `metrics.listen`; a standalone worker serves them,
with the rest of its process's (key-provider calls, its store's transactions), on
`residency replicate --metrics-listen HOST:PORT`: both over mutual TLS. Lag, pending
changes and dead letters per destination come from the store: the primary's nodes serve
those."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from residency.replicator.loop import Replicator


class Leases(Collector):
    """Which destinations' leases this worker holds now (1) or not (0): held as last renewed
    and not yet expired by this worker's clock (as `Lease.check` trusts it)."""

    def __init__(self, replicator: Replicator):
        self.replicator = replicator

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "residency_replication_lease_held",
            "1 while this worker holds the destination's lease (it ships there)",
            labels=["destination"],
        )
        now = time.monotonic()
        for region, lease in sorted(self.replicator.leases.items()):
            held.add_metric([region], 1.0 if lease.held and now < lease.until else 0.0)
        yield held
