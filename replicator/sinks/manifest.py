"""What an affiliate needs to read a bucket without our server: the manifest written beside
the objects (the scheme actually used for the bucket's region key, the copy format and the
home's signature) and `open_object`, the same recipe in code."""

from __future__ import annotations

import base64
from importlib import resources
from typing import Any

from residency.server.core.sealing import COPY_FORMAT, SealError, field_aad
from residency.server.core.signed import key_id, verifies
from residency.server.keys.region import RecipientKey, RegionKey
from residency.v1 import common_pb2, replica_pb2

FORMAT = "residency/sealed-copies/v2"
OBJECT_SUFFIX = ".sealedcopy"

# Per region key kind (`keys.kem`): the HPKE suite, as RFC 9180 and `cryptography` name it,
# and the sizes an affiliate checks before it trusts a layout.
_KEMS: dict[str, dict[str, Any]] = {
    "x25519": {
        "kem": "DHKEM(X25519, HKDF-SHA256)",
        "kem_id": "0x0020",
        "cryptography": "hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)",
        "enc_length": 32,
        "public_key": "the raw 32-byte X25519 public key",
        "private_key": "X25519PrivateKey.from_private_bytes(the raw 32-byte private key)",
    },
    "mlkem768-x25519": {
        "kem": "ML-KEM-768 + X25519 hybrid, as cryptography's hpke.KEM.MLKEM768_X25519",
        "kem_id": "as cryptography's hpke.KEM.MLKEM768_X25519",
        "cryptography": "hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)",
        "enc_length": 1120,
        "public_key": "ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32 bytes)",
        "private_key": "hpke.MLKEM768X25519PrivateKey(MLKEM768PrivateKey.from_seed_bytes(the 64-byte "
        "ML-KEM seed), X25519PrivateKey.from_private_bytes(the 32-byte X25519 key))",
    },
}


def manifest(home_region: str, recipient: RecipientKey, prefix: str, home_key: bytes) -> dict[str, Any]:
    """The manifest of a bucket of `recipient.region`'s copies, signed with `home_key`'s
    private half (a raw Ed25519 public key)."""
    region, kid, suite = recipient.region, recipient.key_id, _KEMS[recipient.kem]
    protos = resources.files("residency.v1")
    hpke = {
        "mode": "base (RFC 9180)",
        **{k: suite[k] for k in ("kem", "kem_id", "cryptography")},
        "kdf": "HKDF-SHA256 (0x0001)",
        "aead": "AES-256-GCM (0x0002)",
        "layout": f"enc ({suite['enc_length']} bytes) || ciphertext || tag (16 bytes)",
        "enc_length": suite["enc_length"],
    }
    return {
        "format": FORMAT,
        "home_region": home_region,
        "region": region,
        "key_id": kid,
        "region_key": {
            "kem": recipient.kem,
            "public_key": suite["public_key"],
            "private_key": suite["private_key"],
            "key_id": "first 16 hex digits of SHA-256 of the raw public key",
        },
        "objects": f"{prefix}copies/{{user_id}}{OBJECT_SUFFIX}",
        "object_encoding": "protobuf message residency.v1.SealedCopy (replica.proto below)",
        "deleted": "an erased or withdrawn copy's object is deleted; a missing object holds nothing",
        "copy_format": {
            "field": "format",
            "current": COPY_FORMAT,
            "older": "0: written before copies were signed (no signature, NUL-joined associated data): "
            "trust one only if you held it before your bucket took format 2; anyone who can write to "
            "the bucket can make one",
        },
        "signature": {
            "scheme": "Ed25519 (RFC 8032), pure",
            "public_key": base64.b64encode(home_key).decode(),
            "public_key_encoding": "base64 of the raw 32-byte public key (the home's copy.pub)",
            "key_id": key_id(home_key),
            "field": "signature; signing_key_id must equal key_id, region must equal this region",
            "signed_bytes": "length (4 bytes, big-endian) || 'residency/copy/v2', then for each set field "
            "but signature (16), by field number: number (4 bytes) || value; value: string, bytes: "
            "length (4 bytes) || bytes; bool: 1 byte; unsigned integers: 8 bytes; signed integers, "
            "enums: 8 bytes two's complement; double, float: 8 bytes IEEE 754; message: length (4 "
            "bytes) || its encoding; repeated: count (4 bytes) || values; map: count (4 bytes) || "
            "key value || value value, sorted by the key's value bytes (all big-endian). A field "
            "your schema lacks cannot be checked: refuse the object",
        },
        "transit_key": {
            "fields": "transit_key_id, wrapped_transit_key (one transit key serves many objects)",
            "hpke": hpke,
            "recipient": f"the {recipient.kem} region key of {region} whose key id is key_id",
            "info": "b'residency/transit-key/v1' 0x00, then region 0x00 key_id 0x00 transit_key_id (UTF-8)",
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
            "aad": {
                "2": "each of 'residency/field/v2', user_id, field name, region, version (decimal), "
                "key_id as length (4 bytes, big-endian) || UTF-8 bytes, concatenated",
                "0": "'field' 0x00 user_id 0x00 field name 0x00 region 0x00 version 0x00 key_id (UTF-8)",
            },
            "plaintext": "protobuf message residency.v1.Value (common.proto below)",
        },
        "protos": {name: (protos / name).read_text() for name in ("replica.proto", "common.proto")},
    }


def open_object(
    body: bytes, key: RegionKey, home_key: bytes, *, unsigned_ok: bool = False
) -> tuple[replica_pb2.SealedCopy, dict[str, common_pb2.Value]]:
    """Opens an object fetched from the bucket with the region's private key alone, once the
    home's signature (`home_key`) holds; an unsigned object of format 0 only if `unsigned_ok`."""
    copy = replica_pb2.SealedCopy.FromString(body)
    signed = verifies(home_key, copy) and copy.region == key.region
    if not signed and (copy.format or not unsigned_ok):
        raise SealError("the object is not a copy the home signed for this region")
    dek = key.open_data_key(
        copy.user_id, copy.key_id, copy.wrapped_data_key, copy.transit_key_id, copy.wrapped_transit_key
    )
    f = copy.format
    fields = {
        name: common_pb2.Value.FromString(
            dek.open(sealed, field_aad(copy.user_id, name, key.region, copy.version, copy.key_id, format=f))
        )
        for name, sealed in copy.sealed_fields.items()
    }
    return copy, fields
