"""Key providers: where a region's key-encryption keys live and how they wrap data keys.

One small interface, `KeyProvider`, with three implementations: `local` (key files on disk,
themselves encrypted under a passphrase-derived key), `aws-kms` (AWS KMS through boto3) and
`openbao` (OpenBao / Vault Transit over HTTP). A provider never sees field values: it wraps
and unwraps key material only, and every wrap binds an encryption context (user, region,
purpose) so wrapped material moved to another context does not unwrap.

A provider that cannot be reached raises `KeyUnavailable` (UNAVAILABLE); wrapped material
that does not unwrap, or a destroyed key, raises `SealError` / `KeyDestroyed`
(FAILED_PRECONDITION). Nothing falls back to another key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from residency.server.core.errors import FailedPrecondition, KeyUnavailable

Context = Mapping[str, str]
_NONCE = 12


class SealError(FailedPrecondition):
    """A sealed value or wrapped key did not open: wrong key, or moved to another context."""


class KeyDestroyed(SealError):
    """The key that wrapped this material was destroyed (crypto-shredded) or retired."""


def canonical_context(context: Context) -> bytes:
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


class KeyProvider(Protocol):
    """What every provider offers. `new_data_key` returns (plaintext, wrapped)."""

    name: str

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]: ...
    def wrap(self, plaintext: bytes, context: Context) -> bytes: ...
    def unwrap(self, wrapped: bytes, context: Context) -> bytes: ...
    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        """The same plaintext wrapped under the provider's newest key version."""
        ...

    def rotate(self) -> str:
        """Creates a new key version for new wraps; returns its name. Old versions still unwrap."""
        ...

    def retire(self) -> None:
        """Old versions stop unwrapping (after everything was rewrapped)."""
        ...

    def refresh(self) -> None:
        """Picks up versions another process created or retired (a no-op for server-side keys)."""
        ...

    def destroy(self) -> None:
        """Destroys the key, every version: everything it wrapped becomes unreadable."""
        ...

    def close(self) -> None: ...


# ---- local --------------------------------------------------------------------------------


def _scrypt(passphrase: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=2**15, r=8, p=1, maxmem=64 * 1024 * 1024, dklen=32)


class LocalProvider:
    """Key-encryption keys in files `kek-vN.key` (mode 0600), each sealed with AES-256-GCM
    under a key derived with scrypt from the node's passphrase. Wrapped material is
    `b"L" || version (4 bytes) || nonce || ciphertext || tag`."""

    name = "local"

    def __init__(self, directory: str | Path, passphrase: bytes):
        if not passphrase:
            raise KeyUnavailable("the local key provider needs a passphrase (keys.passphrase_file or _env)")
        self.dir = Path(directory)
        self._passphrase = passphrase
        self._keks: dict[int, AESGCM] = {}
        self._load()

    def _files(self) -> dict[int, Path]:
        out = {}
        for p in self.dir.glob("kek-v*.key"):
            v = p.stem.removeprefix("kek-v")
            if v.isdigit():
                out[int(v)] = p
        return out

    def refresh(self) -> None:
        self._load()

    def _load(self) -> None:
        files = self._files()
        for gone in set(self._keks) - set(files):
            del self._keks[gone]
        for version, path in files.items():
            if version in self._keks:
                continue
            blob = path.read_bytes()
            salt, nonce, ct = blob[:16], blob[16 : 16 + _NONCE], blob[16 + _NONCE :]
            try:
                raw = AESGCM(_scrypt(self._passphrase, salt)).decrypt(nonce, ct, f"kek-v{version}".encode())
            except InvalidTag as e:
                raise KeyUnavailable(
                    f"{path} does not open with the configured passphrase (keys.passphrase_*)"
                ) from e
            self._keks[version] = AESGCM(raw)

    @property
    def version(self) -> int:
        if not self._keks:
            self._load()
        if not self._keks:
            raise KeyDestroyed(f"no key-encryption key in {self.dir}: it was destroyed or never created")
        return max(self._keks)

    def _write(self, version: int) -> None:
        salt, nonce, raw = os.urandom(16), os.urandom(_NONCE), AESGCM.generate_key(bit_length=256)
        sealed = AESGCM(_scrypt(self._passphrase, salt)).encrypt(nonce, raw, f"kek-v{version}".encode())
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".kek-v{version}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(salt + nonce + sealed)
        tmp.rename(self.dir / f"kek-v{version}.key")
        self._keks[version] = AESGCM(raw)

    @classmethod
    def create(cls, directory: str | Path, passphrase: bytes) -> LocalProvider:
        p = cls(directory, passphrase)
        if not p._keks:
            p._write(1)
        return p

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]:
        raw = AESGCM.generate_key(bit_length=256)
        return raw, self.wrap(raw, context)

    def wrap(self, plaintext: bytes, context: Context) -> bytes:
        v = self.version
        nonce = os.urandom(_NONCE)
        return (
            b"L"
            + struct.pack(">I", v)
            + nonce
            + self._keks[v].encrypt(nonce, plaintext, canonical_context(context))
        )

    def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        if wrapped[:1] != b"L" or len(wrapped) < 5 + _NONCE + 16:
            raise SealError("wrapped key material is not from the local key provider")
        (v,) = struct.unpack(">I", wrapped[1:5])
        if v not in self._keks:
            self._load()  # another process may have rotated
        kek = self._keks.get(v)
        if kek is None:
            raise KeyDestroyed(f"key-encryption key version {v} in {self.dir} was retired or destroyed")
        try:
            return kek.decrypt(wrapped[5 : 5 + _NONCE], wrapped[5 + _NONCE :], canonical_context(context))
        except InvalidTag as e:
            raise SealError("wrapped key material does not unwrap in this context") from e

    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        return self.wrap(self.unwrap(wrapped, context), context)

    def rotate(self) -> str:
        self._load()
        v = max(self._keks, default=0) + 1
        self._write(v)
        return f"v{v}"

    def retire(self) -> None:
        newest = self.version
        for v, path in self._files().items():
            if v < newest:
                _shred_file(path)
                self._keks.pop(v, None)

    def destroy(self) -> None:
        for path in self._files().values():
            _shred_file(path)
        self._keks.clear()

    def close(self) -> None:
        pass


