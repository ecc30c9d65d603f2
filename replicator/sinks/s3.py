"""The S3 sink: an affiliate's bucket, over asyncio HTTP/1.1, against any S3 endpoint.

Layout under the configured prefix (documented for the affiliate in docs/operators.md and in the
manifest itself):

    {prefix}manifest.json                 what the objects are and how to open them
    {prefix}copies/{user_id}.sealedcopy   one user's copy: a serialized residency.v1.SealedCopy

An object holds only fields sealed for the bucket's region, signed by the home: the affiliate
checks and opens it with the home's public key and its region's private key alone (the
manifest says how; `residency.replicator.sinks.manifest.open_object` is the same recipe).
An erased or withdrawn copy's object is deleted. A batch's PUTs and DELETEs run concurrently
on one connection pool, bounded by the batch's lease `Fence` (no request starts after its
deadline, none outlives it), and each PUT is conditional (`_put`), so a PUT that lands late,
after a newer lease holder replaced or deleted the object, is refused by the endpoint.
Credentials still come from boto3's standard chain, but requests are signed here (SigV4) and
sent on the sink's own connection pool (`sinks.http`, which says why not aiohttp), since boto3
spends about 2 ms of CPU per request.
Tenacity in the worker does the retrying, so nothing here retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import re
import time
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

from residency.replicator.lease import Fence, StandDown
from residency.replicator.sinks.http import Pool
from residency.replicator.sinks.manifest import OBJECT_SUFFIX, manifest
from residency.server.keys.region import RecipientKey
from residency.v1 import replica_pb2

if TYPE_CHECKING:  # imported when first used
    from botocore.credentials import ReadOnlyCredentials

# S3 error codes that mean "later", whatever their HTTP status.
THROTTLING = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        # A conditional write raced another write of the same object: look again.
        "ConditionalRequestConflict",
    }
)
# The metadata each object carries its copy's version in (compared before a PUT replaces it).
VERSION_HEADER = "x-amz-meta-residency-version"
# Entity tags remembered of objects this sink wrote, so that most PUTs need no HEAD first.
ETAGS_KEPT = 50_000
_OBJECT_KEY = re.compile(r"copies/[^\s'\"?<]+")


def object_key(prefix: str, user_id: str) -> str:
    return f"{prefix}copies/{user_id}{OBJECT_SUFFIX}"


class S3Error(Exception):
    """S3 answered with an error status; `code` and `message` come from its XML error body."""

    def __init__(self, status: int, code: str, message: str):
        # Never the key or URL: an object key holds a user id.
        super().__init__(f"S3 {status} {code}: {message}".strip())
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_body(cls, status: int, body: bytes) -> S3Error:
        code = message = ""
        with contextlib.suppress(ElementTree.ParseError):
            root = ElementTree.fromstring(body)
            code, message = root.findtext("{*}Code") or "", root.findtext("{*}Message") or ""
        # An endpoint may name the object in its message: its key holds a user id.
        return cls(status, code, _OBJECT_KEY.sub("copies/...", message))


# SigV4 for S3, by hand: botocore's `S3SigV4Auth` re-derives the signing key and rebuilds the
# request through its generic machinery each time (about 120 µs a request, a quarter of the
# sink's CPU per object). Our requests are fixed in shape (a PUT or DELETE of one path, no
# query, a few headers we chose), so the canonical request is one format string; the signing
# key is derived once per day and credentials. tests/test_s3.py checks the result against
# botocore's signer for the same requests.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@functools.lru_cache(maxsize=8)
def _signing_key(secret_key: str, day: str, region: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


def sigv4_headers(
    method: str,
    host: str,
    path: str,
    headers: dict[str, str],
    payload_sha256: str,
    credentials: ReadOnlyCredentials,
    region: str,
    amz_date: str,
) -> dict[str, str]:
    """`headers` plus the signed ones (Host, X-Amz-Date, X-Amz-Content-SHA256, X-Amz-Security-Token
    for temporary credentials, Authorization), for a request without a query string.

    `path` is the canonical URI: already URI-encoded once, as S3 wants it (no double encoding)."""
    signed = {"host": host, "x-amz-content-sha256": payload_sha256, "x-amz-date": amz_date}
    if credentials.token:
        signed["x-amz-security-token"] = credentials.token
    signed.update((k.lower(), " ".join(v.split())) for k, v in headers.items())
    names = sorted(signed)
    signed_names = ";".join(names)
    canonical = "\n".join(
        (method, path, "", *(f"{n}:{signed[n]}" for n in names), "", signed_names, payload_sha256)
    )
    day = amz_date[:8]
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(
        _signing_key(credentials.secret_key, day, region), to_sign.encode(), "sha256"
    ).hexdigest()
    out = {**headers, "Host": host, "X-Amz-Date": amz_date, "X-Amz-Content-SHA256": payload_sha256}
    if credentials.token:
        out["X-Amz-Security-Token"] = credentials.token
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )
    return out


class S3Sink:
    """Writes each copy as one object; deletes the object of a tombstone."""

    kind = "s3"
    signs_each_copy = True  # an object is read alone, by an affiliate that checks its signature

    def __init__(
        self,
        *,
        home_region: str,
        recipient: RecipientKey,
        home_key: bytes,
        bucket: str,
        prefix: str = "",
        endpoint_url: str = "",
        s3_region: str = "",
        timeout: float = 5.0,
        concurrency: int = 32,
        conditional: bool = True,
    ):
        import boto3

        self.bucket = bucket
        self.prefix = prefix
        self.target = f"s3://{bucket}/{prefix}"
        self._manifest = json.dumps(manifest(home_region, recipient, prefix, home_key), indent=2).encode()
        self._manifest_written = False
        self._session = boto3.session.Session()
        self._credentials: Any = None
        # As boto3 would: the configured region, else the session's, else us-east-1.
        self._region = s3_region or self._session.region_name or "us-east-1"
        if endpoint_url:  # any S3 server: path-style, under the endpoint's own path if it has one
            url = urlsplit(endpoint_url)
            scheme, self._host, base = url.scheme, url.netloc, url.path.rstrip("/")
            self._path = f"{base}/{quote(bucket, safe='')}/"
        else:
            # AWS, virtual-hosted style; a dotted bucket name would not match the wildcard
            # certificate, so it goes path-style to the regional endpoint (as boto3 does).
            suffix = "amazonaws.com.cn" if self._region.startswith("cn-") else "amazonaws.com"
            scheme, self._host = "https", f"s3.{self._region}.{suffix}"
            if "." in bucket:
                self._path = f"/{bucket}/"
            else:
                self._host, self._path = f"{bucket}.{self._host}", "/"
        self._origin = f"{scheme}://{self._host}"
        # A proxy from the environment, as botocore honours one; looked up once.
        self._proxy = (
            None if urllib.request.proxy_bypass(self._host) else urllib.request.getproxies().get(scheme)
        )
        self._timeout = timeout
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)  # made again with each pool
        self._conditional = conditional
        # user id -> entity tag of the object this sink last wrote for them (what the next
        # PUT names in If-Match); forgotten on a 412, a DELETE, or when the oldest of many.
        self._etags: dict[str, str] = {}
        self._http: Pool | None = None  # made on first use: its connections belong to a running loop

    def _client(self) -> Pool:
        if self._http is not None and self._http.loop is not asyncio.get_running_loop():
            self._http.forget()  # made on a loop since gone (a restarted worker, a test)
        if self._http is None or self._http.closed:
            # At most `concurrency` requests, so connections, at once; taken before a request's
            # fence check (`_put`). The pool's timeout bounds connecting, sending with waiting
            # for the answer, and reading its body, as boto3's connect and read timeouts did:
            # waiting for a turn here is not a failure.
            self._slots = asyncio.Semaphore(self._concurrency)
            self._http = Pool(self._origin, proxy=self._proxy, timeout=self._timeout)
        return self._http

    def _frozen_credentials(self) -> ReadOnlyCredentials:
        """The standard chain's current credentials; refreshed ones when temporary ones near
        expiry (botocore refreshes inside `get_frozen_credentials`)."""
        from botocore.exceptions import NoCredentialsError

        if self._credentials is None:
            self._credentials = self._session.get_credentials()
            if self._credentials is None:
                raise NoCredentialsError()
        return self._credentials.get_frozen_credentials()

    async def _send(
        self,
        http: Pool,
        credentials: ReadOnlyCredentials,
        method: str,
        key: str,
        body: bytes,
        headers: dict[str, str],
        fence: Fence | None = None,
    ) -> Mapping[str, str]:
        """One request; its answer's headers, names in lower case (S3Error for an error status).
        Under a fence, it starts only before the deadline and is abandoned at it (StandDown)."""
        path = self._path + quote(key, safe="/~")
        headers = sigv4_headers(
            method,
            self._host,
            path,
            headers,
            hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
            credentials,
            self._region,
            time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        )
        # The fence is checked last thing before sending (a stalled worker stops there), and its
        # deadline (monotonic, as the event loop's clock) abandons the request.
        check = None if fence is None else fence.remaining
        try:
            async with asyncio.timeout_at(None if fence is None else fence.deadline) as limit:
                answer = await http.request(method, path, headers, body, check)
        except TimeoutError:
            if fence is not None and limit.expired():
                raise StandDown(fence.lease.region) from None
            raise  # the pool's own timeout: a slow or silent endpoint
        if answer.status >= 300:
            raise S3Error.from_body(answer.status, answer.body)
        return answer.headers

    async def _put(
        self,
        http: Pool,
        credentials: ReadOnlyCredentials,
        copy: replica_pb2.SealedCopy,
        fence: Fence | None,
    ) -> None:
        async with self._slots:  # a pooled connection is free: nothing waits between check and send
            key = object_key(self.prefix, copy.user_id)
            if copy.deleted:
                self._etags.pop(copy.user_id, None)
                await self._send(http, credentials, "DELETE", key, b"", {}, fence)
                return
            body = copy.SerializeToString()
            headers = {"Content-Type": "application/x-protobuf", VERSION_HEADER: str(copy.version)}
            if not self._conditional:
                await self._send(http, credentials, "PUT", key, body, headers, fence)
                return
            etag = self._etags.get(copy.user_id)
            # Version 1 is a user's first: no earlier copy of theirs can be there to look for.
            if etag is None and copy.version > 1:
                held = await self._head(http, credentials, key, fence)
                if held is not None and held[1] >= copy.version:
                    return  # the bucket holds this copy already, or a newer one: never go back
                etag = held[0] if held else None
            condition = {"If-Match": etag} if etag else {"If-None-Match": "*"}
            try:
                answer = await self._send(http, credentials, "PUT", key, body, headers | condition, fence)
            except S3Error as e:
                if e.status != 412:
                    raise
                # Written or deleted since this sink looked. Already this copy or a newer one
                # (a batch shipped again): done; else the batch is tried again, looking first.
                self._etags.pop(copy.user_id, None)
                held = await self._head(http, credentials, key, fence)
                if held is None or held[1] < copy.version:
                    raise
                return
            if len(self._etags) >= ETAGS_KEPT:
                del self._etags[next(iter(self._etags))]  # the oldest
            self._etags[copy.user_id] = answer.get("etag", "")

    async def _head(
        self, http: Pool, credentials: ReadOnlyCredentials, key: str, fence: Fence | None
    ) -> tuple[str, int] | None:
        """The object's entity tag and copy version, or None when there is no object."""
        try:
            answer = await self._send(http, credentials, "HEAD", key, b"", {}, fence)
        except S3Error as e:
            if e.status == 404:
                return None
            raise
        version = answer.get(VERSION_HEADER, "")
        return answer.get("etag", ""), int(version) if version.isdigit() else 0

    async def apply(
        self,
        source_region: str,
        copies: list[replica_pb2.SealedCopy],
        high_water: replica_pb2.HighWater | None = None,
        fence: Fence | None = None,
    ) -> None:
        # No mark goes to a bucket: no node there checks one; each object carries its own
        # signature, which the manifest tells the affiliate how to check.
        # In a thread: a refresh of temporary credentials may call STS or the instance metadata.
        credentials = await asyncio.to_thread(self._frozen_credentials)
        http = self._client()
        if not self._manifest_written:
            await self._send(
                http,
                credentials,
                "PUT",
                f"{self.prefix}manifest.json",
                self._manifest,
                {"Content-Type": "application/json"},
                fence,
            )
            self._manifest_written = True
        # A batch holds each user at most once, so its objects can be written in any order:
        # `concurrency` workers take them in turn, all of them even after one fails. Not a task
        # per object: with an empty await in place of each request, 500 tasks queued on `_slots`
        # cost 11.7 µs of CPU an object against 3.1 µs for 32 workers (2026-11-30); the
        # request itself costs about 80 µs (docs/performance.md).
        todo = iter(copies)
        errors: list[Exception] = []

        async def worker() -> None:
            for c in todo:
                try:
                    await self._put(http, credentials, c, fence)
                except Exception as e:  # kept to choose from below; cancellation goes through
                    errors.append(e)

        await asyncio.gather(*(worker() for _ in range(min(self._concurrency, len(copies)))))
        if errors:
            # The fence stopped the batch: the rest is the next lease holder's. Else any
            # transient failure: the whole batch again (rewriting an object is harmless).
            stop: list[Exception] = [e for e in errors if isinstance(e, StandDown)]
            raise (stop or [e for e in errors if self.permanent(e) is None] or errors)[0]

    def key_shredded(self, e: BaseException) -> str | None:
        return None  # a bucket cannot tell: the affiliate tells the operator (docs/operators.md)

    async def region_key(self, nonce: bytes) -> bytes | None:
        return None

    def permanent(self, e: BaseException) -> str | None:
        if isinstance(e, S3Error):
            # 412: a conditional PUT found the object changed since this sink looked.
            if e.status >= 500 or e.status in (408, 412, 429) or e.code in THROTTLING:
                return None
            return f"S3 {e.code or e.status}: {e.message}".strip()
        return None  # connection errors, timeouts, missing credentials: retried

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
