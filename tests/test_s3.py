"""The S3 sink's own request layer: SigV4 signatures equal to botocore's, addressing, and
error classification against a real SeaweedFS that checks signatures (it takes the
fixture's environment credentials as its only identity)."""

from __future__ import annotations

import asyncio
import hashlib
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials

from residency.replicator.sinks.s3 import EMPTY_SHA256, S3Error, S3Sink, object_key, sigv4_headers
from residency.server.keys.region import RecipientKey
from residency.v1 import replica_pb2
from tests.conftest import SeaweedFS

# Object keys hold user ids, which may hold anything: these must survive URI encoding.
ODD_USER_IDS = ["plain-1", "with space", "ünïcødé", "a+b=c&d", "slash/in/id", "tilde~star*(x)"]


def sink(endpoint_url: str = "", bucket: str = "bkt", **kw) -> S3Sink:
    return S3Sink(
        home_region="cn-north",
        recipient=RecipientKey("eu-west-1", b"\x01" * 32),
        home_key=b"\x02" * 32,
        bucket=bucket,
        prefix="residency/",
        endpoint_url=endpoint_url,
        **kw,
    )


@pytest.mark.parametrize("token", [None, "temporary-session-token"])
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("user_id", ODD_USER_IDS)
def test_signature_equals_botocores_for_the_same_request(method: str, user_id: str, token: str | None):
    host, region = "127.0.0.1:8333", "eu-west-1"
    path = "/bkt/" + quote(object_key("residency/", user_id), safe="/~")
    body = b"\x08\x01sealed" if method == "PUT" else b""
    headers = (
        {"Content-Type": "application/x-protobuf", "x-amz-meta-residency-version": "7"}
        if method == "PUT"
        else {}
    )
    theirs = AWSRequest(method=method, url=f"http://{host}{path}", data=body, headers=dict(headers))
    S3SigV4Auth(
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token), "s3", region
    ).add_auth(theirs)
    payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    ours = sigv4_headers(
        method,
        host,
        path,
        headers,
        payload,
        ReadOnlyCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token),
        region,
        theirs.headers["X-Amz-Date"],
    )
    assert ours["Authorization"] == theirs.headers["Authorization"]
    assert ours["X-Amz-Content-SHA256"] == theirs.headers["X-Amz-Content-SHA256"]
    assert ours.get("X-Amz-Security-Token") == theirs.headers.get("X-Amz-Security-Token")


def test_aws_addressing_is_virtual_hosted_and_path_style_for_dotted_buckets():
    s = sink(s3_region="eu-west-1")
    assert (s._origin, s._path) == ("https://bkt.s3.eu-west-1.amazonaws.com", "/")
    s = sink(bucket="my.bucket", s3_region="eu-west-1")
    assert (s._origin, s._path) == ("https://s3.eu-west-1.amazonaws.com", "/my.bucket/")
    s = sink("http://127.0.0.1:8333/base/", s3_region="eu-west-1")
    assert (s._origin, s._path) == ("http://127.0.0.1:8333", "/base/bkt/")


def test_error_bodies_are_parsed_and_classified_as_before():
    s = sink()
    body = b'<?xml version="1.0"?><Error><Code>NoSuchBucket</Code><Message>gone</Message></Error>'
    assert s.permanent(S3Error.from_body(404, body)) == "S3 NoSuchBucket: gone"
    assert s.permanent(S3Error.from_body(403, b"not xml")) == "S3 403:"
    for status, code in (
        (500, "InternalError"),
        (503, "SlowDown"),
        (408, ""),
        (429, ""),
        (400, "RequestTimeout"),
    ):
        assert s.permanent(S3Error(status, code, "later")) is None
    assert s.permanent(ConnectionResetError()) is None
    assert s.permanent(TimeoutError()) is None


