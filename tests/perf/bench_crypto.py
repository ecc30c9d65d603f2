"""Benchmark: the cost of sealing 10-field records, per key provider, with the data-key cache
warm, against encrypting the same fields one call each through OpenBao Transit (what a team
would do without envelope encryption).

Starts its own moto KMS server and `bao server -dev` on ephemeral loopback ports. For each
provider it measures, on the path the primary's write takes:
- `cached`: the user's data key is in the cache; 10 fields sealed with AES-256-GCM, each
  with its associated data (user, field, region, version, key id);
- `new_user`: a new data key, wrapped by the cached wrapping key (no provider call), then
  the 10 fields;
- `provider_call_us`: one call to the provider (a new wrapping key), paid once per cache age.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from residency.server.core.sealing import DataKey, field_aad  # noqa: E402
from residency.server.keys.keyring import Keyring  # noqa: E402
from residency.server.keys.providers.kms import AwsKmsProvider  # noqa: E402
from residency.server.keys.providers.local import LocalProvider  # noqa: E402
from residency.server.keys.providers.openbao import OpenBaoProvider  # noqa: E402
from tests.conftest import BAO_TOKEN, enable_transit, moto_kms, openbao  # noqa: E402

FIELDS = [f"field_{i}" for i in range(10)]
VALUE = b"x" * 40  # a typical serialized field value


def seal_record(dek: DataKey, user: str, version: int) -> list[bytes]:
    return [dek.seal(VALUE, field_aad(user, f, "cn-north", version, "k1", format=2)) for f in FIELDS]


def bench_provider(name: str, provider, records: int, rounds: int) -> dict:
    ring = Keyring("cn-north", provider, "/nonexistent", cache_seconds=3600)
    t = time.perf_counter()
    ring.active_wrapping_key()
    provider_call = time.perf_counter() - t
    users = [f"user-{i}" for i in range(records)]
    for u in users:  # warm: every user's data key in the cache
        ring.data_keys.put(u, DataKey(AESGCM.generate_key(bit_length=256)))
    cached, new = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for u in users:
            seal_record(ring.data_keys.get(u), u, 2)
        cached.append(time.perf_counter() - t)
        t = time.perf_counter()
        for u in users:
            wk = ring.active_wrapping_key()
            raw = AESGCM.generate_key(bit_length=256)
            wk.wrap("cn-north", u, raw)
            seal_record(DataKey(raw), u, 1)
        new.append(time.perf_counter() - t)
    c, n = statistics.median(cached), statistics.median(new)
    return {
        "provider": name,
        "cached_us_per_field": round(c / records / len(FIELDS) * 1e6, 2),
        "cached_records_per_s": round(records / c),
        "new_user_us_per_field": round(n / records / len(FIELDS) * 1e6, 2),
        "new_user_records_per_s": round(records / n),
        "provider_call_us": round(provider_call * 1e6),
    }


def bench_transit_per_field(bao: OpenBaoProvider, records: int) -> dict:
    t = time.perf_counter()
    for i in range(records):
        u = f"user-{i}"
        for f in FIELDS:
            bao.wrap(VALUE, {"user": u, "field": f, "region": "cn-north"})
    dt = time.perf_counter() - t
    return {
        "provider": "openbao-transit-per-field",
        "us_per_field": round(dt / records / len(FIELDS) * 1e6, 1),
        "records_per_s": round(records / dt, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transit-records", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-crypto-"))
    kms, bao = moto_kms(work), openbao(work)
    kms.start()
    bao.start()
    try:
        enable_transit(bao.url)
        local = LocalProvider.create(work / "local", os.urandom(16))
        aws = AwsKmsProvider(
            AwsKmsProvider.create_key("alias/bench", endpoint_url=kms.url), endpoint_url=kms.url
        )
        transit = OpenBaoProvider(bao.url, BAO_TOKEN, "bench")
        transit.ensure_key()
        results = [
            bench_provider(n, p, args.records, args.rounds)
            for n, p in (("local", local), ("aws-kms", aws), ("openbao", transit))
        ]
        baseline = bench_transit_per_field(transit, args.transit_records)
        for r in results:
            r["speedup_vs_transit_per_field"] = round(baseline["us_per_field"] / r["cached_us_per_field"])
        print(
            json.dumps(
                {
                    "fields_per_record": len(FIELDS),
                    "records": args.records,
                    "cpus": os.cpu_count(),
                    "providers": results,
                    "baseline": baseline,
                    "targets": {"cached_us_per_field_max": 5, "speedup_min": 20},
                }
            )
        )
    finally:
        kms.stop()
        bao.stop()


if __name__ == "__main__":
    main()
