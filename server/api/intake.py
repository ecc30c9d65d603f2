"""Checking the records a client sends, before anything is written: every record of a
request validated against the schema (all violations at once), and each record's fields
serialized as they will be sealed.

For a large `PutRecords` this is most of the request's CPU time in the node: a Python object
per field value. One Python process runs Python on one core at a time, so a large request
is checked in a helper process, the node's own child, while the node's process serves gRPC
and writes the batch before it. The helper gets the request's bytes and returns the writes
or the violations; it keeps nothing and writes nothing. Small requests are checked
in-process: a round trip to a helper costs more than they do.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from residency.server.core import codec
from residency.server.core.lookup import forms
from residency.server.core.schema import Schema
from residency.v1 import common_pb2, records_pb2

log = logging.getLogger("residency.intake")

# A request this large (a few hundred 10-field records) is checked by a helper.
MIN_OFFLOAD_BYTES = 64 * 1024
# Record fields that are not sealed with the record's fields.
_META = ("user_id", "version", "source", "home_region", "created_at", "updated_at")


@dataclass(slots=True)
class Checked:
    """A request's records, checked: the writes, or the violations."""

    # (user_id, source, serialized Record holding only the fields, the cookie fields it gives,
    # its lookup fields' normalised forms, `core.lookup.forms`, if asked for).
    writes: list[tuple[str, str, bytes, tuple[str, ...], tuple[tuple[str, str], ...] | None]] = field(
        default_factory=list
    )
    # (field path, description), one per offending field.
    bad: list[tuple[str, str]] = field(default_factory=list)
    # Indices into `writes` of those with credential fields, still in plaintext: the node
    # hashes them before anything else sees them.
    secrets: list[int] = field(default_factory=list)


@dataclass(slots=True)
class CheckedRequest:
    """A `PutRecordsRequest` read from its bytes and checked."""

    context: common_pb2.CallContext
    count: int
    checked: Checked


def check_records(schema: Schema, region: str, records: Any, path: str, with_forms: bool = False) -> Checked:
    """Validates `records` (Record messages; their metadata fields are cleared on the way).
    `path` names a record in a violation, with `{i}` for its index. `with_forms`: also each
    write's lookup forms (a bulk request's, in a helper process: measured, normalising on the
    event loop instead of the store thread made single writes 3 to 6 % slower)."""
    out = Checked()
    credential, cookie = schema.credential_fields, schema.cookie_fields
    lookup = schema.lookup_fields if with_forms else None
    from_value = codec.from_value
    for i, r in enumerate(records):
        fields = r.fields
        # Keys then lookups: a message map's items() iterates in Python, about 1 µs a record more.
        names = tuple(fields)
        try:
            values = [(n, from_value(fields[n])) for n in names]
        except ValueError:  # a timestamp outside 0001-9999: rare, so looked for only now
            values = [(n, _readable(fields[n])) for n in names]
        problems = schema.validate(r.user_id, r.source, [(n, v) for n, v in values if v is not _UNREADABLE])
        problems += [(f"fields[{n}]", _UNREADABLE_TIME) for n, v in values if v is _UNREADABLE]
        if r.home_region and r.home_region != region:
            problems.append(("home_region", f"this primary is the home of {region} records"))
        if problems:
            where = path.format(i=i)
            out.bad += [(f"{where}.{f}", d) for f, d in problems]
            continue
        if credential and not credential.isdisjoint(names):
            out.secrets.append(len(out.writes))
        user_id, source = r.user_id, r.source
        for meta in _META:
            r.ClearField(meta)  # what is sealed is the fields alone
        cookies = tuple(cookie.intersection(names)) if cookie else ()
        found = forms(lookup, fields) if lookup is not None else None
        out.writes.append((user_id, source, r.SerializeToString(), cookies, found))
    return out


_UNREADABLE = object()
_UNREADABLE_TIME = "must be a time from 0001-01-01 to 9999-12-31 UTC"


def _readable(value: common_pb2.Value) -> Any:
    try:
        return codec.from_value(value)
    except ValueError:
        return _UNREADABLE


