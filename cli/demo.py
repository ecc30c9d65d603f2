"""`residency demo`: a primary and two affiliate region nodes on loopback, synthetic users
covering every field of the example schema, replication awaited, a per-region report."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from residency.cli.channel import Credentials
from residency.cli.client import Client
from residency.server.config.node import load_config
from residency.server.core import codec
from residency.server.deployment import (
    AFFILIATES,
    PRIMARY,
    check_running,
    init_deployment,
    issue_once,
    start_node,
)
from residency.v1 import common_pb2, consent_pb2, disclosure_pb2, records_pb2

BATCH = 500


def synthetic_user(i: int, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """(user id, source, fields): every field appears across users; passwords on one user in
    fifty (each costs a 40 ms scrypt hash), violation records on one in twenty, cookie ids
    on the nine in ten who accepted cookies."""
    first = rng.choice(["Li", "Wang", "Zhang", "Liu", "Chen", "Yang", "Zhao", "Huang"])
    given = rng.choice(["Wei", "Fang", "Na", "Min", "Jing", "Lei", "Yan", "Tao"])
    visit = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(86400 * 26))
    fields: dict[str, Any] = {
        "name": f"{first} {given}",
        "phone": f"+86 13{rng.randrange(10**9):09d}",
        "email": f"user{i}@example.cn",
        "address": f"{rng.randrange(1, 999)} Changan Avenue, Beijing",
        "national_id": f"{rng.randrange(10**17):017d}{rng.choice('0123456789X')}",
        "ip_address": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        "browser_type": rng.choice(["Chrome 142", "Firefox 145", "Safari 19", "Edge 142"]),
        "language": rng.choice(["zh-CN", "en-SG", "en-IE", "zh-TW"]),
        "visit_time": visit,
        "hardware_software": rng.choice(["Android 16; Pixel 10", "iOS 26; iPhone 17", "Windows 11; x64"]),
        "pages_visited": [f"/item/{rng.randrange(10**6)}" for _ in range(rng.randrange(1, 6))],
        "search_keywords": rng.sample(["phone case", "tea", "bicycle", "lamp", "jacket", "book"], 2),
        "published_content": f"Review #{i}: works as described.",
        "transactions": [f"order-{i}-{n}" for n in range(rng.randrange(1, 4))],
    }
    if i % 10 != 9:  # one user in ten refused cookies (policy 5): no cookie data is collected
        fields["cookie_id"] = f"ck-{rng.randrange(16**16):016x}"
    source = "registration"
    if i % 7 == 0:
        source = "partner:acme-travel"
        fields["partner_profile"] = "frequent traveller; prefers rail"
    if i % 50 == 0:
        fields["password"] = f"pw-{rng.randrange(10**12)}"
    if i % 20 == 0:
        fields["violation_records"] = ["2026-10: spam posting; posting suspended 7 days"]
    return f"user-{i:07d}", source, fields


def credentials(directory: Path, role: str, region: str = PRIMARY) -> Credentials:
    """The demo's client certificate for `role` in `region` (issued once into the deployment's
    pki/: the operator's and the reviewer's are `residency init`'s)."""
    pki = directory / "pki"
    name = role if role in ("operator", "reviewer") else f"{role}-{region}"
    issue_once(pki, role, region, "demo" if role == "service" else role, name)
    return Credentials.files(pki / name, pki / "ca.crt")


