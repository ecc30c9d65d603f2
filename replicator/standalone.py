"""`residency replicate --config FILE`: a replication worker in its own process.

It opens the primary's store (same config file, same host: SQLite in WAL mode is shared
between processes), and ships to its fair share of the destinations, taken by lease
(`spread`: live workers share them evenly). Run as many as you like beside the primary
(set `replicator.enabled: false` there to leave all shipping to them; `--region R` limits
a worker to some destinations, e.g. one process for a slow S3 bucket); a worker that dies
is replaced once its leases expire. SIGTERM/SIGINT hands its leases over at once and
exits 0. `--metrics-listen HOST:PORT` serves its metrics (`metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from residency.replicator.destinations import destinations_for
from residency.replicator.loop import Replicator
from residency.server.config.node import NodeConfig
from residency.server.config.rules import load_rules, rules_from_bytes
from residency.server.config.schema import load_schema
from residency.server.core.errors import ConfigError, KeysBehind
from residency.server.core.schema import Schema
from residency.server.keys.hashkey import load_hash_keys
from residency.server.keys.keyring import Keyring
from residency.server.keys.providers import open_provider
from residency.server.storage.notices import hear
from residency.server.storage.postgres import PostgresStore
from residency.server.storage.running import hold_running
from residency.server.storage.stores import open_store
from residency.server.storage.thread import StoreThread
from residency.server.vault.key_events import KeyEvents
from residency.server.vault.records import Records
from residency.server.vault.shared_rules import SharedRules, rules_at_start

log = logging.getLogger("residency.replicator")


async def run_worker(
    c: NodeConfig,
    regions: list[str] | None = None,
    serve_metrics: Callable[[Replicator], Callable[[], None]] | None = None,
    reread: Callable[[], None] | None = None,
) -> None:
    """Ships the primary's outbox until SIGTERM; `serve_metrics` (the command's: `--metrics-
    listen`) serves the process's metrics with the worker's leases and returns its stop;
    `reread` runs on SIGHUP (the metrics port's certificate and revocation list)."""
    if not c.is_primary or not c.affiliates:
        raise ConfigError(f"{c.path}: a replicator needs the primary's config, with 'affiliates'")
    schema = load_schema(c.schema)
    rules = load_rules(c.rules, schema)
    # It opens the node's keys: key commands for a stopped node wait until it ends.
    running = hold_running(c.data_dir)
    store = open_store(c)
    if isinstance(store, PostgresStore):  # the rules the front ends of the store run
        rules = rules_at_start(store, c, schema, rules)
    keyring = Keyring(c.region, open_provider(c.keys), c.keys_dir, c.keys.cache_entries, c.keys.cache_seconds)
    records = Records(
        c.region, True, schema, rules, keyring, store, hash_keys=load_hash_keys(c.keys_dir, c.keys)
    )
    db = StoreThread(store)
    db.start()
    replicator = Replicator(
        records,
        db,
        destinations_for(c, regions),
        c.replicator,
        all_regions=[a.region for a in c.affiliates],
        tls=c.tls,
    )
    # Before any lease is taken: a worker that cannot serve its metrics stops holding nothing.
    stop_metrics = serve_metrics(replicator) if serve_metrics else None
    tasks: list[asyncio.Task] = []
    # A key shred made through the node (or another front end) reaches this process's keys too.
    key_events = KeyEvents(c.region, True, c.keys_dir, records, db, replicator.forget)
    try:
        await key_events.apply()
        await replicator.start()
        tasks.append(asyncio.create_task(_follow_key_events(key_events), name="follow-key-events"))
        if not isinstance(store, PostgresStore):  # SQLite: the node's rules file
            tasks.append(asyncio.create_task(_follow_rules(c, records, schema), name="follow-rules"))
            replicator.follow_rules = _store_rules(db, records, schema)  # and no batch under older
        else:  # the rules the store holds, and a change any front end applies, at once; a
            # rules file edited on this host changes nothing (it was never applied, nor logged)
            shared = SharedRules(c, schema, records, db, asyncio.Lock())
            replicator.follow_rules = shared.follow  # no batch made under older rules is shipped
            handlers: dict[str, Callable[[str], Awaitable[None]]] = {
                "rules": lambda _: shared.follow(),
                "keys": lambda _: key_events.apply(),
                "erasure": key_events.keys_changed_elsewhere,
            }
            tasks.append(asyncio.create_task(hear(c.store, store.token, handlers)))
        log.info("replicator %s started for %s", replicator.owner, ", ".join(replicator.destinations))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP rereads what it can, and never ends the worker (its default would).
        loop.add_signal_handler(signal.SIGHUP, reread or (lambda: log.info("SIGHUP: nothing to reread")))
        await stop.wait()
        log.info("replicator %s stopping", replicator.owner)
    finally:  # stopped, or failed: its leases handed over, its metrics no longer served
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await replicator.stop()
        finally:
            if stop_metrics is not None:
                stop_metrics()
            await db.drain()
            store.close()
            os.close(running)


async def _follow_key_events(key_events: KeyEvents, every: float = 1.0) -> None:
    """The node's key events (`keyring.json`), read every `every` seconds: a shred made
    through the node stops this worker opening records within that (on PostgreSQL its notice
    comes first); a file it cannot read is tried again."""
    while True:
        await asyncio.sleep(every)
        try:
            await key_events.apply()
        except KeysBehind:
            pass  # said once, when it began; nothing opens meanwhile
        except Exception as e:
            log.warning("key events not read: %s", e)


def _store_rules(db: StoreThread[Any], records: Records, schema: Schema) -> Callable[[], Awaitable[None]]:
    """On SQLite, what a worker does when a batch's rules are not the store's (`RulesMoved`):
    takes the rules the node last applied, as it keeps them in the store (`SharedRules.share`),
    on the store thread (between two batches' making). Within the second before the rules
    file is seen to change, or for good if the node did not write it, the worker would
    otherwise ship the rules change's re-projection under the rules it replaced."""

    def take() -> None:
        shared = db.store.rules_text()
        if shared is not None and shared[0] != records.rules.version:
            log.info("rules %s -> %s from the store", records.rules.version, shared[0])
            records.rules = rules_from_bytes(shared[1], schema, "the store's rules")

    return lambda: db.call(take)


async def _follow_rules(c: NodeConfig, records: Records, schema: Schema, every: float = 1.0) -> None:
    """The primary swaps rules in its own memory (AdminService.ApplyRules) and, when asked
    to persist them, rewrites the rules file: this worker projects with the file's rules,
    reloaded when it changes (a file that does not load keeps the rules in force)."""
    seen = c.rules.stat().st_mtime_ns
    while True:
        await asyncio.sleep(every)
        try:
            mtime = c.rules.stat().st_mtime_ns
            if mtime == seen:
                continue
            seen = mtime
            new = load_rules(c.rules, schema)
        except Exception as e:
            log.warning("rules file %s not reloaded: %s", c.rules, e)
            continue
        if new.version != records.rules.version:
            log.info("rules %s -> %s from %s", records.rules.version, new.version, c.rules)
            records.rules = new