def check_request(schema: Schema, region: str, raw: bytes) -> CheckedRequest:
    """Reads and checks a serialized `PutRecordsRequest`; DecodeError if it is not one."""
    request = records_pb2.PutRecordsRequest.FromString(raw)
    checked = check_records(schema, region, request.records, "records[{i}]", with_forms=True)
    return CheckedRequest(request.context, len(request.records), checked)


# A helper's schema and region, set once when it starts.
_helper: tuple[Schema, str] | None = None


def _start_helper(schema: Schema, region: str) -> None:
    global _helper
    _helper = (schema, region)
    # A helper waits on a pipe the node also holds open: if the node is killed, nothing
    # would ever end the helper. It watches the node instead, and ends with it.
    node = multiprocessing.parent_process()
    if node is not None:
        threading.Thread(target=_end_with, args=(node,), name="watch-node", daemon=True).start()


def _end_with(node: Any) -> None:
    node.join()
    os._exit(0)


def _check_in_helper(raw: bytes) -> tuple[bytes, int, Checked]:
    assert _helper is not None
    done = check_request(*_helper, raw)
    return done.context.SerializeToString(), done.count, done.checked


def _log_when_ready(starting: list[Future]) -> None:
    """Logs once, when every helper of a new pool has answered."""
    lock = threading.Lock()
    logged: list[bool] = []

    def done(_: Future) -> None:
        with lock:
            if logged or not all(f.done() for f in starting):
                return
            logged.append(True)
        if all(f.exception() is None for f in starting):
            pids = ", ".join(str(f.result()) for f in starting)
            log.info("request-checking helper process(es) ready: pid %s", pids)

    for f in starting:
        f.add_done_callback(done)


def default_workers() -> int:
    """One helper per core beyond the first (at most 4): none on one core."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class Intake:
    """Checks `PutRecords` requests in-process, or in `workers` helper processes when they
    are at least `min_bytes` long. Helpers start on the first large request, in the
    background: until they answer, requests are checked in-process, so no request waits for
    a helper to start. A helper that dies is replaced the same way."""

    def __init__(
        self, schema: Schema, region: str, workers: int | None = None, min_bytes: int = MIN_OFFLOAD_BYTES
    ):
        self.schema = schema
        self.region = region
        self.workers = default_workers() if workers is None else workers
        self.min_bytes = min_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._starting: list[Future] = []
        # Requests checked by a helper (for tests and status).
        self.offloaded = 0

    async def check(self, raw: bytes) -> CheckedRequest:
        pool = self._helpers() if self.workers and len(raw) >= self.min_bytes else None
        if pool is not None:
            try:
                context, count, checked = await asyncio.wrap_future(pool.submit(_check_in_helper, raw))
            except BrokenProcessPool:
                log.warning("a request-checking helper died; checking in-process until a new one starts")
                self._pool, self._starting = None, []
            else:
                self.offloaded += 1
                return CheckedRequest(common_pb2.CallContext.FromString(context), count, checked)
        return check_request(self.schema, self.region, raw)

    def _helpers(self) -> ProcessPoolExecutor | None:
        """The helper pool once every helper has answered; None while they start."""
        if self._pool is None:
            # Spawned, not forked: the node has gRPC and store threads running.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_helper,
                initargs=(self.schema, self.region),
            )
            self._starting = [self._pool.submit(os.getpid) for _ in range(self.workers)]
            _log_when_ready(self._starting)
        if self._starting:
            if not all(f.done() for f in self._starting):
                return None
            if any(f.exception() for f in self._starting):
                log.warning("request-checking helpers did not start; checking in-process")
                self.close()
                self.workers = 0
                return None
            self._starting = []
        return self._pool

    def wait_ready(self, timeout: float = 60.0) -> list[int]:
        """Starts the helpers and waits until they answer; returns their process ids (none
        without helpers)."""
        if not self.workers:
            return []
        self._helpers()
        pids = [f.result(timeout) for f in self._starting]
        self._helpers()
        return pids

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._starting = None, []