class Nodes:
    """The deployment's three `residency serve` processes, started for the demo's run."""

    def __init__(self, directory: Path):
        self.operator = credentials(directory, "operator")
        self.configs = {r: directory / f"{r}.yaml" for r in (PRIMARY, *AFFILIATES)}
        self.addresses = {r: load_config(p).listen for r, p in self.configs.items()}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for region, config in self.configs.items():
            self.procs[region] = start_node(config)

    def _check_running(self) -> None:
        check_running(self.procs, self.configs)

    async def wait_serving(self, deadline: float = 30.0) -> None:
        """Waits until every node reports SERVING; a node that died is reported."""
        end = time.monotonic() + deadline
        for address in self.addresses.values():
            async with Client(address, self.operator, timeout=1.0) as node:
                while True:
                    self._check_running()
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        if await node.serving():
                            break
                    if time.monotonic() > end:
                        raise TimeoutError(f"node at {address} did not start within {deadline:.0f} s")
                    await asyncio.sleep(0.05)

    def stop(self) -> dict[str, int]:
        """Stops every node as an operator would (SIGTERM, then a grace period); their exit codes."""
        codes = {}
        for region, proc in self.procs.items():
            proc.send_signal(signal.SIGTERM)
            try:
                codes[region] = proc.wait(30.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[region] = proc.wait()
        return codes


async def wait_replicated(primary: str, operator: Credentials, timeout: float = 600.0) -> None:
    """Waits, showing progress, until every destination has applied the whole outbox."""
    end = time.monotonic() + timeout
    async with Client(primary, operator, timeout=10) as node:
        bar = None
        while True:
            s = await node.replication_status()
            done = min((d.applied_sequence for d in s.destinations), default=s.head_sequence)
            if bar is None:
                bar = tqdm(total=s.head_sequence, desc="replicating", unit="change", file=sys.stderr)
            bar.total = s.head_sequence
            bar.n = done
            bar.refresh()
            if all(d.pending == 0 and d.applied_sequence >= s.head_sequence for d in s.destinations):
                bar.close()
                return
            if time.monotonic() > end:
                raise TimeoutError(f"replication did not catch up within {timeout:.0f} s")
            await asyncio.sleep(0.1)


def demo_consents(start: int, stop: int) -> list[consent_pb2.Consent]:
    """Cookies accepted by nine users in ten (policy 5); partner marketing through the Irish
    affiliate accepted by one in three (policy 2c)."""
    out = []
    for i in range(start, stop):
        user = f"user-{i:07d}"
        if i % 10 != 9:
            out.append(
                consent_pb2.Consent(
                    user_id=user, purpose="functional.storage", evidence="cookie banner v2: accept"
                )
            )
        if i % 3 == 0:
            out.append(
                consent_pb2.Consent(
                    user_id=user,
                    purpose="marketing.communications",
                    recipient="ie-affiliate",
                    evidence="signup form v3, box 2",
                )
            )
    return out


async def load_users(primary: str, directory: Path, users: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    ctx = common_pb2.CallContext(location=PRIMARY, purpose="essential.service")
    async with Client(primary, credentials(directory, "service"), timeout=120) as node:
        with tqdm(total=users, desc="writing users", unit="user", file=sys.stderr) as bar:
            for start in range(0, users, BATCH):
                await node.grant_consents(ctx, demo_consents(start, min(users, start + BATCH)))
                records = []
                for i in range(start, min(users, start + BATCH)):
                    user_id, source, fields = synthetic_user(i, rng)
                    rec = records_pb2.Record(user_id=user_id, source=source)
                    for name, value in fields.items():
                        rec.fields[name].CopyFrom(codec.to_value(value))
                    records.append(rec)
                await node.put_records(ctx, records)
                bar.update(len(records))


async def sample_reads(primary: str, directory: Path) -> list[str]:
    """Cross-location reads: one allowed in part, one allowed by consent, one refused; each by
    a service whose certificate is of the region it reads from."""
    lines = []
    for user, location, purpose in (
        ("user-0000001", "ap-southeast-1", "essential.service"),
        ("user-0000000", "eu-west-1", "marketing.communications"),  # consented (policy 2c)
        ("user-0000001", "eu-west-1", "marketing.communications"),  # did not consent
    ):
        ctx = common_pb2.CallContext(location=location, purpose=purpose)
        async with Client(primary, credentials(directory, "service", location), timeout=10) as node:
            try:
                r = await node.get_record(ctx, user)
                lines.append(
                    f"  {user} read from {location} for {purpose}: {len(r.record.fields)} fields returned "
                    f"({', '.join(sorted(r.record.fields))}); {len(r.withheld)} withheld; "
                    f"log entry {r.log_sequence}"
                )
            except grpc.aio.AioRpcError as e:
                lines.append(f"  {user} read from {location} for {purpose}: {e.code().name}: {e.details()}")
    return lines


async def sample_disclosure(primary: str, directory: Path) -> list[str]:
    """A disclosure under the two-person rule: the demo's service asks, is refused the fields
    before approval, a second person (the demo's approver certificate) approves, and the
    service receives them."""
    user = "user-0000001"
    ask = disclosure_pb2.RequestDisclosureRequest(
        context=common_pb2.CallContext(purpose="third_party_sharing.legal_obligation"),
        user_id=user,
        third_party="Haidian District Court",
        destination_country="CN",
        ground=disclosure_pb2.DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST,
        reference="(2026) Jing 0108 Min Chu 1234",
    )
    async with Client(primary, credentials(directory, "service"), timeout=10) as service:
        asked = await service.request_disclosure(ask)
        lines = [f"  {user} to Haidian District Court: requested by the service (request {asked.id})"]
        try:
            await service.release_disclosure(asked.id)
        except grpc.aio.AioRpcError as e:
            lines.append(f"  release before approval: {e.code().name}")
        else:
            raise RuntimeError("the primary released a disclosure nobody approved")
        async with Client(primary, credentials(directory, "approver"), timeout=10) as approver:
            seq = await approver.approve_disclosure(asked.id)
        lines.append(f"  approved by a second person, the approver (log entry {seq})")
        given = await service.release_disclosure(asked.id)
    lines.append(
        f"  released to the service: {len(given.fields)} fields, {len(given.withheld)} withheld; "
        f"log entry {given.log_sequence}"
    )
    return lines


async def export_and_verify(primary: str, reviewer: Credentials, out: Path, pinned: Path, keep: bool) -> str:
    """What a reviewer does: export the primary's transfer log and verify it offline against
    the verifier key they were given (`pinned`), not the one the export carries."""
    from residency.server.vault import bundle

    async with Client(primary, reviewer, timeout=120) as node:
        cp, log_entries, leaves = await node.fetch_log()
    bundle.write(out, log_entries, leaves, cp.checkpoint, cp.verifier_key, None)
    v = bundle.verify(out, key=pinned.read_text())
    again = (
        f"; check it yourself: residency log verify {out} --key {pinned}" if keep else " (keep it with --dir)"
    )
    return (
        f"transfer log of {PRIMARY}: {v.checkpoint.size} entries exported and verified offline against "
        f"its signed checkpoint: root {v.checkpoint.root.hex()[:16]}..., signer {v.signer}{again}"
    )


def summarize(entries: list[dict], statuses: dict[str, Any], users: int) -> str:
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"records": 0, "denied": 0, "sent": Counter(), "withheld": Counter(), "why": {}}
    )
    for e in entries:
        if e["kind"] == "erasure" and e["reason"].startswith("withdrawn"):
            per[e["destination_region"]]["denied"] += 1
        if e["kind"] != "replication":
            continue
        p = per[e["destination_region"]]
        p["records"] += 1
        for f in e["fields"]:
            p["sent"][f["name"]] += 1
        for w in e["withheld"]:
            p["withheld"][w["name"]] += 1
            p["why"][w["name"]] = w["reason"]
    out = [f"\n{users} users written to {PRIMARY}; primary transfer log: {len(entries)} entries"]
    for region in AFFILIATES:
        p, s = per[region], statuses[region]
        out.append(f"\n{region}: {s.records} copies held, {s.log_entries} transfer-log entries on the node")
        out.append(f"  replicated: {p['records']} records sent, {p['denied']} with nothing allowed")
        out.append(
            "  transferred: " + (", ".join(f"{n} ({c})" for n, c in sorted(p["sent"].items())) or "nothing")
        )
        out.append(
            "  withheld:    "
            + ", ".join(f"{n} ({c}, {p['why'][n]})" for n, c in sorted(p["withheld"].items()))
        )
        held = dict(s.field_counts)
        stray = sorted(set(held) - set(p["sent"]))
        out.append(
            f"  check: fields held there = fields sent: {'yes' if not stray else 'NO: ' + ', '.join(stray)}"
        )
    return "\n".join(out)


