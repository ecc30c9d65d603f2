"""Benchmark: the transfer log. Prints one JSON line with
- appends/s into the store (SQLite WAL, synchronous=FULL as `residency init` configures it):
  entries per transaction as the replicator commits them (`--batch`), and one per transaction
  as a cross-location read commits its entry;
- `residency log verify` time for a bundle of `--entries` entries (default 1,000,000):
  leaf hashes, locator check, tree root, checkpoint signature;
- inclusion-proof time (mean over 10,000 random leaves) and size at that tree size.
Targets: >= 20,000 appends/s; verify 1M entries <= 10 s; proof <= 1 ms and <= 32 hashes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from residency.server.core import merkle, translog  # noqa: E402
from residency.server.core.checkpoint import Checkpoint  # noqa: E402
from residency.server.keys.logkey import create_log_key  # noqa: E402
from residency.server.keys.providers.local import LocalProvider  # noqa: E402
from residency.server.storage.sqlite import SqliteStore  # noqa: E402
from residency.server.vault import bundle  # noqa: E402

FIELDS = [
    {
        "name": n,
        "category": c,
        "rule": "sg-service",
        "legal_basis": "contract",
        "purposes": ["essential.service"],
    }
    for n, c in (
        ("email", "user.contact.email"),
        ("name", "user.name"),
        ("language", "user.demographic.language"),
    )
]
WITHHELD = [{"name": "national_id", "category": "user.government_id", "reason": "never_transfer"}]


def entry(i: int) -> dict:
    """A replication entry of typical size (790 bytes of canonical JSON)."""
    return translog.entry(
        "replication",
        subject=f"user-{i:08d}",
        source_region="cn-north",
        destination_region="ap-southeast-1",
        outcome="allowed",
        actor="replicator:cn-north",
        rules_version="547138eef82bb599",
        recipient="sg-affiliate",
        fields=FIELDS,
        withheld=WITHHELD,
        version=1,
    )


def appends(directory: Path, total: int, batch: int) -> tuple[float, float]:
    """(entries/s by the wall clock, CPU µs per entry): on a shared machine the CPU figure
    is the steadier one; the wall clock also pays the fsync per transaction."""
    store = SqliteStore(directory / f"append-{batch}.db", durability="full")
    entries = [entry(i) for i in range(batch)]
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(total // batch):
        with store.transaction():
            store.log_append(entries)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    store.close()
    n = (total // batch) * batch
    return n / elapsed, cpu / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--entries", type=int, default=1_000_000, help="tree size for verify and proofs")
    p.add_argument("--appends", type=int, default=200_000, help="entries to append when timing appends")
    p.add_argument("--batch", type=int, default=500, help="entries per transaction (replicator batch)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        batched, cpu_us = appends(d, args.appends, args.batch)
        single, _ = appends(d, min(args.appends, 5_000), 1)

        data = [translog.canonical({**entry(i), "sequence": i + 1}) for i in range(args.entries)]
        leaves = [merkle.leaf_hash(x) for x in data]
        tree = merkle.Tree(leaves)
        signer = create_log_key(
            "residency/cn-north", d / "keys", LocalProvider.create(d / "log-keys", b"bench")
        )
        note = signer.sign(Checkpoint("residency/cn-north", tree.size, tree.root()))
        bundle.write(d / "bundle", data, leaves, note, signer.verifier_key)
        del data, leaves
        start = time.perf_counter()
        verified = bundle.verify(d / "bundle")
        verify_s = time.perf_counter() - start
        assert verified.checkpoint.size == args.entries

        n = tree.size
        picks = [random.randrange(n) for _ in range(10_000)]
        start = time.perf_counter()
        sizes = [len(tree.inclusion_proof(i, n)) for i in picks]
        proof_ms = (time.perf_counter() - start) / len(picks) * 1000
    print(
        json.dumps(
            {
                "appends_per_s": round(batched),
                "append_batch": args.batch,
                "append_cpu_us_per_entry": round(cpu_us, 1),
                "appends_per_s_one_per_transaction": round(single),
                "verify_entries": args.entries,
                "verify_s": round(verify_s, 2),
                "proof_ms_mean": round(proof_ms, 4),
                "proof_hashes_max": max(sizes),
                "tree_size": n,
            }
        )
    )


if __name__ == "__main__":
    main()