def _shred_file(path: Path) -> None:
    """Overwrites, then unlinks (best effort on journaling or copy-on-write file systems)."""
    try:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    except FileNotFoundError:
        pass


# ---- AWS KMS ------------------------------------------------------------------------------


class AwsKmsProvider:
    """A symmetric KMS key (`key_id`: id, ARN or alias). GenerateDataKey, Encrypt, Decrypt and
    ReEncrypt, each with the encryption context; rotation is KMS on-demand rotation (KMS keeps
    old material, so old ciphertexts keep decrypting); destroy disables the key and schedules
    its deletion (7 days, the KMS minimum) so nothing decrypts from that moment."""

    name = "aws-kms"

    def __init__(self, key_id: str, region_name: str = "us-east-1", endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.key_id = key_id
        self._kms = boto3.client(
            "kms",
            region_name=region_name,
            endpoint_url=endpoint_url,
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"}),
        )

    def _call(self, op: str, **kw: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._kms, op)(**kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("DisabledException", "KMSInvalidStateException", "NotFoundException"):
                raise KeyDestroyed(
                    f"KMS key {self.key_id} is disabled, pending deletion or gone ({code})"
                ) from e
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise SealError("wrapped key material does not decrypt in this encryption context") from e
            if code == "AccessDeniedException" and op == "decrypt":
                raise SealError(
                    f"KMS key {self.key_id} did not wrap this material, or may not open it"
                ) from e
            raise KeyUnavailable(f"AWS KMS refused {op} on {self.key_id}: {code}") from e
        except BotoCoreError as e:
            raise KeyUnavailable(
                f"AWS KMS cannot be reached for {op} on {self.key_id}: {e}; nothing was written "
                "or opened with another key: retry once KMS answers"
            ) from e

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]:
        r = self._call(
            "generate_data_key", KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=dict(context)
        )
        return r["Plaintext"], r["CiphertextBlob"]

    def wrap(self, plaintext: bytes, context: Context) -> bytes:
        r = self._call("encrypt", KeyId=self.key_id, Plaintext=plaintext, EncryptionContext=dict(context))
        return r["CiphertextBlob"]

    def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        # KMS refuses to decrypt under a disabled key; checking first costs one call per cache
        # miss and holds with emulators that do not enforce it (moto's Decrypt does not).
        state = self._call("describe_key", KeyId=self.key_id)["KeyMetadata"].get("KeyState", "Enabled")
        if state != "Enabled":
            raise KeyDestroyed(f"KMS key {self.key_id} is {state}: it was shredded (residency keys shred)")
        r = self._call("decrypt", KeyId=self.key_id, CiphertextBlob=wrapped, EncryptionContext=dict(context))
        return r["Plaintext"]

    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        r = self._call(
            "re_encrypt",
            CiphertextBlob=wrapped,
            SourceKeyId=self.key_id,
            SourceEncryptionContext=dict(context),
            DestinationKeyId=self.key_id,
            DestinationEncryptionContext=dict(context),
        )
        return r["CiphertextBlob"]

    def _arn(self) -> str:
        return self._call("describe_key", KeyId=self.key_id)["KeyMetadata"]["KeyId"]

    def rotate(self) -> str:
        # KMS keeps the old material, so everything wrapped before still decrypts.
        arn = self._arn()
        self._call("rotate_key_on_demand", KeyId=arn)
        return f"on-demand rotation of {arn}"

    def retire(self) -> None:
        # KMS keeps old key material for as long as the key lives; nothing to retire.
        pass

    def refresh(self) -> None:
        pass

    def destroy(self) -> None:
        key = self._arn()
        self._call("disable_key", KeyId=key)
        self._call("schedule_key_deletion", KeyId=key, PendingWindowInDays=7)

    def close(self) -> None:
        self._kms.close()

    @classmethod
    def create_key(cls, alias: str, region_name: str = "us-east-1", endpoint_url: str | None = None) -> str:
        """Creates a symmetric key with `alias` (for `residency init` and the tests)."""
        import boto3

        kms = boto3.client("kms", region_name=region_name, endpoint_url=endpoint_url)
        key = kms.create_key(Description=f"residency {alias}")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=alias, TargetKeyId=key)
        return alias


