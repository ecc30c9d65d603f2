"""An affiliate reads its bucket with the manifest alone (issue 14.3): for an X25519 and a
hybrid ML-KEM-768 + X25519 region key, objects written by a real primary to a real SeaweedFS
are checked against the home's signature and opened here with the `cryptography` package,
following the manifest's recipe step by step; no residency code opens anything."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from residency.server.core import codec
from residency.server.deployment import PRIMARY, local_keys
from residency.v1 import common_pb2, replica_pb2
from tests.conftest import S3_BUCKET, S3_PREFIX, S3_REGION, Cluster, SeaweedFS
from tests.test_replication import FULL, allowed_fields

# The manifest's names of the suites, to `cryptography`'s.
KEMS = {"x25519": hpke.KEM.X25519, "mlkem768-x25519": hpke.KEM.MLKEM768_X25519}


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def recipe_encoding(m: Message, leave_out: int = 0) -> bytes:
    """The manifest's `signature.signed_bytes` encoding, written from its text."""
    out = b""
    for fd, v in m.ListFields():
        if fd.number == leave_out:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            k_fd, v_fd = (fd.message_type.fields_by_name[n] for n in ("key", "value"))
            pairs = sorted((_scalar(k_fd, k), _scalar(v_fd, x)) for k, x in v.items())
            body = len(pairs).to_bytes(4, "big") + b"".join(a + b for a, b in pairs)
        elif fd.is_repeated:
            body = len(v).to_bytes(4, "big") + b"".join(_scalar(fd, x) for x in v)
        else:
            body = _scalar(fd, v)
        out += fd.number.to_bytes(4, "big") + body
    return out


def _scalar(fd: FieldDescriptor, v: Any) -> bytes:
    T = FieldDescriptor
    if fd.type == T.TYPE_MESSAGE:
        return _lp(recipe_encoding(v))
    if fd.type in (T.TYPE_STRING, T.TYPE_BYTES):
        return _lp(v.encode() if isinstance(v, str) else v)
    if fd.type == T.TYPE_BOOL:
        return bytes([int(v)])
    if fd.type in (T.TYPE_UINT32, T.TYPE_UINT64, T.TYPE_FIXED32, T.TYPE_FIXED64):
        return v.to_bytes(8, "big")
    if fd.type in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        return struct.pack(">d", v)
    return v.to_bytes(8, "big", signed=True)


def private_key(kem: str, raw: bytes) -> Any:
    """The region's private key as the manifest's `region_key.private_key` says."""
    if kem == "x25519":
        return X25519PrivateKey.from_private_bytes(raw)
    return hpke.MLKEM768X25519PrivateKey(
        MLKEM768PrivateKey.from_seed_bytes(raw[:64]), X25519PrivateKey.from_private_bytes(raw[64:])
    )


def open_by_manifest(body: bytes, m: dict, private_raw: bytes) -> tuple[int, dict[str, Any]]:
    """Checks and opens one object with the manifest, the region's raw private key and
    `cryptography`; raises InvalidSignature for an object the home did not sign for it."""
    copy = replica_pb2.SealedCopy.FromString(body)
    region, kid = m["region"], m["key_id"]
    sig = m["signature"]
    assert sig["scheme"].startswith("Ed25519") and copy.format == m["copy_format"]["current"] == 2
    if copy.signing_key_id != sig["key_id"] or copy.region != region:
        raise InvalidSignature("signed by another key, or for another region")
    home = Ed25519PublicKey.from_public_bytes(base64.b64decode(sig["public_key"]))
    home.verify(copy.signature, _lp(b"residency/copy/v2") + recipe_encoding(copy, leave_out=16))
    kem = m["region_key"]["kem"]
    suite = hpke.Suite(KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    h = m["transit_key"]["hpke"]
    assert (h["kdf"], h["aead"]) == ("HKDF-SHA256 (0x0001)", "AES-256-GCM (0x0002)")
    assert len(copy.wrapped_transit_key) == h["enc_length"] + 32 + 16  # enc || AES-256 key || tag
    info = b"residency/transit-key/v1\x00" + "\x00".join((region, kid, copy.transit_key_id)).encode()
    transit = AESGCM(suite.decrypt(copy.wrapped_transit_key, private_key(kem, private_raw), info=info))
    dek_aad = b"residency/dek/v1\x00" + "\x00".join((copy.user_id, region, kid, copy.transit_key_id)).encode()
    w = copy.wrapped_data_key
    dek = AESGCM(transit.decrypt(w[:12], w[12:], dek_aad))
    fields = {}
    for name, sealed in copy.sealed_fields.items():
        parts = ("residency/field/v2", copy.user_id, name, region, str(copy.version), kid)
        aad = b"".join(_lp(p.encode()) for p in parts)
        fields[name] = codec.from_value(
            common_pb2.Value.FromString(dek.decrypt(sealed[:12], sealed[12:], aad))
        )
    return copy.version, fields


def kem_keys(kem: str) -> Callable[[Path, str], dict[str, Any]]:
    """`init`'s local keys, with the bucket's region on `kem`."""

    def keys(d: Path, region: str) -> dict[str, Any]:
        return {**local_keys(d, region), **({"kem": kem} if region == S3_REGION else {})}

    return keys


@pytest.fixture(params=["x25519", "mlkem768-x25519"])
async def kem_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, seaweed: SeaweedFS
) -> AsyncIterator[Cluster]:
    await asyncio.to_thread(seaweed.make_bucket, S3_BUCKET)
    c = Cluster(tmp_path / "deployment", s3=seaweed, keys=kem_keys(request.param))
    try:
        await c.start(PRIMARY, "ap-southeast-1")
        yield c
    finally:
        await c.close()


def raw_private(c: Cluster) -> bytes:
    """The bucket region's raw private key, as the affiliate holds it (here from its provider)."""
    from tests.test_replicator import region_key

    return region_key(c, S3_REGION)._raw


async def test_objects_of_either_key_kind_open_with_the_manifest_and_cryptography_alone(kem_cluster: Cluster):
    c = kem_cluster
    await c.accept_cookies("m-1")
    await c.put("m-1", FULL)
    await c.replicated()
    s3 = c.s3.client()  # type: ignore[union-attr]
    m = json.loads(s3.get_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}manifest.json")["Body"].read())
    kem = m["region_key"]["kem"]
    assert m["format"] == "residency/sealed-copies/v2" and m["transit_key"]["hpke"]["enc_length"] == (
        32 if kem == "x25519" else 1120
    )
    home_pub = (c.dir / "keys" / PRIMARY / "copy.pub").read_bytes()
    assert base64.b64decode(m["signature"]["public_key"]) == home_pub
    body = s3.get_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}copies/m-1.sealedcopy")["Body"].read()
    version, fields = open_by_manifest(body, m, raw_private(c))
    assert version == 1 and fields == {n: FULL[n] for n in allowed_fields(c, S3_REGION)}
    # A byte changed anywhere in what is signed, or the copy re-signed by another key: refused.
    copy = replica_pb2.SealedCopy.FromString(body)
    copy.sealed_fields["national_id"] = copy.sealed_fields[next(iter(copy.sealed_fields))]
    with pytest.raises(InvalidSignature):
        open_by_manifest(copy.SerializeToString(), m, raw_private(c))
    liar = {**m, "signature": {**m["signature"], "public_key": base64.b64encode(b"\x01" * 32).decode()}}
    with pytest.raises(InvalidSignature):
        open_by_manifest(body, liar, raw_private(c))
