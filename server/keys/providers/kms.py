"""The AWS KMS key provider: a symmetric KMS key, through boto3."""

from __future__ import annotations

from typing import Any

from residency.server.core.errors import KeyServiceDenied, KeyUnavailable
from residency.server.core.sealing import Context, KeyDestroyed, SealError


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
            if code in ("AccessDeniedException", "AccessDenied", "UnrecognizedClientException"):
                raise KeyServiceDenied(
                    f"AWS KMS denied {op} on {self.key_id} ({code}): the node's credentials or the "
                    "key's policy do not allow it; nothing was written or opened"
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
        # KMS itself refuses to decrypt under a disabled or deleted key (DisabledException,
        # KMSInvalidStateException: KeyDestroyed above); one call per cache miss, no more.
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

    # KMS names no versions of a key's material, and keeps every one for as long as the key
    # lives: nothing wrapped under it is ever under a version that `retire` would remove.
    def newest_version(self) -> str:
        return ""

    def version_of(self, wrapped: bytes) -> str:
        return ""

    def retire(self, keep: str = "") -> None:
        # KMS keeps old key material for as long as the key lives; nothing to retire.
        pass

    def refresh(self) -> None:
        pass

    def ping(self) -> None:
        self._call("describe_key", KeyId=self.key_id)

    def destroy(self) -> None:
        key = self._arn()
        self._call("disable_key", KeyId=key)
        self._call("schedule_key_deletion", KeyId=key, PendingWindowInDays=7)

    def close(self) -> None:
        self._kms.close()

    def ensure_key(self) -> None:
        """Creates the key its alias names unless the alias exists (a disabled or deleted key
        stays so: `KeyDestroyed`)."""
        try:
            self._call("describe_key", KeyId=self.key_id)
        except KeyDestroyed as e:
            if getattr(e.__cause__, "response", {}).get("Error", {}).get("Code") != "NotFoundException":
                raise
            key = self._call("create_key", Description=f"residency {self.key_id}")["KeyMetadata"]["KeyId"]
            self._call("create_alias", AliasName=self.key_id, TargetKeyId=key)

    @classmethod
    def create_key(cls, alias: str, region_name: str = "us-east-1", endpoint_url: str | None = None) -> str:
        """Creates a symmetric key with `alias` (for `residency init` and the tests)."""
        import boto3

        kms = boto3.client("kms", region_name=region_name, endpoint_url=endpoint_url)
        key = kms.create_key(Description=f"residency {alias}")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=alias, TargetKeyId=key)
        return alias