async def _run(directory: Path, users: int, keep: bool = False) -> int:
    nodes = Nodes(directory)
    primary = nodes.addresses[PRIMARY]
    t0 = time.monotonic()
    try:
        nodes.start()
        await nodes.wait_serving()
        print(
            f"started {PRIMARY} (primary) at {primary}, "
            + ", ".join(f"{r} at {nodes.addresses[r]}" for r in AFFILIATES),
            file=sys.stderr,
        )
        t1 = time.monotonic()
        await load_users(primary, directory, users)
        t2 = time.monotonic()
        await wait_replicated(primary, nodes.operator)
        t3 = time.monotonic()
        reads = await sample_reads(primary, directory)
        disclosed = await sample_disclosure(primary, directory)
        reviewer = credentials(directory, "reviewer")
        async with Client(primary, reviewer, timeout=120) as node:
            entries = await node.read_log()
        pinned = directory / "keys" / PRIMARY / "log.pub"
        review = await export_and_verify(primary, reviewer, directory / "review" / PRIMARY, pinned, keep)
        statuses = {}
        for r in AFFILIATES:
            async with Client(nodes.addresses[r], nodes.operator, timeout=60) as node:
                statuses[r] = await node.node_status()
        print(summarize(entries, statuses, users))
        print("\ncross-location reads at the primary:")
        print("\n".join(reads))
        print("\na disclosure (policy 3c) under the two-person rule:")
        print("\n".join(disclosed))
        print(f"\n{review}")
        print(
            f"\ntimes: start {t1 - t0:.1f} s, write {t2 - t1:.1f} s "
            f"({users / max(t2 - t1, 1e-9):,.0f} users/s), "
            f"replication caught up {t3 - t2:.1f} s later"
        )
    finally:
        codes = nodes.stop()
    bad = {r: c for r, c in codes.items() if c != 0}
    if bad:
        print(f"nodes exited with errors: {bad}; see node.log under each data folder", file=sys.stderr)
        return 1
    return 0


def run_demo(users: int = 1000, directory: Path | None = None) -> int:
    if users < 1:
        print("error: --users must be at least 1", file=sys.stderr)
        return 2
    if directory is not None:
        if (directory / f"{PRIMARY}.yaml").exists():
            print(f"using the deployment in {directory}", file=sys.stderr)
        else:
            init_deployment(directory)
        return asyncio.run(_run(directory.resolve(), users, keep=True))
    with tempfile.TemporaryDirectory(prefix="residency-demo-") as tmp:
        init_deployment(tmp)
        return asyncio.run(_run(Path(tmp), users))
