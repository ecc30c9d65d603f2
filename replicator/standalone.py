"""`residency replicate --config FILE`: a replication worker in its own process.

It opens the primary's store (same config file, same host: SQLite in WAL mode is shared
between processes), and ships to every destination whose lease it can take. Run as many as
you like beside the primary (set `replicator.enabled: false` there to leave all shipping
to them); a worker that dies is replaced once its leases expire. SIGTERM/SIGINT hands its
leases over at once and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from replicator.worker import Replicator, destinations_for
from server.config import DURABILITY, NodeConfig
from server.crypto import RegionKey
from server.errors import ConfigError
from server.records import Records
from server.rules import load_rules
from server.schema import load_schema
from server.store import SqliteStore
from server.writer import StoreThread

log = logging.getLogger("residency.replicator")


async def run_worker(c: NodeConfig) -> None:
    if not c.is_primary or not c.affiliates:
        raise ConfigError(f"{c.path}: a replicator needs the primary's config, with 'affiliates'")
    schema = load_schema(c.schema)
    rules = load_rules(c.rules, schema)
    store = SqliteStore(c.data_dir / "node.db", synchronous=DURABILITY[c.durability])
    records = Records(c.region, True, schema, rules, RegionKey.load(c.region, c.keys_dir), store)
    db = StoreThread(store)
    db.start()
    replicator = Replicator(records, db, destinations_for(c), c.replicator)
    await replicator.start()
    log.info("replicator %s started for %s", replicator.owner, ", ".join(replicator.destinations))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("replicator %s stopping", replicator.owner)
    await replicator.stop()
    await db.drain()
    store.close()
