"""The transfer log's signing key at rest: wrapped by the node's provider under a key of its
own (local key files, AWS KMS on moto's server, OpenBao Transit), opened only there, turned
by a rotation, left by a shred, and a raw `log.key` of an older deployment wrapped in place."""

from __future__ import annotations

import base64
import logging
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from residency.server.config.keys import KeysConfig
from residency.server.core.checkpoint import Checkpoint, LogSigner, open_note
from residency.server.core.errors import ConfigError, KeyServiceDenied, KeyUnavailable
from residency.server.core.sealing import KeyDestroyed, SealError
from residency.server.keys import lifecycle
from residency.server.keys.logkey import create_log_key, load_log_key, open_log_key
from residency.server.keys.providers import open_log_provider, open_provider
from residency.server.keys.providers.kms import AwsKmsProvider
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.region import RegionKey
from tests.conftest import BAO_TOKEN

NAME = "residency/ap-southeast-1"
REGION = "ap-southeast-1"


def keys_config(name: str, d: Path, request: pytest.FixtureRequest | None = None) -> KeysConfig:
    """A region's `keys:` with a fresh key of its own in a real key service."""
    tag = uuid.uuid4().hex[:12]
    if name == "local":
        return KeysConfig("local", d, passphrase=f"passphrase {tag}".encode())
    assert request is not None, "a key service's fixture is needed"
    if name == "aws-kms":
        url = request.getfixturevalue("kms_endpoint")
        alias = AwsKmsProvider.create_key(f"alias/t-{tag}", endpoint_url=url)
        return KeysConfig("aws-kms", d, kms_key_id=alias, endpoint_url=url)
    address = request.getfixturevalue("bao_address")
    return KeysConfig("openbao", d, address=address, token=BAO_TOKEN, transit_key=f"t-{tag}")


def region_provider(c: KeysConfig):
    if c.provider == "local":
        return LocalProvider.create(c.dir, c.passphrase)
    p = open_provider(c)
    if hasattr(p, "ensure_key"):
        p.ensure_key()
    return p


def init_keys(c: KeysConfig) -> LogSigner:
    """As `residency init` does: the region key, then the log key under its own key."""
    region = region_provider(c)
    RegionKey.generate(REGION, c.dir, region, "x25519")
    region.close()
    log_keys = open_log_provider(c, create=True)
    try:
        return create_log_key(NAME, c.dir, log_keys)
    finally:
        log_keys.close()


def signs(signer: LogSigner, c: KeysConfig) -> bool:
    pinned = (c.dir / "log.pub").read_text().strip()
    note = signer.sign(Checkpoint(NAME, 1, b"\x00" * 32))
    return signer.verifier_key == pinned and open_note(note, pinned).size == 1


@pytest.mark.parametrize("name", ["local", "aws-kms", "openbao"])
def test_the_log_key_is_kept_wrapped_and_outlives_a_shred_of_the_region_key(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
):
    c = keys_config(name, tmp_path / "keys", request)
    signer = init_keys(c)
    stored = (c.dir / "log.key").read_bytes()
    raw = signer._private.private_bytes_raw()
    assert raw not in stored and base64.b64encode(raw) not in stored
    assert (c.dir / "log.key").stat().st_mode & 0o777 == 0o600
    assert signs(open_log_key(c.dir / "log.key", c), c)
    # The region's provider key does not open it: it is not under that key.
    region = open_provider(c)
    with pytest.raises((SealError, KeyDestroyed, KeyUnavailable, KeyServiceDenied)):
        load_log_key(c.dir / "log.key", region)
    # A shred destroys the region's key, and leaves the log key's.
    lifecycle.shred(REGION, region, c.dir)
    region.close()
    assert not (c.dir / "region.key").exists()
    assert signs(open_log_key(c.dir / "log.key", c), c)


