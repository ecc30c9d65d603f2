"""Opens the store a node config names: `SqliteStore` in its data folder (the default) or
`PostgresStore` on its `store.dsn`."""

from __future__ import annotations

from typing import TypeAlias

from residency.server.config.node import NodeConfig
from residency.server.storage.postgres import PostgresStore
from residency.server.storage.sqlite import SqliteStore

Store: TypeAlias = SqliteStore | PostgresStore


def open_store(c: NodeConfig, crash_after: str = "") -> Store:
    if c.store.kind == "postgres":
        return PostgresStore(
            c.store.dsn,
            crash_after=crash_after,
            connect_timeout=c.store.connect_timeout,
            notices=c.store.notices,
        )
    return SqliteStore(c.data_dir / "node.db", durability=c.durability, crash_after=crash_after)
