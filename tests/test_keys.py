"""One conformance suite for every key provider, against real servers: local key files,
AWS KMS (moto's server, over HTTP) and OpenBao Transit (`bao server -dev`)."""

from __future__ import annotations

import re
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from residency.server.core.errors import FailedPrecondition, KeyServiceDenied, KeyUnavailable
from residency.server.core.sealing import DataKey, KeyDestroyed, SealError, field_aad
from residency.server.keys.files import KeyExists
from residency.server.keys.indexkey import IndexKeys
from residency.server.keys.keyring import Keyring
from residency.server.keys.lifecycle import append_event, read_events
from residency.server.keys.providers import KeyProvider
from residency.server.keys.providers.kms import AwsKmsProvider
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.providers.openbao import OpenBaoProvider
from residency.server.keys.region import RecipientKey, RegionKey
from tests.conftest import BAO_TOKEN, enable_transit, moto_kms, openbao

PROVIDERS = ["local", "aws-kms", "openbao"]
CTX = {"user": "u-1", "region": "ap-southeast-1", "purpose": "wrapping-key"}


class MotoKms(AwsKmsProvider):
    """The KMS provider against moto's server, whose Decrypt does not refuse a disabled key as
    KMS does (DisabledException): the emulator's gap is closed here, in the tests, with one
    DescribeKey first. That KMS's own refusal becomes KeyDestroyed is tested in
    tests/test_key_services.py against a server that answers as KMS does."""

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        state = self._kms.describe_key(KeyId=self.key_id)["KeyMetadata"].get("KeyState", "Enabled")
        if state != "Enabled":
            raise KeyDestroyed(f"KMS key {self.key_id} is {state}")
        return super().unwrap(wrapped, context)


