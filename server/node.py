"""Assembles a node from its config and serves it until SIGTERM or SIGINT, then drains."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from residency.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    records_pb2,
    records_pb2_grpc,
    replica_pb2,
    replica_pb2_grpc,
    translog_pb2,
    translog_pb2_grpc,
)
from server.config import DURABILITY, NodeConfig
from server.crypto import RecipientKey, RegionKey
from server.errors import ConfigError
from server.records import Records
from server.rules import load_rules
from server.schema import load_schema
from server.services import AdminService, Node, RecordService, ReplicaService, TransferLogService
from server.store import SqliteStore
from server.writer import StoreThread

log = logging.getLogger("residency.node")
GRACE_SECONDS = 10.0
SERVICES = [
    records_pb2.DESCRIPTOR.services_by_name["RecordService"].full_name,
    replica_pb2.DESCRIPTOR.services_by_name["ReplicaService"].full_name,
    translog_pb2.DESCRIPTOR.services_by_name["TransferLogService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
]


class RunningNode:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.replicator = None
        self.db: StoreThread | None = None
        self.health = health.aio.HealthServicer()

    async def start(self) -> None:
        c = self.config
        schema = load_schema(c.schema)
        rules = load_rules(c.rules, schema)
        if c.region not in rules.regions:
            raise ConfigError(
                f"{c.path}: 'region' {c.region!r} is not in {c.rules} (regions: {sorted(rules.regions)})"
            )
        key = RegionKey.load(c.region, c.keys_dir)
        store = SqliteStore(c.data_dir / "node.db", synchronous=DURABILITY[c.durability])
        # The outbox is written whenever there are destinations, even with the in-process
        # replicator off: a standalone `residency replicate` worker then reads it.
        outbox = c.is_primary and bool(c.affiliates)
        records = Records(c.region, c.is_primary, schema, rules, key, store, outbox=outbox)
        for a in c.affiliates:
            RecipientKey.load(a.region, a.public_key)  # a missing key fails at start
        self.db = StoreThread(store)
        self.db.start()
        if outbox and c.replicator.enabled:
            from replicator.worker import Replicator, destinations_for

            # A stable owner: a node restarted after a crash takes its own leases back at once
            # instead of waiting for them to expire (two nodes on one config cannot both run:
            # they would share a listen address).
            owner = f"{socket.gethostname()}:serve:{c.region}"
            self.replicator = Replicator(records, self.db, destinations_for(c), c.replicator, owner=owner)
            await self.replicator.start()
        node = Node(records, self.db, self.replicator, c.affiliates)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        records_pb2_grpc.add_RecordServiceServicer_to_server(RecordService(node), server)
        replica_pb2_grpc.add_ReplicaServiceServicer_to_server(ReplicaService(node), server)
        translog_pb2_grpc.add_TransferLogServiceServicer_to_server(TransferLogService(node), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(node, c.role), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self.port = server.add_insecure_port(c.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {c.listen}")
        await server.start()
        self.server = server
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s node for %s listening on %s", c.role, c.region, c.listen)

    async def stop(self) -> None:
        """Refuses new calls, lets in-flight calls finish, then flushes and closes the store."""
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(GRACE_SECONDS)
        if self.replicator is not None:
            await self.replicator.stop()
        if self.db is not None:
            await self.db.drain()
            self.db.store.close()


async def serve(config: NodeConfig) -> None:
    node = RunningNode(config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight calls")
    await node.stop()
