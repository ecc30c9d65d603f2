"""Archive of the transfer log in an S3 bucket: sealed segments and their checkpoints.

A segment is every entry from the last archived tree size up to a new signed checkpoint,
as canonical JSON lines (the exported bytes). Once uploaded it never changes: it is sealed by
the checkpoint uploaded beside it, and where the bucket supports S3 Object Lock both objects
are kept in COMPLIANCE mode until their retention ends, so even the archive's owner cannot
rewrite history. Keys:

    PREFIX/ORIGIN/segments/FIRSTINDEX-ENDINDEX.jsonl   leaf indexes [first, end)
    PREFIX/ORIGIN/checkpoints/TREESIZE                  the signed note
    PREFIX/ORIGIN/log.pub                               the verifier key

Concatenating the segments in order gives `entries.jsonl` of an export; with the last
checkpoint and log.pub it verifies with `residency log verify`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from residency.server.config.node import ArchiveConfig
from residency.server.storage.database import UnitOfWork
from residency.server.storage.thread import StoreThread
from residency.server.vault.transferlog import TransferLog

log = logging.getLogger("residency.archive")


@dataclass(frozen=True)
class Segment:
    first: int  # leaf index of the first entry
    end: int  # tree size after the last entry
    body: bytes
    checkpoint: str


class Bucket(Protocol):
    """Where sealed segments go. `S3Bucket` is the implementation."""

    def put(self, key: str, body: bytes, retain_until: dt.datetime | None) -> None: ...


class S3Bucket:
    """An S3 bucket through boto3 (blocking: call it from an executor)."""

    def __init__(self, config: ArchiveConfig):
        import boto3
        from botocore.config import Config

        self.name = config.bucket
        # A session of its own: boto3's default session keeps the credentials it resolved
        # first, so a later change of the environment (or of the process's identity) is missed.
        self._s3: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
        )
        self.object_lock = False

    def ensure(self) -> None:
        """Creates the bucket with Object Lock if it is missing, and notes whether the server
        enforces Object Lock on it (not every S3 server does)."""
        from botocore.exceptions import ClientError

        try:
            self._s3.head_bucket(Bucket=self.name)
        except ClientError:
            try:
                self._s3.create_bucket(Bucket=self.name, ObjectLockEnabledForBucket=True)
            except ClientError:
                self._s3.create_bucket(Bucket=self.name)
        try:
            conf = self._s3.get_object_lock_configuration(Bucket=self.name)
            self.object_lock = conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except ClientError:
            self.object_lock = False
        if not self.object_lock:
            log.warning(
                "bucket %s has no Object Lock: archived segments rely on bucket policy alone", self.name
            )

    def put(self, key: str, body: bytes, retain_until: dt.datetime | None) -> None:
        extra: dict[str, Any] = {}
        if retain_until is not None and self.object_lock:
            extra = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": retain_until}
        self._s3.put_object(Bucket=self.name, Key=key, Body=body, **extra)

    def get(self, key: str) -> bytes:
        return self._s3.get_object(Bucket=self.name, Key=key)["Body"].read()

    def keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def retention(self, key: str) -> tuple[str | None, dt.datetime | None]:
        head = self._s3.head_object(Bucket=self.name, Key=key)
        return head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")


def segment_key(prefix: str, origin: str, first: int, end: int) -> str:
    return f"{prefix}/{origin}/segments/{first:012d}-{end:012d}.jsonl"


def checkpoint_key(prefix: str, origin: str, size: int) -> str:
    return f"{prefix}/{origin}/checkpoints/{size:012d}"


def next_segment(tlog: TransferLog) -> Segment | None:
    """On the store thread: signs a checkpoint and cuts the entries it adds since the last
    archived size into a segment, or None when nothing new is there."""
    done = tlog.store.archived_size()
    cp = tlog.checkpoint(refresh=True)
    if cp.size <= done:
        return None
    body = b"".join(e.data + b"\n" for e in tlog.entries(after=done, upto=cp.size))
    return Segment(done, cp.size, body, cp.note)


def upload(bucket: Bucket, config: ArchiveConfig, origin: str, verifier_key: str, seg: Segment) -> None:
    """Off the store thread: the segment first, then the checkpoint that seals it, so a
    checkpoint in the bucket always has every entry it covers there already."""
    until = None
    if config.retention_days:
        until = dt.datetime.now(dt.UTC) + dt.timedelta(days=config.retention_days)
    bucket.put(segment_key(config.prefix, origin, seg.first, seg.end), seg.body, until)
    bucket.put(checkpoint_key(config.prefix, origin, seg.end), seg.checkpoint.encode(), until)
    bucket.put(f"{config.prefix}/{origin}/log.pub", (verifier_key + "\n").encode(), None)


class Archiver:
    """Uploads a sealed segment every `interval_seconds` when the log grew."""

    def __init__(
        self, db: StoreThread[UnitOfWork], tlog: TransferLog, bucket: S3Bucket, config: ArchiveConfig
    ):
        self.db = db
        self.tlog = tlog
        self.bucket = bucket
        self.config = config
        self._pool: Any = None

    async def run_once(self) -> Segment | None:
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")
            await loop.run_in_executor(self._pool, self.bucket.ensure)
        seg = await self.db.call(next_segment, self.tlog)
        if seg is None:
            return None
        origin, key = self.tlog.origin, self.tlog.verifier_key
        await loop.run_in_executor(self._pool, upload, self.bucket, self.config, origin, key, seg)
        await self.db.call(self.tlog.store.archive_mark, seg.end)
        log.info("archived transfer-log entries %d to %d", seg.first, seg.end - 1)
        return seg

    async def run(self) -> None:
        import asyncio

        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the next round retries; nothing is marked archived
                log.warning("archiving the transfer log failed (%s); retrying", type(e).__name__)
            await asyncio.sleep(self.config.interval_seconds)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
