"""Benchmark: the cost of sealing 10-field records, per key provider, with the data-key cache
warm, against encrypting the same fields through OpenBao Transit: one call per field (what a
team would do without envelope encryption) and Transit used well, `batch_input`.

Starts its own moto KMS server and `bao server -dev` on ephemeral loopback ports. For each
provider it measures, on the path the primary's write takes:
- `cached`: the user's data key is in the cache; 10 fields sealed with AES-256-GCM, each
  with its associated data (user, field, region, version, key id);
- `new_user`: a new data key, wrapped by the cached wrapping key (no provider call), then
  the 10 fields;
- `provider_call_us`: one call to the provider (a new wrapping key), paid once per cache age.

The peer, on the same `bao server -dev` (in memory, plain HTTP on loopback: its best case),
through one keep-alive httpx client, encrypts the same 10-field records:
- `transit_per_call`: one `POST /v1/transit/encrypt/KEY` per field;
- `transit_batch`: `batch_input` of `--batch-size` fields per call (10 records at 100).
What each binds: ours binds user, field, region, record version and key id as AES-GCM
associated data (`field_aad`, format 2). Transit's `associated_data` (AEAD ciphers, Vault
1.13+ and OpenBao) binds the same bytes the same way, so both Transit figures send our
`field_aad` on a key of `aes256-gcm96` without derivation. Transit's other binding, `context`,
needs a `derived` key and derives a key per item (HKDF): `transit_batch_context` measures that
too, with the same bytes as context. Before timing, each binding is checked: a ciphertext
opens with its own bytes and is refused with another field's, so the peer is credited only
with what it enforces. Every reply is checked for an error per item.
Prints one JSON line; `summary` holds the figures and ratios for the `openbao` provider.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from residency.server.core.sealing import DataKey, field_aad  # noqa: E402
from residency.server.keys.keyring import Keyring  # noqa: E402
from residency.server.keys.providers.kms import AwsKmsProvider  # noqa: E402
from residency.server.keys.providers.local import LocalProvider  # noqa: E402
from residency.server.keys.providers.openbao import OpenBaoProvider  # noqa: E402
from tests.conftest import BAO_TOKEN, enable_transit, moto_kms, openbao  # noqa: E402

FIELDS = [f"field_{i}" for i in range(10)]
VALUE = b"x" * 40  # a typical serialized field value
VALUE_B64 = base64.b64encode(VALUE).decode()


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


class Transit:
    """One Transit key on one keep-alive client; `binding` is the request field that carries
    our `field_aad`: `associated_data`, or `context` on a derived key."""

    def __init__(self, http: httpx.Client, key: str, binding: str):
        self.http, self.key, self.binding = http, key, binding
        derived = {"derived": True} if binding == "context" else {}
        self._post("keys", {"type": "aes256-gcm96", **derived})

    def _post(self, op: str, body: dict[str, Any]) -> httpx.Response:
        r = self.http.post(f"/v1/transit/{op}/{self.key}", json=body)
        if r.status_code >= 300 and op != "decrypt":
            raise SystemExit(f"OpenBao refused {op} on {self.key} ({r.status_code}): {r.text[:300]}")
        return r

    def item(self, user: str, field: str) -> dict[str, str]:
        aad = field_aad(user, field, "cn-north", 1, "k1", format=2)
        return {"plaintext": VALUE_B64, self.binding: base64.b64encode(aad).decode()}

    def encrypt(self, items: list[dict[str, str]]) -> list[str]:
        """The ciphertexts of `items`: one call without `batch_input` for a single item."""
        if len(items) == 1:
            return [self._post("encrypt", items[0]).json()["data"]["ciphertext"]]
        results = self._post("encrypt", {"batch_input": items}).json()["data"]["batch_results"]
        failed = [r["error"] for r in results if r.get("error")]
        if failed or len(results) != len(items):
            done = len(results) - len(failed)
            raise SystemExit(f"Transit encrypted {done} of {len(items)} items: {failed[:3]}")
        return [r["ciphertext"] for r in results]

    def check_binding(self) -> None:
        """A ciphertext opens with its own bytes and not with another field's: else the peer
        would be credited with a binding it does not enforce."""
        own, other = self.item("user-0", FIELDS[0]), self.item("user-0", FIELDS[1])
        (ciphertext,) = self.encrypt([own])
        for item, expected in ((own, 200), (other, 400)):
            r = self._post("decrypt", {"ciphertext": ciphertext, self.binding: item[self.binding]})
            if r.status_code != expected:
                raise SystemExit(f"Transit {self.binding} is not bound: decrypt answered {r.status_code}")


def time_transit(transit: Transit, records: int, batch: int, rounds: int) -> float:
    """Median over `rounds` of the seconds per field to encrypt `records` 10-field records,
    `batch` fields per call; building the items is the client's work, so it is timed too."""
    fields = [(f"user-{i}", f) for i in range(records) for f in FIELDS]
    transit.encrypt([transit.item(*fields[0])] * batch)  # warm: key loaded, connection open
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for start in range(0, len(fields), batch):
            transit.encrypt([transit.item(u, f) for u, f in fields[start : start + batch]])
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(fields)


