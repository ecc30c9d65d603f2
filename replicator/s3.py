"""The S3 sink: an affiliate's bucket, through boto3, against any S3 endpoint.

Layout under the configured prefix (documented for the affiliate in README.md and in the
manifest itself):

    {prefix}manifest.json                 what the objects are and how to open them
    {prefix}copies/{user_id}.sealedcopy   one user's copy: a serialized residency.v1.SealedCopy

An object holds only fields sealed for the bucket's region: the affiliate opens it with its
region's private key alone (`open_object` below is the whole recipe). An erased or withdrawn
copy's object is deleted. boto3 blocks, so calls run in a bounded thread pool; tenacity in
the worker does the retrying, so botocore's own retries are off.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from residency.v1 import common_pb2, replica_pb2
from server.crypto import RegionKey, field_aad

FORMAT = "residency/sealed-copies/v1"
OBJECT_SUFFIX = ".sealedcopy"
# S3 error codes that mean "later", whatever their HTTP status.
THROTTLING = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
    }
)


def object_key(prefix: str, user_id: str) -> str:
    return f"{prefix}copies/{user_id}{OBJECT_SUFFIX}"


def manifest(home_region: str, region: str, key_id: str, prefix: str) -> dict[str, Any]:
    """What an affiliate needs to read the bucket without our server."""
    protos = resources.files("residency.v1")
    return {
        "format": FORMAT,
        "home_region": home_region,
        "region": region,
        "key_id": key_id,
        "objects": f"{prefix}copies/{{user_id}}{OBJECT_SUFFIX}",
        "object_encoding": "protobuf message residency.v1.SealedCopy (replica.proto below)",
        "deleted": "an erased or withdrawn copy's object is deleted; a missing object holds nothing",
        "transit_key": {
            "fields": "transit_key_id, wrapped_transit_key (one transit key serves many objects)",
            "scheme": "HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM",
            "layout": "enc (32 bytes) || ciphertext",
            "recipient": f"the X25519 region key of {region} whose key id is key_id",
            "info": "b'residency/transit-key/v1' 0x00, then region 0x00 key_id 0x00 transit_key_id (UTF-8)",
            "key_id": "first 16 hex digits of SHA-256 of the raw 32-byte X25519 public key",
        },
        "data_key": {
            "field": "wrapped_data_key",
            "cipher": "AES-256-GCM under the unwrapped transit key",
            "layout": "nonce (12 bytes) || ciphertext || tag (16 bytes)",
            "aad": "b'residency/dek/v1' 0x00, then user_id 0x00 region 0x00 key_id 0x00 "
            "transit_key_id (UTF-8)",
            "without_transit_key": "objects written before transit keys (transit_key_id empty): the data "
            "key is HPKE-wrapped directly as under transit_key, with info b'residency/dek/v1' 0x00, then "
            "user_id 0x00 region 0x00 key_id",
        },
        "fields": {
            "field": "sealed_fields: field name to sealed value",
            "cipher": "AES-256-GCM under the unwrapped data key",
            "layout": "nonce (12 bytes) || ciphertext || tag (16 bytes)",
            "aad": "'field' 0x00 user_id 0x00 field name 0x00 region 0x00 version 0x00 key_id (UTF-8)",
            "plaintext": "protobuf message residency.v1.Value (common.proto below)",
        },
        "protos": {name: (protos / name).read_text() for name in ("replica.proto", "common.proto")},
    }


def open_object(body: bytes, key: RegionKey) -> tuple[replica_pb2.SealedCopy, dict[str, common_pb2.Value]]:
    """Opens an object fetched from the bucket with the region's private key alone."""
    copy = replica_pb2.SealedCopy.FromString(body)
    dek = key.open_data_key(
        copy.user_id, copy.key_id, copy.wrapped_data_key, copy.transit_key_id, copy.wrapped_transit_key
    )
    fields = {
        name: common_pb2.Value.FromString(
            dek.open(sealed, field_aad(copy.user_id, name, key.region, copy.version, copy.key_id))
        )
        for name, sealed in copy.sealed_fields.items()
    }
    return copy, fields


class S3Sink:
    """Writes each copy as one object; deletes the object of a tombstone."""

    kind = "s3"

    def __init__(
        self,
        *,
        home_region: str,
        region: str,
        key_id: str,
        bucket: str,
        prefix: str = "",
        endpoint_url: str = "",
        s3_region: str = "",
        timeout: float = 5.0,
        concurrency: int = 32,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.target = f"s3://{bucket}/{prefix}"
        self._manifest = json.dumps(manifest(home_region, region, key_id, prefix), indent=2).encode()
        self._manifest_written = False
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=s3_region or None,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                max_pool_connections=concurrency,
            ),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"s3-{region}")
        self._concurrency = concurrency

    def _put(self, copy: replica_pb2.SealedCopy) -> None:
        key = object_key(self.prefix, copy.user_id)
        if copy.deleted:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        else:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=copy.SerializeToString(),
                ContentType="application/x-protobuf",
                Metadata={"residency-version": str(copy.version)},
            )

    async def apply(self, source_region: str, copies: list[replica_pb2.SealedCopy]) -> None:
        loop = asyncio.get_running_loop()
        if not self._manifest_written:
            await loop.run_in_executor(
                self._pool,
                lambda: self._client.put_object(
                    Bucket=self.bucket,
                    Key=f"{self.prefix}manifest.json",
                    Body=self._manifest,
                    ContentType="application/json",
                ),
            )
            self._manifest_written = True
        # A batch holds each user at most once, so its objects can be written in any order.
        results = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._put, c) for c in copies), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # Any transient failure: the whole batch again (rewriting an object is harmless).
            transient = [e for e in errors if self.permanent(e) is None]
            raise (transient or errors)[0]

    def permanent(self, e: BaseException) -> str | None:
        from botocore.exceptions import ClientError, ParamValidationError

        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = err.get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or status in (408, 429) or code in THROTTLING:
                return None
            return f"S3 {code or status}: {err.get('Message', '')}".strip()
        if isinstance(e, ParamValidationError):
            return f"S3 request refused before sending: {e}"
        return None  # connection errors, timeouts, missing credentials: retried

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