@pytest.mark.parametrize("name", ["local", "aws-kms", "openbao"])
def test_a_log_key_taken_elsewhere_or_renamed_does_not_open(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
):
    c = keys_config(name, tmp_path / "keys", request)
    init_keys(c)
    # Copied to another deployment (another passphrase, KMS key or Transit key): nothing opens.
    other = keys_config(name, tmp_path / "other", request)
    init_keys(other)
    (other.dir / "log.key").write_bytes((c.dir / "log.key").read_bytes())
    with pytest.raises((SealError, KeyDestroyed, KeyUnavailable, KeyServiceDenied)):
        open_log_key(other.dir / "log.key", other)
    # Edited to claim another node's log: the name is bound into the wrapping.
    text = (c.dir / "log.key").read_text().replace(NAME, "residency/cn-north", 1)
    (c.dir / "log.key").write_text(text)
    with pytest.raises(SealError):
        open_log_key(c.dir / "log.key", c)


def test_a_raw_log_key_is_wrapped_in_place_once_and_the_log_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    c = keys_config("local", tmp_path / "keys")
    c.dir.mkdir()
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes_raw()
    (c.dir / "log.pub").write_text(LogSigner(NAME, private).verifier_key + "\n")
    # A raw key that is not the pinned one (put there by someone who may write the folder) is
    # refused, and left as it is: the node would sign checkpoints nobody can verify.
    planted = f"{NAME}\n{base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw()).decode()}\n"
    (c.dir / "log.key").write_text(planted)
    with pytest.raises(KeyUnavailable, match="is not the key of .*log.pub"):
        open_log_key(c.dir / "log.key", c)
    assert (c.dir / "log.key").read_text() == planted
    (c.dir / "log.key").write_text(f"{NAME}\n{base64.b64encode(raw).decode()}\n")
    (c.dir / "log.key").chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="residency.keys"):
        assert signs(open_log_key(c.dir / "log.key", c), c)
    assert (
        "was stored raw: wrapped in place" in caplog.text
        and base64.b64encode(raw).decode() not in caplog.text
    )
    stored = (c.dir / "log.key").read_bytes()
    assert base64.b64encode(raw) not in stored and (c.dir / "log.key").stat().st_mode & 0o777 == 0o600
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="residency.keys"):
        assert signs(open_log_key(c.dir / "log.key", c), c)
    assert not caplog.text  # once


def test_rotation_turns_the_log_keys_own_key_and_retire_leaves_only_the_new_version(tmp_path: Path):
    c = keys_config("local", tmp_path / "keys")
    init_keys(c)
    region = LocalProvider(c.dir, c.passphrase)
    log_keys = open_log_provider(c)
    lifecycle.rotate(REGION, region, c.dir, log_keys=log_keys)
    lifecycle.retire(REGION, region, c.dir, log_keys=log_keys)
    assert sorted(p.name for p in c.dir.glob("log-kek-v*.key")) == ["log-kek-v2.key"]
    assert sorted(p.name for p in c.dir.glob("kek-v*.key")) == ["kek-v2.key"]
    assert signs(open_log_key(c.dir / "log.key", c), c)


def test_a_kms_key_named_by_id_needs_the_log_keys_own_key_named(tmp_path: Path):
    c = KeysConfig("aws-kms", tmp_path, kms_key_id="1234abcd-12ab-34cd-56ef-1234567890ab")
    with pytest.raises(ConfigError, match="set 'keys.log_kms_key_id'"):
        open_log_provider(c)


def test_the_log_key_goes_under_the_kms_key_the_config_names(tmp_path: Path, kms_endpoint: str):
    """`log_kms_key_id` names the log key's own KMS key: nothing is created, and a log key wrapped
    under it does not open under the region's key."""
    region = AwsKmsProvider.create_key(f"alias/r-{uuid.uuid4().hex[:8]}", endpoint_url=kms_endpoint)
    own = AwsKmsProvider.create_key(f"alias/l-{uuid.uuid4().hex[:8]}", endpoint_url=kms_endpoint)
    c = KeysConfig("aws-kms", tmp_path, kms_key_id=region, log_kms_key_id=own, endpoint_url=kms_endpoint)
    provider = open_log_provider(c, create=True)
    assert provider.key_id == own
    signer = create_log_key("test", tmp_path, provider)
    provider.close()
    assert open_log_key(tmp_path / "log.key", c).verifier_key == signer.verifier_key
    wrong = replace(c, log_kms_key_id=region)
    # (moto answers a Decrypt under the wrong key AccessDenied, as AWS does for a key the
    # ciphertext was not made with when the caller may use both)
    with pytest.raises((KeyServiceDenied, SealError)):
        open_log_key(tmp_path / "log.key", wrong)
