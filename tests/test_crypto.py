"""Sealing: a value opens only in its own context; the primary cannot open a region's copy."""

from __future__ import annotations

import pytest

from server.crypto import RegionKey, SealError, field_aad, hash_credential, verify_credential


@pytest.fixture
def keys(tmp_path):
    return {r: RegionKey.generate(r, tmp_path / r) for r in ("cn-north", "ap-southeast-1")}


def test_a_sealed_value_opens_in_its_own_context_only(keys):
    sg = keys["ap-southeast-1"]
    dek, wrapped = sg.recipient.new_data_key("u-1")
    aad = field_aad("u-1", "email", "ap-southeast-1", 3, sg.key_id)
    sealed = dek.seal(b"li@example.cn", aad)
    opened = sg.open_data_key("u-1", sg.key_id, wrapped)
    assert opened.open(sealed, aad) == b"li@example.cn"
    moved = {
        "user": field_aad("u-2", "email", "ap-southeast-1", 3, sg.key_id),
        "field": field_aad("u-1", "phone", "ap-southeast-1", 3, sg.key_id),
        "region": field_aad("u-1", "email", "eu-west-1", 3, sg.key_id),
        "version": field_aad("u-1", "email", "ap-southeast-1", 2, sg.key_id),
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
    impostor = RegionKey("ap-southeast-1", primary._private)
    with pytest.raises(SealError):
        impostor.open_data_key("u-1", sg.key_id, wrapped)


def test_local_data_keys_are_bound_to_their_user(keys):
    cn = keys["cn-north"]
    dek, wrapped = cn.new_local_data_key("u-1")
    aad = field_aad("u-1", "name", "cn-north", 1, cn.key_id)
    assert cn.open_local_data_key("u-1", wrapped).open(dek.seal(b"x", aad), aad) == b"x"
    with pytest.raises(SealError):
        cn.open_local_data_key("u-2", wrapped)


def test_region_key_file_is_private(tmp_path):
    RegionKey.generate("cn-north", tmp_path / "k")
    assert (tmp_path / "k" / "region.key").stat().st_mode & 0o777 == 0o600
    loaded = RegionKey.load("cn-north", tmp_path / "k")
    assert loaded.key_id == RegionKey.load("cn-north", tmp_path / "k").key_id


def test_credentials_hash_and_verify():
    stored = hash_credential("hunter2")
    assert b"hunter2" not in stored and stored.startswith(b"scrypt$")
    assert verify_credential("hunter2", stored)
    assert not verify_credential("hunter3", stored)
    assert hash_credential("hunter2") != stored  # salted