# ---- OpenBao / Vault Transit --------------------------------------------------------------


class OpenBaoProvider:
    """A Transit key (`derived`, so the context is bound into every ciphertext). `datakey`,
    `encrypt`, `decrypt` and `rewrap` with the context; `rotate` adds a key version; `retire`
    raises `min_decryption_version` to the newest; `destroy` deletes the key."""

    name = "openbao"

    def __init__(self, address: str, token: str, key: str, mount: str = "transit", timeout: float = 5.0):
        import httpx

        self.key = key
        self.mount = mount
        self._http = httpx.Client(base_url=address, headers={"X-Vault-Token": token}, timeout=timeout)

    def _req(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            r = self._http.request(method, f"/v1/{self.mount}/{path}", json=body)
        except httpx.HTTPError as e:
            raise KeyUnavailable(
                f"OpenBao cannot be reached for {path}: {e.__class__.__name__}: {e}; nothing was "
                "written or opened with another key: retry once OpenBao answers"
            ) from e
        if r.status_code < 300:
            return r.json().get("data") or {} if r.content else {}
        errors = "; ".join(r.json().get("errors", [])) if r.content else ""
        if any(s in errors for s in ("not found", "no existing key", "disallowed by policy (too old)")):
            raise KeyDestroyed(f"Transit key {self.key} was destroyed or the version retired: {errors}")
        if r.status_code == 400 and ("authentication failed" in errors or "invalid" in errors):
            raise SealError("wrapped key material does not decrypt in this context")
        if r.status_code >= 500 or r.status_code in (429, 503):
            raise KeyUnavailable(f"OpenBao answered {r.status_code} for {path}: {errors}")
        raise KeyUnavailable(f"OpenBao refused {path} ({r.status_code}): {errors}")

    @staticmethod
    def _ctx(context: Context) -> str:
        return base64.b64encode(canonical_context(context)).decode()

    def ensure_key(self) -> None:
        self._req("POST", f"keys/{self.key}", {"type": "aes256-gcm96", "derived": True})

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]:
        d = self._req("POST", f"datakey/plaintext/{self.key}", {"context": self._ctx(context), "bits": 256})
        return base64.b64decode(d["plaintext"]), d["ciphertext"].encode()

    def wrap(self, plaintext: bytes, context: Context) -> bytes:
        d = self._req(
            "POST",
            f"encrypt/{self.key}",
            {"plaintext": base64.b64encode(plaintext).decode(), "context": self._ctx(context)},
        )
        return d["ciphertext"].encode()

    def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        d = self._req(
            "POST", f"decrypt/{self.key}", {"ciphertext": wrapped.decode(), "context": self._ctx(context)}
        )
        return base64.b64decode(d["plaintext"])

    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        d = self._req(
            "POST", f"rewrap/{self.key}", {"ciphertext": wrapped.decode(), "context": self._ctx(context)}
        )
        return d["ciphertext"].encode()

    def encrypt_many(self, items: list[tuple[bytes, Context]]) -> list[bytes]:
        """One call for many values (Transit `batch_input`)."""
        d = self._req(
            "POST",
            f"encrypt/{self.key}",
            {
                "batch_input": [
                    {"plaintext": base64.b64encode(p).decode(), "context": self._ctx(c)} for p, c in items
                ]
            },
        )
        return [r["ciphertext"].encode() for r in d["batch_results"]]

    def rotate(self) -> str:
        d = self._req("POST", f"keys/{self.key}/rotate")
        return f"v{d.get('latest_version', '?')}"

    def retire(self) -> None:
        latest = self._req("GET", f"keys/{self.key}")["latest_version"]
        self._req("POST", f"keys/{self.key}/config", {"min_decryption_version": latest})

    def refresh(self) -> None:
        pass

    def destroy(self) -> None:
        self._req("POST", f"keys/{self.key}/config", {"deletion_allowed": True})
        self._req("DELETE", f"keys/{self.key}")

    def close(self) -> None:
        self._http.close()


def open_provider(config: Any) -> KeyProvider:
    """The provider a node's `keys:` config names (`residency.server.config.node.KeysConfig`)."""
    if config.provider == "local":
        return LocalProvider(config.dir, config.passphrase)
    if config.provider == "aws-kms":
        return AwsKmsProvider(config.kms_key_id, config.aws_region, config.endpoint_url)
    if config.provider == "openbao":
        return OpenBaoProvider(config.address, config.token, config.transit_key, config.mount)
    raise ValueError(f"unknown key provider {config.provider!r}")
