"""Sealing: a value opens only in its own context; the primary cannot open a region's copy."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from argon2 import PasswordHasher

from residency.server.core.policy.credentials import Verdict, VerifyLimits, hash_credential, verify_credential
from residency.server.core.sealing import SealError, field_aad
from residency.server.keys.keyring import Keyring
from residency.server.keys.providers.local import LocalProvider
from residency.server.keys.region import RegionKey


def provider(path):
    return LocalProvider.create(path, b"test passphrase")


@pytest.fixture(params=["x25519", "mlkem768-x25519"])
def keys(tmp_path, request):
    return {
        r: RegionKey.generate(r, tmp_path / r, provider(tmp_path / r), request.param)
        for r in ("cn-north", "ap-southeast-1")
    }


def test_a_sealed_value_opens_in_its_own_context_only(keys):
    sg = keys["ap-southeast-1"]
    dek, wrapped = sg.recipient.new_data_key("u-1")
    aad = field_aad("u-1", "email", "ap-southeast-1", 3, sg.key_id, format=2)
    sealed = dek.seal(b"li@example.cn", aad)
    opened = sg.open_data_key("u-1", sg.key_id, wrapped)
    assert opened.open(sealed, aad) == b"li@example.cn"
    moved = {
        "user": field_aad("u-2", "email", "ap-southeast-1", 3, sg.key_id, format=2),
        "field": field_aad("u-1", "phone", "ap-southeast-1", 3, sg.key_id, format=2),
        "region": field_aad("u-1", "email", "eu-west-1", 3, sg.key_id, format=2),
        "version": field_aad("u-1", "email", "ap-southeast-1", 2, sg.key_id, format=2),
    }
    for what, other in moved.items():
        with pytest.raises(SealError):
            opened.open(sealed, other)
        assert what


def test_a_data_key_moved_to_another_user_does_not_unwrap(keys):
    sg = keys["ap-southeast-1"]
    _, wrapped = sg.recipient.new_data_key("u-1")
    with pytest.raises(SealError):
        sg.open_data_key("u-2", sg.key_id, wrapped)


def test_the_primary_cannot_open_what_it_sealed_for_a_region(keys, tmp_path):
    primary, sg = keys["cn-north"], keys["ap-southeast-1"]
    _, wrapped = sg.recipient.new_data_key("u-1")
    # The primary holds its own key and the region's public key, nothing else.
    with pytest.raises(SealError):
        primary.open_data_key("u-1", sg.key_id, wrapped)
    impostor = RegionKey(
        "ap-southeast-1", RegionKey.load("cn-north", primary_dir(keys), provider(primary_dir(keys)))._raw
    )
    with pytest.raises(SealError):
        impostor.open_data_key("u-1", sg.key_id, wrapped)


def test_a_transit_key_wraps_many_users_data_keys_each_bound_to_its_user(keys):
    primary, sg = keys["cn-north"], keys["ap-southeast-1"]
    tk = sg.recipient.new_transit_key()
    wrapped = {u: tk.new_data_key(u) for u in ("u-1", "u-2")}
    aad = field_aad("u-1", "email", "ap-southeast-1", 1, sg.key_id, format=2)
    sealed = wrapped["u-1"][0].seal(b"li@example.cn", aad)
    opened = sg.open_data_key("u-1", sg.key_id, wrapped["u-1"][1], tk.id, tk.wrapped)
    assert opened.open(sealed, aad) == b"li@example.cn"
    # another user's DEK under the same transit key, or this DEK claimed for another user
    with pytest.raises(SealError):
        sg.open_data_key("u-2", sg.key_id, wrapped["u-1"][1], tk.id, tk.wrapped)
    # the transit key claimed under another id, or opened by a region it was not sent to
    with pytest.raises(SealError):
        sg.open_data_key("u-1", sg.key_id, wrapped["u-1"][1], "0" * 16, tk.wrapped)
    with pytest.raises(SealError):
        primary.open_transit_key(primary.key_id, tk.id, tk.wrapped)
    # one HPKE operation per transit key: the second user's DEK reuses the opened key
    assert sg.open_transit_key(sg.key_id, tk.id, tk.wrapped) is sg.open_transit_key(
        sg.key_id, tk.id, tk.wrapped
    )


def primary_dir(keys):
    return keys["cn-north"].dir


def test_local_data_keys_are_bound_to_their_user(tmp_path):
    ring = Keyring("cn-north", provider(tmp_path), tmp_path)
    wk = ring.active_wrapping_key()
    wrapped = wk.wrap("cn-north", "u-1", b"k" * 32)
    assert ring.wrapping_key(wk.id, wk.wrapped).unwrap("cn-north", "u-1", wrapped) == b"k" * 32
    with pytest.raises(SealError):
        wk.unwrap("cn-north", "u-2", wrapped)
    with pytest.raises(SealError):
        wk.unwrap("eu-west-1", "u-1", wrapped)


def test_region_key_file_is_private_and_needs_the_passphrase(tmp_path):
    RegionKey.generate("cn-north", tmp_path / "k", provider(tmp_path / "k"))
    assert (tmp_path / "k" / "region.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k" / "kek-v1.key").stat().st_mode & 0o777 == 0o600
    loaded = RegionKey.load("cn-north", tmp_path / "k", provider(tmp_path / "k"))
    assert loaded.key_id == RegionKey.load("cn-north", tmp_path / "k", provider(tmp_path / "k")).key_id
    from residency.server.core.errors import KeyUnavailable

    with pytest.raises(KeyUnavailable, match="passphrase"):
        LocalProvider(tmp_path / "k", b"wrong passphrase")


def test_credentials_hash_and_verify():
    stored = hash_credential("hunter2")
    assert b"hunter2" not in stored and stored.startswith(b"$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_credential("hunter2", stored) == Verdict(True)
    assert verify_credential("hunter3", stored) == Verdict(False)
    assert hash_credential("hunter2") != stored  # salted
    for nothing in (b"", b"$argon2id$garbage", b"plaintext"):  # no hash: verified, never a match
        assert verify_credential("", nothing) == Verdict(False)


def legacy_scrypt(secret: str, salt: bytes = b"0123456789abcdef") -> bytes:
    """The format before PHC strings, as the previous version wrote it."""
    return b"scrypt$" + salt + hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def test_a_legacy_scrypt_hash_verifies_and_asks_to_be_rehashed_only_on_a_match():
    assert verify_credential("hunter2", legacy_scrypt("hunter2")) == Verdict(True, rehash=True)
    assert verify_credential("hunter3", legacy_scrypt("hunter2")) == Verdict(False)


def test_a_hash_made_with_weaker_parameters_asks_to_be_rehashed():
    weaker = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("hunter2").encode()
    assert verify_credential("hunter2", weaker) == Verdict(True, rehash=True)
    assert verify_credential("hunter3", weaker) == Verdict(False)


def counting(limits: VerifyLimits) -> Callable[[str, str, float], tuple[str, float] | None]:
    """`limits.admit` over buckets kept in a dict, as the store keeps them."""
    held: dict[str, tuple[float, float]] = {}

    def admit(user_id: str, caller: str, now: float) -> tuple[str, float] | None:
        refused, taken = limits.admit(held, user_id, caller, now)
        held.update((b, (tokens, at)) for b, (tokens, at, _) in taken.items())
        return refused

    return admit


def test_token_buckets_refill_at_their_rate_and_a_refusal_takes_nothing():
    admit = counting(VerifyLimits.per_minute(user=2, caller=3))
    assert admit("u-1", "svc:a", 0.0) is None
    assert admit("u-1", "svc:b", 0.0) is None  # another caller: the same user's bucket
    assert admit("u-1", "svc:c", 0.0) == ("user", 30.0)
    assert admit("u-2", "svc:a", 0.0) is None
    assert admit("u-3", "svc:a", 0.0) is None
    assert admit("u-4", "svc:a", 0.0) == ("caller", 20.0)  # another user: the same caller
    assert admit("u-1", "svc:c", 30.0) is None  # one token back after 30 s


def test_a_bucket_counts_when_it_is_full_again_and_a_clock_gone_back_refills_nothing():
    limits = VerifyLimits.per_minute(user=2, caller=600)
    refused, taken = limits.admit({}, "u-1", "svc", 100.0)
    assert refused is None
    # 2 a minute: one token taken, full again 30 s later; 600 a minute: 0.1 s later.
    assert taken == {"user:u-1": (1.0, 100.0, 130.0), "caller:svc": (599.0, 100.0, 100.1)}
    held = {b: (t, at) for b, (t, at, _) in taken.items()}
    # The clock went back 20 s: nothing refilled, and the bucket stays counted at 100.
    refused, taken = limits.admit(held, "u-1", "svc", 80.0)
    assert refused is None and taken["user:u-1"] == (0.0, 100.0, 160.0)
    held = {b: (t, at) for b, (t, at, _) in taken.items()}
    assert limits.admit(held, "u-1", "svc", 90.0) == (("user", 30.0), {})
