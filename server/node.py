"""Assembles a node from its config and serves it until SIGTERM or SIGINT, then drains."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from residency.server.api import tls_floor
from residency.server.api.access import Gate
from residency.server.api.admin import AdminService
from residency.server.api.consent import ConsentService
from residency.server.api.context import Node
from residency.server.api.disclosure import DisclosureService
from residency.server.api.grants import GrantService
from residency.server.api.health import Health
from residency.server.api.intake import Intake
from residency.server.api.metrics import Measure, serve_metrics
from residency.server.api.records import RecordService, add_record_service
from residency.server.api.replica import ReplicaService
from residency.server.api.requests import RequestGuard
from residency.server.api.tls import ServerTls
from residency.server.api.translog import TransferLogService
from residency.server.config.access import load_access
from residency.server.config.node import NodeConfig
from residency.server.config.rules import load_rules, rules_from_bytes
from residency.server.config.schema import load_schema
from residency.server.core.errors import ConfigError
from residency.server.keys import lifecycle
from residency.server.keys.copykey import load_home_key
from residency.server.keys.files import exposed_secret, loose_permissions, write_private
from residency.server.keys.hashkey import load_hash_keys
from residency.server.keys.keyring import Keyring
from residency.server.keys.logkey import open_log_key
from residency.server.keys.providers import open_log_provider, open_provider
from residency.server.keys.region import RecipientKey
from residency.server.storage.notices import Hearing, hear
from residency.server.storage.postgres import PostgresStore
from residency.server.storage.running import hold_running, hold_serving
from residency.server.storage.stores import Store, open_store
from residency.server.storage.thread import StoreThread
from residency.server.vault.copies import Home
from residency.server.vault.key_events import KeyEvents
from residency.server.vault.key_lifecycle import KeyLifecycle
from residency.server.vault.records import Records
from residency.server.vault.reprojection import Reprojection
from residency.server.vault.shared_rules import SharedRules, rules_at_start, rules_refusal
from residency.server.vault.transferlog import TransferLog
from residency.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    consent_pb2,
    consent_pb2_grpc,
    disclosure_pb2,
    disclosure_pb2_grpc,
    records_pb2,
    replica_pb2,
    replica_pb2_grpc,
    translog_pb2,
    translog_pb2_grpc,
)

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from residency.replicator.loop import Replicator

log = logging.getLogger("residency.node")
GRACE_SECONDS = 10.0
SERVICES = [
    records_pb2.DESCRIPTOR.services_by_name["RecordService"].full_name,
    consent_pb2.DESCRIPTOR.services_by_name["ConsentService"].full_name,
    consent_pb2.DESCRIPTOR.services_by_name["GrantService"].full_name,
    disclosure_pb2.DESCRIPTOR.services_by_name["DisclosureService"].full_name,
    replica_pb2.DESCRIPTOR.services_by_name["ReplicaService"].full_name,
    translog_pb2.DESCRIPTOR.services_by_name["TransferLogService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
]


class RunningNode:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.replicator: Replicator | None = None
        self.db: StoreThread[Store] | None = None
        self.health = Health(SERVICES)
        self.transfer_log: TransferLog | None = None
        self._archiver: Any = None
        self.node: Node | None = None
        self._tasks: list[asyncio.Task] = []
        self._reprojection: Reprojection | None = None
        self._rules_lock = asyncio.Lock()
        self._shared: SharedRules | None = None
        self.records: Records | None = None
        self._running: int | None = None
        self._serving: int | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self.hearing = Hearing()  # other front ends' notices (PostgreSQL)
        try:  # unreadable certificates fail at start, naming the file and the key
            self.tls = ServerTls(config.tls)
        except ConfigError as e:
            raise ConfigError(f"{config.path}: {e}") from None

    def _forget(self, user_id: str | None = None) -> None:
        if self.replicator is not None:
            self.replicator.forget(user_id)

    async def start(self) -> None:
        c = self.config
        # Held while it runs, before anything listens: no `keys --config`, no same config twice.
        self._running = hold_running(c.data_dir)
        self._serving = hold_serving(c.data_dir, c.listen, self.health.instance)
        await tls_floor.verify(self.tls.credentials())  # before anything listens or opens
        await self.health.begin()  # alive, not ready, until the checks pass
        schema = load_schema(c.schema)
        rules = load_rules(c.rules, schema)
        access = load_access(c.access)
        if why := rules_refusal(c, rules):
            raise ConfigError(f"{c.path}: {why} ({c.rules})")
        provider = open_provider(c.keys)
        keyring = Keyring(c.region, provider, c.keys_dir, c.keys.cache_entries, c.keys.cache_seconds)
        shredded = lifecycle.shredded_reason(c.region, lifecycle.read_events(c.keys_dir))
        if shredded:  # the node still serves, and says why nothing opens
            keyring.shred(shredded)
        elif not c.is_primary:
            keyring.region_key  # noqa: B018 - a region node fails at start if its key does not open
        signer = open_log_key(c.log_key, c.keys)
        home = None if c.is_primary else Home(rules.home_region, load_home_key(c.home_signing_key or ""))
        if home is not None and c.home_region != rules.home_region:
            raise ConfigError(f"{c.path}: 'home.region' {c.home_region!r} is not the rules' home_region")
        # The fault tests' crash point (`database.CRASH_POINTS`); unset in production.
        crash_after = os.environ.get("RESIDENCY_CRASH_AFTER", "")
        store = open_store(c, crash_after)
        if c.is_primary and isinstance(store, PostgresStore):  # another front end's rules win
            rules = rules_at_start(store, c, schema, rules)
        if crash_after:
            log.warning("fault injection: this node kills itself after the step %r", crash_after)
        # Before serving: what a crash between the two steps of a write or an erasure left.
        orphans = store.drop_orphan_keys()
        log.info("keyring: %d data keys belonged to no record and were destroyed", orphans)
        # The outbox is written with destinations, even with the in-process replicator off.
        outbox = c.is_primary and bool(c.affiliates)
        hash_keys = load_hash_keys(c.keys_dir, c.keys) if c.is_primary else None
        records = Records(c.region, c.is_primary, schema, rules, keyring, store, outbox, hash_keys)
        self.records, records.forget = records, self._forget
        for a in c.affiliates:
            RecipientKey.load(a.region, a.public_key)  # a missing key fails at start
        self.db = StoreThread(store)
        self.db.start()
        key_events = KeyEvents(c.region, c.is_primary, c.keys_dir, records, self.db, self._forget)
        await key_events.apply()  # those made while the node was stopped
        keys = KeyLifecycle(key_events, self.db, open_log_provider(c.keys), c.keys.kem)
        await keys.index.resume()  # a rotation of the index key a stop cut short
        self.transfer_log = TransferLog(store, signer, signer.name)
        if outbox and c.replicator.enabled:
            from residency.replicator.destinations import destinations_for
            from residency.replicator.loop import Replicator

            # A stable owner: a node restarted after a crash takes its own leases back at once
            # (under a new epoch). Front ends sharing a PostgreSQL store have a data_dir each
            # (docs/operators.md): owners of their own even on one host and listen address.
            owner = f"{socket.gethostname()}:serve:{c.region}:{c.listen}:{c.data_dir}"
            self.replicator = Replicator(
                records,
                self.db,
                destinations_for(c, list(c.replicator.regions) or None),
                c.replicator,
                owner=owner,
                all_regions=[a.region for a in c.affiliates],
                tls=c.tls,
            )
            await self.replicator.start()
        node = Node(
            records,
            self.db,
            access,
            self.replicator,
            affiliates=c.affiliates,
            transfer_log=self.transfer_log,
            intake=Intake(schema, c.region, c.check_workers if c.is_primary else 0),
            credentials=c.credentials,
            home=home,
        )
        node.reload_rules = self.apply_rules
        node.tls, node.keys, node.health, node.hearing = self.tls, keys, self.health, self.hearing
        self.node, self.schema = node, schema
        self._tasks.append(asyncio.create_task(self._sweep(), name="policy-sweep"))
        if c.is_primary:  # full verify-limit buckets; rules changed while stopped, a re-projection cut short
            sweep = node.verify_buckets.sweeping(self.db, c.policy_sweep_seconds)
            self._tasks.append(asyncio.create_task(sweep, name="verify-limits-sweep"))
            self._reprojection = Reprojection(self.db, node.policy, node.set_backfill, node.wake)
            self._shared = SharedRules(c, schema, records, self.db, self._rules_lock)
            start = functools.partial(node.policy.rules_at_start, "node")
            text, shared = c.rules.read_bytes(), isinstance(store, PostgresStore)
            self._reprojection.resume(await self._shared.at_start(start, text, shared))
        if isinstance(store, PostgresStore):  # what other front ends change, followed at once
            handlers: dict[str, Callable[[str], Awaitable[None]]] = dict.fromkeys(
                ("erasure", "data-keys"), key_events.keys_changed_elsewhere
            )
            handlers["keys"] = lambda _: key_events.apply()
            if self._shared is not None:
                follow = self._shared.follow
                handlers["rules"] = lambda _: follow()
                if self.replicator is not None:  # and no batch made under older rules is shipped
                    self.replicator.follow_rules = follow
            listening = hear(c.store, store.token, handlers, hearing=self.hearing.use())
            self._tasks.append(asyncio.create_task(listening, name="store-notices"))
        server = grpc.aio.server(
            # Measured outermost: the gate's refusals are calls too.
            interceptors=[Measure(), Gate(self.tls, node), RequestGuard()],
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        add_record_service(RecordService(node), server)
        consent_pb2_grpc.add_ConsentServiceServicer_to_server(ConsentService(node), server)
        consent_pb2_grpc.add_GrantServiceServicer_to_server(GrantService(node), server)
        disclosure_pb2_grpc.add_DisclosureServiceServicer_to_server(DisclosureService(node), server)
        replica_pb2_grpc.add_ReplicaServiceServicer_to_server(ReplicaService(node), server)
        translog_pb2_grpc.add_TransferLogServiceServicer_to_server(TransferLogService(node), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(node, c.role), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection([*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        # Mutual TLS only: there is no plaintext listener.
        self.port = server.add_secure_port(c.listen, self.tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {c.listen}")
        await server.start()
        self.server = server
        store, hearing = self.db.store, self.hearing.problems
        ready = self.health.watch(lambda: self.db.call(store.log_count), keyring, more=hearing)
        self._tasks.append(asyncio.create_task(ready, name="readiness"))
        self._tasks.append(asyncio.create_task(self._sign_checkpoints(), name="checkpoints"))
        if c.metrics_listen:
            more: tuple[Collector, ...] = ()
            if self.replicator is not None:
                from residency.replicator.metrics import Leases

                more = (Leases(self.replicator),)
            self._stop_metrics = serve_metrics(c.metrics_listen, node, c.checkpoint_interval_seconds, more)
        if c.archive is not None:
            from residency.server.vault.archive import Archiver, S3Bucket

            self._archiver = Archiver(self.db, self.transfer_log, S3Bucket(c.archive), c.archive)
            self._tasks.append(asyncio.create_task(self._archiver.run(), name="archive"))
        log.info("%s node for %s listening on %s", c.role, c.region, c.listen)

    async def _sign_checkpoints(self) -> None:
        """Signs a checkpoint every interval in which the log grew (reviewers find a recent one)."""
        assert self.db is not None and self.transfer_log is not None
        tlog = self.transfer_log
        while True:
            try:
                if await self.db.call(tlog.grew_since_checkpoint):
                    cp = await self.db.call(tlog.checkpoint, True)
                    log.info("signed a checkpoint at tree size %d", cp.size)
            except Exception:
                log.exception("signing a checkpoint failed; retrying next interval")
            await asyncio.sleep(self.config.checkpoint_interval_seconds)

    async def apply_rules(
        self, text: bytes, actor: str, persist: bool, source: str = ""
    ) -> tuple[str, str, int]:
        """Validates `text` as the new rule set, swaps it in atomically and logs the change,
        then re-projects every live record in the background (`Reprojection`: each page its own
        short transaction, the progress saved with it). `persist` writes it to the configured file.
        `source`: where the text came from, as its errors name it (default: that file)."""
        assert self.node is not None and self.db is not None
        path = self.config.rules
        new = rules_from_bytes(text, self.schema, source or str(path))
        if why := rules_refusal(self.config, new):  # what the node would not start on
            raise ConfigError(f"{source or self.config.path}: {why}")
        # One change at a time: the file written last is the rule set swapped in last.
        async with self._rules_lock:
            if persist:
                await asyncio.get_running_loop().run_in_executor(None, write_private, path, text)
            assert self._reprojection is not None
            await self._reprojection.stop()  # the new rules' re-projection replaces it
            policy, store = self.node.policy, self.db.store
            shared = self._shared
            assert shared is not None
            try:  # other front ends of a shared store follow what `share` writes
                prev = await policy.swap_rules(self.db, new, actor, lambda: shared.share(new.version, text))
            finally:  # after a failed swap, the saved re-projection goes on
                state = await self.db.call(store.rules_state)
                await self._reprojection.restart(state)
            assert state is not None
        log.info("rules %s -> %s by %s; re-projecting %d records", prev, new.version, actor, state.total)
        return prev, new.version, state.total

    async def _sweep(self) -> None:
        """The primary ends grants past their end and withdraws copies past their retention; a region
        node deletes the fields whose travelling policy lapsed, primary reachable or not."""
        assert self.node is not None and self.db is not None
        policy, db = self.node.policy, self.db
        while True:
            await asyncio.sleep(self.config.policy_sweep_seconds)
            try:
                if self.config.is_primary:
                    changed = await db.write(policy.end_grants) + await db.write(policy.sweep_retention)
                else:
                    after, changed = await db.write(policy.sweep_copies)
                    while after:
                        after, _ = await db.write(functools.partial(policy.sweep_copies, after))
            except Exception:
                log.exception("policy sweep failed; trying again next round")
                continue
            if changed:
                self.node.wake()

    async def reload(self) -> None:
        """SIGHUP: rereads the TLS certificate, key, CA and revocation list, the access policy
        (logged), and on a primary the rules file."""
        self.tls.reload()
        try:
            assert self.node is not None and self.db is not None
            access = self.node.access = load_access(self.config.access)
            db, entry = self.db, access.reread_entry(self.config.region, self.node.records.rules.version)
            await db.write(lambda: db.store.log_append([entry]))
        except ConfigError as e:  # a bad file keeps the running policy
            log.error("access policy reload refused, the node keeps its policy: %s", e)
        if self.config.is_primary:
            await self.reload_from_file()

    async def reload_from_file(self) -> None:
        try:
            text = self.config.rules.read_bytes()
            await self.apply_rules(text, "sighup", persist=False)
        except Exception as e:  # a bad file keeps the running rules
            log.error("rules reload refused: %s", e)

    async def stop(self) -> None:
        """Refuses new calls, lets in-flight calls finish, then flushes and closes the store."""
        if self._reprojection is not None:
            await self._reprojection.stop()
        background = self._tasks
        for t in background:
            t.cancel()
        # Awaited, not only cancelled: none is left writing while the store drains and closes.
        await asyncio.gather(*background, return_exceptions=True)
        await self.health.draining()
        if self.server is not None:
            await self.server.stop(GRACE_SECONDS)
        if self._stop_metrics is not None:
            self._stop_metrics()
        if self.replicator is not None:
            await self.replicator.stop()
        if self._archiver is not None:
            self._archiver.close()
        if self.db is not None:
            await self.db.drain()
            if self.transfer_log is not None:  # the last entries get a checkpoint too
                self.transfer_log.checkpoint(refresh=True)
            self.db.store.close()
        if self.node is not None:
            self.node.intake.close()
            if self.node.keys is not None:
                self.node.keys.log_keys.close()
        for fd in (self._serving, self._running):
            if fd is not None:
                os.close(fd)
        await self.health.close()


async def serve(config: NodeConfig) -> None:
    # Everything the node creates (store, WAL, keyring, keys) is its user's alone.
    os.umask(0o077)
    for problem in loose_permissions(config.data_dir, config.keys_dir):
        log.warning("loose permissions: %s", problem)
    if config.keys.secret_file is not None and (
        why := exposed_secret(config.keys.secret_file, config.keys_dir)
    ):
        log.warning("key provider secret: %s", why)
    node = RunningNode(config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[Any]] = set()  # kept until done, so none is collected half-way

    def reload() -> None:
        task = asyncio.ensure_future(node.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info("stopping: draining in-flight calls")
    await asyncio.gather(*reloads, return_exceptions=True)  # a reload under way finishes first
    await node.stop()
