"""Benchmark: the transfer log. Prints one JSON line with
- appends/s into the store (SQLite WAL, synchronous=FULL as `residency init` configures it):
  entries per transaction as the replicator commits them (`--batch`), and one per transaction
  as a cross-location read commits its entry;
- `residency log verify` time for a bundle of `--entries` entries (default 1,000,000):
  leaf hashes, locator check, tree root, checkpoint signature;
- inclusion-proof time (mean over 10,000 random leaves) and size at that tree size.
Targets: >= 20,000 appends/s; verify 1M entries <= 10 s; proof <= 1 ms and <= 32 hashes.

With `--startup 1000000,10000000` it measures instead a node store's start-up at each size
(issue 17.7): a store of that many entries, with its tiles and a checkpoint over them, written
straight into SQLite (`--stores DIR` keeps them for the next run), then opened `--runs` times
in a fresh process that reads the tree's root and 1,000 inclusion proofs: seconds to open
and to the first root, and resident memory (peak, and above the interpreter with the code
imported). `--code CHECKOUT` opens them with another checkout's code (main's, for "before").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from residency.server.core import merkle, translog  # noqa: E402
from residency.server.core.checkpoint import Checkpoint, LogSigner  # noqa: E402
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


def build_store(path: Path, n: int) -> None:
    """`n` replication entries of the typical size, chained, their tiles and a checkpoint over
    them, written with executemany in transactions of 100,000 (progress on stderr)."""
    SqliteStore(path).close()  # the schema, as a node makes it
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    # One entry's canonical bytes as a format, for the subject and sequence each entry changes.
    template = translog.canonical({**entry(0), "time": time.time(), "sequence": 777777777777})
    subject_first = template.index(b"user-00000000") < template.index(b"777777777777")
    fmt = (
        template.replace(b"%", b"%%").replace(b"user-00000000", b"user-%08d").replace(b"777777777777", b"%d")
    )
    edge, head, step = merkle.TileEdge(), translog.GENESIS, 100_000
    for start in range(0, n, step):
        rows = []
        for seq in range(start + 1, min(start + step, n) + 1):
            data = fmt % ((seq - 1, seq) if subject_first else (seq, seq - 1))
            head = translog.chain_hash(head, data)
            rows.append((seq, data, head))
        tiles = edge.extend([merkle.leaf_hash(data) for _, data, _ in rows])
        db.execute("BEGIN")
        db.executemany("INSERT INTO translog (sequence, entry, chain) VALUES (?,?,?)", rows)
        db.executemany("INSERT OR REPLACE INTO log_tiles (level, idx, hashes) VALUES (?,?,?)", tiles)
        db.execute("COMMIT")
        print(f"building {path.name}: {start + len(rows):,} of {n:,} entries", file=sys.stderr)
    tree = merkle.TileTree(edge, lambda level, index: b"")  # a root reads the right edge only
    note = LogSigner.new("residency/cn-north").sign(Checkpoint("residency/cn-north", n, tree.root()))
    db.execute("INSERT INTO checkpoints (tree_size, note, created_at) VALUES (?,?,?)", (n, note, time.time()))
    db.close()


# Run in a fresh interpreter per start: what a node's start pays, from its imports on.
_CHILD = """
import json, random, sys, time
from residency.server.storage.sqlite import SqliteStore

def peak_mib():  # VmHWM: this process's peak since exec (ru_maxrss keeps the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = peak_mib()
start = time.perf_counter()
store = SqliteStore(sys.argv[1])
opened = time.perf_counter() - start
tree = store.log_tree()
root = tree.root()
first_root = time.perf_counter() - start
n = tree.size
picks = [random.randrange(n) for _ in range(1000)]
t = time.perf_counter()
for i in picks:
    tree.inclusion_proof(i, n)
proof_ms = (time.perf_counter() - t) / len(picks) * 1000
peak = peak_mib()
print(json.dumps({"open_s": opened, "first_root_s": first_root, "proof_ms": proof_ms, "rss_mib": peak,
                  "rss_above_imports_mib": peak - base, "size": n}))
"""


def code_path(checkout: Path, into: Path) -> Path:
    """An import root where `residency` is `checkout`'s code, mapped as pyproject's
    `package-dir` maps it (protos/residency, with server/, replicator/ and cli/ inside)."""
    pkg = into / "residency"
    pkg.mkdir(parents=True)
    for item in (checkout / "protos" / "residency").iterdir():
        (pkg / item.name).symlink_to(item)
    for sub, name in (("server", "server"), ("replicator", "replicator"), ("cli", "cli")):
        (pkg / name).symlink_to(checkout / sub)
    return into


def startup(sizes: list[int], runs: int, stores: Path, code: Path | None) -> dict:
    out: dict = {"code": str(code) if code else "this checkout", "runs": runs, "sizes": {}}
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if code is not None:
            env["PYTHONPATH"] = str(code_path(code.resolve(), Path(tmp)))
        for n in sizes:
            path = stores / f"log-{n}.db"
            if not path.exists():
                build_store(path, n)
            samples = []
            for r in range(runs):
                # Another checkout must not see this one's tiles as its own: a copy per run
                # would cost minutes at 10M, so open the same file; neither writes to it.
                child = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(path)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                samples.append(json.loads(child.stdout))
                print(f"start-up {n:,} run {r + 1}: {samples[-1]}", file=sys.stderr)
            out["sizes"][n] = {
                k: {
                    "median": round(statistics.median(s[k] for s in samples), 3),
                    "min": round(min(s[k] for s in samples), 3),
                    "max": round(max(s[k] for s in samples), 3),
                }
                for k in ("open_s", "first_root_s", "proof_ms", "rss_mib", "rss_above_imports_mib")
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--entries", type=int, default=1_000_000, help="tree size for verify and proofs")
    p.add_argument("--appends", type=int, default=200_000, help="entries to append when timing appends")
    p.add_argument("--batch", type=int, default=500, help="entries per transaction (replicator batch)")
    p.add_argument("--startup", default="", help="comma-separated log sizes: measure start-up only")
    p.add_argument("--runs", type=int, default=3, help="start-ups per size")
    p.add_argument("--stores", type=Path, help="folder for the start-up stores (kept; default: temporary)")
    p.add_argument("--code", type=Path, help="a checkout whose code opens the stores (default: this one)")
    args = p.parse_args()
    if args.startup:
        sizes = [int(x) for x in args.startup.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            stores = args.stores or Path(tmp)
            stores.mkdir(parents=True, exist_ok=True)
            print(json.dumps({"startup": startup(sizes, args.runs, stores, args.code)}))
        return
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