def make(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> KeyProvider:
    """A provider with a fresh key of its own."""
    if name == "local":
        return LocalProvider.create(tmp_path / "keys", b"conformance passphrase")
    if name == "aws-kms":
        url = request.getfixturevalue("kms_endpoint")
        alias = AwsKmsProvider.create_key(f"alias/t-{uuid.uuid4().hex[:12]}", endpoint_url=url)
        return MotoKms(alias, endpoint_url=url)
    address = request.getfixturevalue("bao_address")
    p = OpenBaoProvider(address, BAO_TOKEN, f"t-{uuid.uuid4().hex[:12]}")
    p.ensure_key()
    return p


@pytest.fixture(params=PROVIDERS)
def provider(request, tmp_path):
    p = make(request.param, tmp_path, request)
    yield p
    p.close()


def test_a_data_key_unwraps_in_its_own_context(provider: KeyProvider):
    raw, wrapped = provider.new_data_key(CTX)
    assert len(raw) == 32 and raw not in wrapped
    assert provider.unwrap(wrapped, CTX) == raw
    assert provider.unwrap(provider.wrap(b"k" * 32, CTX), CTX) == b"k" * 32


@pytest.mark.parametrize("moved", ["user", "region", "purpose"])
def test_wrapped_key_moved_to_another_context_does_not_unwrap(provider: KeyProvider, moved: str):
    _, wrapped = provider.new_data_key(CTX)
    with pytest.raises(SealError):
        provider.unwrap(wrapped, {**CTX, moved: "other"})


def test_a_sealed_field_moved_to_another_user_field_region_or_version_does_not_open(
    provider: KeyProvider, tmp_path: Path
):
    wk = Keyring("cn-north", provider, tmp_path).active_wrapping_key()
    raw = b"d" * 32
    wrapped = wk.wrap("cn-north", "u-1", raw)
    sealed = DataKey(raw).seal(b"li@example.cn", field_aad("u-1", "email", "cn-north", 3, wk.id, format=2))
    # A fresh keyring (nothing cached) asks the provider for the wrapping key.
    again = Keyring("cn-north", provider, tmp_path).wrapping_key(wk.id, wk.wrapped)
    dek = DataKey(again.unwrap("cn-north", "u-1", wrapped))
    assert dek.open(sealed, field_aad("u-1", "email", "cn-north", 3, wk.id, format=2)) == b"li@example.cn"
    for moved in (
        ("u-2", "email", "cn-north", 3),
        ("u-1", "phone", "cn-north", 3),
        ("u-1", "email", "eu-west-1", 3),
        ("u-1", "email", "cn-north", 2),
    ):
        with pytest.raises(SealError):
            dek.open(sealed, field_aad(*moved, wk.id, format=2))
    with pytest.raises(SealError):
        again.unwrap("cn-north", "u-2", wrapped)
    with pytest.raises(SealError):  # a wrapping key claimed under another id
        Keyring("cn-north", provider, tmp_path).wrapping_key("other", wk.wrapped)


def test_rotation_keeps_old_versions_until_retired(provider: KeyProvider):
    raw, old = provider.new_data_key(CTX)
    provider.rotate()
    assert provider.unwrap(old, CTX) == raw  # old versions decrypt until retired
    new = provider.rewrap(old, CTX)
    assert new != old and provider.unwrap(new, CTX) == raw
    provider.retire()
    assert provider.unwrap(new, CTX) == raw
    if provider.name != "aws-kms":  # KMS keeps old key material for the key's lifetime
        with pytest.raises(KeyDestroyed):
            provider.unwrap(old, CTX)


def test_wrapped_material_names_its_version_so_retire_can_tell_what_is_left_under_an_old_one(
    provider: KeyProvider,
):
    _, old = provider.new_data_key(CTX)
    before = provider.newest_version()
    rotated = provider.rotate()
    _, new = provider.new_data_key(CTX)
    if provider.name == "aws-kms":  # names no versions, and never retires one: nothing is old
        assert (before, provider.newest_version(), provider.version_of(old)) == ("", "", "")
        return
    assert (before, provider.newest_version(), rotated) == ("v1", "v2", "v2")
    assert (provider.version_of(old), provider.version_of(new)) == ("v1", "v2")
    assert provider.version_of(provider.rewrap(old, CTX)) == "v2"
    assert provider.version_of(b"") == provider.version_of(b"not wrapped material") == ""


def test_a_destroyed_key_unwraps_nothing(provider: KeyProvider):
    _, wrapped = provider.new_data_key(CTX)
    provider.destroy()
    with pytest.raises(KeyDestroyed):
        provider.unwrap(wrapped, CTX)


def test_the_region_private_key_is_kept_only_wrapped_by_the_provider(
    provider: KeyProvider, tmp_path: Path, request
):
    key = RegionKey.generate("ap-southeast-1", tmp_path / "rk", provider, "mlkem768-x25519")
    stored = (tmp_path / "rk" / "region.key").read_bytes()
    assert key._raw not in stored
    assert (tmp_path / "rk" / "region.key").stat().st_mode & 0o777 == 0o600
    assert RegionKey.load("ap-southeast-1", tmp_path / "rk", provider).key_id == key.key_id
    # Another region's provider (the primary's, say) cannot open it: its key does not match
    # (SealError), or, for a KMS key in another account, KMS denies it (KeyServiceDenied).
    other = make(provider.name, tmp_path / "other", request)
    with pytest.raises((SealError, KeyServiceDenied)):
        RegionKey.load("ap-southeast-1", tmp_path / "rk", other)
    # The public half seals; only the region opens.
    recipient = RecipientKey.load("ap-southeast-1", tmp_path / "rk" / "region.pub")
    _, wrapped_dek = recipient.new_data_key("u-1")
    assert key.open_data_key("u-1", key.key_id, wrapped_dek)


@pytest.mark.parametrize("name", ["aws-kms", "openbao"])
def test_a_key_service_that_is_down_is_unavailable_and_nothing_falls_back(name: str, tmp_path: Path):
    svc = moto_kms(tmp_path) if name == "aws-kms" else openbao(tmp_path)
    svc.start()
    try:
        if name == "aws-kms":
            p: KeyProvider = AwsKmsProvider(
                AwsKmsProvider.create_key("alias/down", endpoint_url=svc.url), endpoint_url=svc.url
            )
        else:
            enable_transit(svc.url)
            p = OpenBaoProvider(svc.url, BAO_TOKEN, "down")
            p.ensure_key()
        raw, wrapped = p.new_data_key(CTX)
    finally:
        svc.stop()
    with pytest.raises(KeyUnavailable):
        p.new_data_key(CTX)
    with pytest.raises(KeyUnavailable):
        p.unwrap(wrapped, CTX)
    p.close()


def test_key_config_is_validated_at_start_naming_the_key(tmp_path: Path, monkeypatch):
    from residency.server.config.node import load_config
    from residency.server.core.errors import ConfigError

    base = (
        "region: cn-north\nrole: primary\nlisten: 127.0.0.1:1\ntls: {cert: c, key: k, ca: a}\n"
        "data_dir: d\nschema: s\nrules: r\naccess: a\n"
    )
    cases = {
        "keys: {provider: vault, dir: k}": "'keys.provider' must be one of",
        "keys: {provider: local, dir: k}": "'keys.passphrase_file' or 'keys.passphrase_env' is required",
        "keys: {provider: local, dir: k, passphrase_env: RT_UNSET}": "RT_UNSET is not set",
        "keys: {provider: aws-kms, dir: k}": "'keys.kms_key_id' is required",
        "keys: {provider: openbao, dir: k, address: 'x', token_env: P}": "'keys.transit_key' is required",
        "keys: {provider: local, dir: k, passphrase_env: P, kem: rsa}": "'keys.kem' must be one of",
        "keys: {provider: local, dir: k, passphrase_env: P, mount: x}": "unknown key(s) ['mount']",
    }
    monkeypatch.delenv("RT_UNSET", raising=False)
    monkeypatch.setenv("P", "a passphrase")
    for keys, expected in cases.items():
        (tmp_path / "n.yaml").write_text(base + keys + "\n")
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(tmp_path / "n.yaml")
    (tmp_path / "n.yaml").write_text(base + "keys: {provider: local, dir: k, passphrase_env: P}\n")
    assert load_config(tmp_path / "n.yaml").keys.passphrase == b"a passphrase"  # read once, here


def test_a_key_version_is_created_once_even_by_two_rotations_at_once(tmp_path: Path):
    """Two processes rotating the same local provider both try to write kek-v2.key: one
    creates it, the other is refused and keeps nothing it could have wrapped under it."""
    a = LocalProvider.create(tmp_path / "keys", b"passphrase")
    b = LocalProvider(tmp_path / "keys", b"passphrase")
    assert b.version == 1
    # b read the folder (v1 only), then a rotated before b wrote: b's write comes second.
    b._load = lambda: None  # type: ignore[method-assign]
    a.rotate()
    written = (tmp_path / "keys" / "kek-v2.key").read_bytes()
    with pytest.raises(KeyExists, match="never overwritten"):
        b.rotate()
    assert (tmp_path / "keys" / "kek-v2.key").read_bytes() == written
    assert stat.S_IMODE((tmp_path / "keys" / "kek-v2.key").stat().st_mode) == 0o600
    assert not list((tmp_path / "keys").glob(".*.tmp"))  # nothing half-written is left behind


def test_key_events_appended_at_once_by_one_processs_threads_are_all_kept(tmp_path: Path):
    """A rewrap and an index key rotation of a running node finish together, each appending its
    event to keyring.json from a thread (found by the fuzz suite: one failed INTERNAL, its
    temporary file taken by the other): every event is kept, nothing is left half-written."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: append_event(tmp_path, "rewrapped", "operator", f"n{i}"), range(200)))
    assert sorted(e["detail"] for e in read_events(tmp_path)) == sorted(f"n{i}" for i in range(200))
    assert stat.S_IMODE((tmp_path / "keyring.json").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_index_key_is_kept_only_wrapped_by_the_provider_and_survives_its_rotation(
    provider: KeyProvider, tmp_path: Path
):
    """Blind-index keys (issue 18): `index.key` holds each version wrapped by the region's
    provider, bound to region and version; reopened, the same digests; a rotation of the
    provider's key rewraps it without changing them; a rotation of the index key adds a
    building version and its switch drops the old one."""
    keys = IndexKeys("cn-north", tmp_path, provider)
    (v1,) = keys.current()
    digest = v1.digest("email", "li@example.cn")
    assert digest != v1.digest("phone", "li@example.cn") and len(digest) == 32
    text = (tmp_path / "index.key").read_text()
    assert re.fullmatch(r"1 active [A-Za-z0-9+/=]+\n", text)
    assert stat.S_IMODE((tmp_path / "index.key").stat().st_mode) == 0o600
    assert IndexKeys("cn-north", tmp_path, provider).current()[0].digest("email", "li@example.cn") == digest
    with pytest.raises((SealError, KeyUnavailable)):  # another region's context does not unwrap it
        IndexKeys("eu-west-1", tmp_path, provider).current()
    provider.rotate()
    keys.rewrap()
    assert (tmp_path / "index.key").read_text() != text
    assert IndexKeys("cn-north", tmp_path, provider).current()[0].digest("email", "li@example.cn") == digest
    assert keys.start_rotation() == 2 and keys.versions() == (1, 2)
    with pytest.raises(FailedPrecondition, match="already being rotated"):
        keys.start_rotation()
    active, building = keys.current()
    assert (active.version, building.version) == (1, 2)
    assert building.digest("email", "li@example.cn") != digest
    assert keys.finish_rotation() == 1 and keys.versions() == (2, 0)
    assert [k.version for k in IndexKeys("cn-north", tmp_path, provider).current()] == [2]


def test_a_retire_keeps_the_version_named_and_never_lets_a_retired_one_decrypt_again(provider: KeyProvider):
    """A retire keeps the version its check went by: a newer one (another front end's
    rotation since) and that one stay. A retire that comes late, naming an older version
    than one retired since, brings nothing back (OpenBao's min_decryption_version)."""
    _, under_v1 = provider.new_data_key(CTX)
    v2 = provider.rotate()
    raw, under_v2 = provider.new_data_key(CTX)
    v3 = provider.rotate()  # the other front end's
    provider.retire(keep=v2)
    assert provider.unwrap(under_v2, CTX) == raw
    if provider.name == "aws-kms":  # KMS keeps old key material for the key's lifetime
        return
    with pytest.raises(KeyDestroyed):
        provider.unwrap(under_v1, CTX)
    provider.retire(keep=v3)
    provider.retire(keep=v2)  # late
    with pytest.raises(KeyDestroyed):
        provider.unwrap(under_v2, CTX)


def test_a_retire_counts_the_data_keys_under_older_versions_only(tmp_path: Path):
    """A version newer than the one the retire checks by is another front end's rotation
    since: its data keys stay readable, and are no reason to refuse. Copies' keys (under the
    region key) are under no provider version."""
    keyring = Keyring("cn-north", LocalProvider.create(tmp_path / "k", b"passphrase"), tmp_path)

    def under(version: int) -> bytes:  # a local provider's wrapped key, as far as its header says
        return b"L" + version.to_bytes(4, "big") + bytes(28)

    in_use = [("wk-1", under(1), 3), ("wk-2", under(2), 4), ("wk-3", under(3), 5), ("hpke:k1", under(1), 9)]
    assert keyring.old_versions(in_use, "v2") == {"v1": 3}
    assert keyring.old_versions(in_use, "v3") == {"v1": 3, "v2": 4}