async def test_copies_land_as_objects_boto3_reads_and_tombstones_delete_them(seaweed: SeaweedFS):
    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    s = sink(seaweed.endpoint)
    try:
        copies = [replica_pb2.SealedCopy(user_id=u, version=i + 1) for i, u in enumerate(ODD_USER_IDS)]
        await s.apply("cn-north", copies)
        client = seaweed.client()
        for c in copies:
            o = client.get_object(Bucket="bkt", Key=object_key("residency/", c.user_id))
            assert o["Body"].read() == c.SerializeToString()
            assert o["ContentType"] == "application/x-protobuf"
            assert o["Metadata"] == {"residency-version": str(c.version)}
        assert b'"format"' in client.get_object(Bucket="bkt", Key="residency/manifest.json")["Body"].read()
        await s.apply("cn-north", [replica_pb2.SealedCopy(user_id=c.user_id, deleted=True) for c in copies])
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="bkt").get("Contents", [])]
        assert keys == ["residency/manifest.json"]
    finally:
        await s.close()


async def test_a_refusal_is_permanent_and_an_unreachable_server_transient(seaweed: SeaweedFS):
    missing = sink(seaweed.endpoint, bucket="no-such-bucket")
    down = sink(seaweed.endpoint)
    try:
        with pytest.raises(S3Error) as e:
            await missing.apply("cn-north", [replica_pb2.SealedCopy(user_id="u-1", version=1)])
        assert missing.permanent(e.value) == "S3 NoSuchBucket: The specified bucket does not exist"
        assert "u-1" not in repr(e.value)  # the key holds a user id: never in errors
        await asyncio.to_thread(seaweed.stop)
        with pytest.raises(Exception) as e:
            await down.apply("cn-north", [replica_pb2.SealedCopy(user_id="u-1", version=1)])
        assert down.permanent(e.value) is None
    finally:
        await missing.close()
        await down.close()


async def test_a_wrong_secret_is_refused_by_the_server(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch):
    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s = sink(seaweed.endpoint)
    try:
        with pytest.raises(S3Error) as e:
            await s.apply("cn-north", [replica_pb2.SealedCopy(user_id="u-1", version=1)])
        assert s.permanent(e.value) is not None and "SignatureDoesNotMatch" in str(e.value)
    finally:
        await s.close()


async def test_each_batch_is_signed_with_the_chains_current_credentials(seaweed: SeaweedFS):
    """Temporary credentials expire: the sink freezes the chain's credentials per batch (a
    refreshable chain hands out new ones), never once for good."""

    class Rotating:  # what botocore's refreshable credentials do when keys are rotated
        def __init__(self, *secrets: str):
            self.secrets = list(secrets)

        def get_frozen_credentials(self) -> ReadOnlyCredentials:
            return ReadOnlyCredentials("residency-test", self.secrets.pop(0), None)

    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    s = sink(seaweed.endpoint)
    s._credentials = Rotating("residency-test-secret", "rotated-elsewhere")
    try:
        await s.apply("cn-north", [replica_pb2.SealedCopy(user_id="u-1", version=1)])
        with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
            await s.apply("cn-north", [replica_pb2.SealedCopy(user_id="u-1", version=2)])
    finally:
        await s.close()


async def test_a_refused_copy_leaves_the_rest_of_its_batch_written(seaweed: SeaweedFS):
    """One worker (concurrency 1), the refused copy first: every other copy of the batch is
    still written, and the refusal is what the batch raises."""
    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    s = sink(seaweed.endpoint, concurrency=1)
    try:
        refused = replica_pb2.SealedCopy(user_id="x" * 2000, version=1)  # key over S3's 1,024 bytes
        copies = [replica_pb2.SealedCopy(user_id=u, version=1) for u in ODD_USER_IDS]
        with pytest.raises(S3Error) as e:
            await s.apply("cn-north", [refused, *copies])
        assert s.permanent(e.value) is not None
        assert "x" * 100 not in str(e.value)  # the key holds a user id: never in errors
        client = seaweed.client()
        listed = {o["Key"] for o in client.list_objects_v2(Bucket="bkt").get("Contents", [])}
        assert listed == {"residency/manifest.json", *(object_key("residency/", u) for u in ODD_USER_IDS)}
    finally:
        await s.close()