def bench_transit(address: str, args: argparse.Namespace) -> dict[str, float]:
    """µs per field for one call per field, `batch_input` with associated data and
    `batch_input` with a derived key's context."""
    with httpx.Client(base_url=address, headers={"X-Vault-Token": BAO_TOKEN}, timeout=30) as http:
        aad, ctx = Transit(http, "bench-aad", "associated_data"), Transit(http, "bench-ctx", "context")
        aad.check_binding()
        ctx.check_binding()
        batch, rounds = args.batch_size, args.rounds
        runs: dict[str, Callable[[], float]] = {
            "transit_per_call": lambda: time_transit(aad, args.transit_records, 1, rounds),
            "transit_batch": lambda: time_transit(aad, args.batch_records, batch, rounds),
            "transit_batch_context": lambda: time_transit(ctx, args.batch_records, batch, rounds),
        }
        return {f"{name}_us_per_field": round(run() * 1e6, 2) for name, run in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transit-records", type=int, default=200, help="records for one Transit call per field")
    ap.add_argument("--batch-records", type=int, default=2_000, help="records for Transit batch_input")
    ap.add_argument("--batch-size", type=int, default=100, help="fields per Transit batch_input call")
    args = ap.parse_args()
    if args.batch_size < 2:
        ap.error("--batch-size must be at least 2 (one field per call is transit_per_call)")
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
        provider = OpenBaoProvider(bao.url, BAO_TOKEN, "bench")
        provider.ensure_key()
        results = [
            bench_provider(n, p, args.records, args.rounds)
            for n, p in (("local", local), ("aws-kms", aws), ("openbao", provider))
        ]
        peer = bench_transit(bao.url, args)
        per_call, batched = peer["transit_per_call_us_per_field"], peer["transit_batch_us_per_field"]
        for r in results:
            r["speedup_vs_transit_per_field"] = round(per_call / r["cached_us_per_field"])
            r["speedup_vs_transit_batch"] = round(batched / r["cached_us_per_field"], 1)
        ours = results[-1]
        summary = {
            "ours_cached_us_per_field": ours["cached_us_per_field"],
            "ours_new_user_us_per_field": ours["new_user_us_per_field"],
            **peer,
            "ratio_transit_batch_to_ours_cached": ours["speedup_vs_transit_batch"],
            "ratio_transit_per_call_to_ours_cached": ours["speedup_vs_transit_per_field"],
        }
        print(
            json.dumps(
                {
                    "fields_per_record": len(FIELDS),
                    "records": args.records,
                    "batch_size": args.batch_size,
                    "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(),
                    "summary": summary,
                    "providers": results,
                    "targets": {"cached_us_per_field_max": 5, "speedup_min": 20},
                }
            )
        )
    finally:
        kms.stop()
        bao.stop()


if __name__ == "__main__":
    main()
