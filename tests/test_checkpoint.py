"""Signed checkpoints: C2SP signed notes with Ed25519, verified with the published key."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest

from residency.server.core.checkpoint import (
    Checkpoint,
    CheckpointError,
    LogSigner,
    fingerprint,
    open_note,
    parse_verifier_key,
    verify_note,
)
from residency.server.keys.logkey import create_log_key, load_log_key
from residency.server.keys.providers.local import LocalProvider

ROOT = hashlib.sha256(b"root").digest()


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> LogSigner:
    d = tmp_path_factory.mktemp("keys")
    return create_log_key("residency/cn-north", d, LocalProvider.create(d / "log", b"test"))


def test_a_checkpoint_is_origin_size_and_root_then_one_signature_line(signer: LogSigner):
    note = signer.sign(Checkpoint("residency/cn-north", 42, ROOT))
    body, sig = note.split("\n\n")
    assert body.split("\n") == ["residency/cn-north", "42", base64.b64encode(ROOT).decode()]
    assert sig.startswith("\u2014 residency/cn-north ") and sig.endswith("\n")
    raw = base64.b64decode(sig.split()[-1])
    name, keyhash, _ = parse_verifier_key(signer.verifier_key)
    assert raw[:4] == keyhash and len(raw) == 4 + 64
    assert open_note(note, signer.verifier_key) == Checkpoint("residency/cn-north", 42, ROOT)


def test_the_verifier_key_is_name_keyhash_and_typed_public_key(signer: LogSigner):
    name, hexhash, b64 = signer.verifier_key.split("+", 2)
    pub = base64.b64decode(b64)
    assert name == "residency/cn-north" and pub[0] == 1 and len(pub) == 33
    assert hexhash == hashlib.sha256(name.encode() + b"\n" + pub).digest()[:4].hex()


def test_the_private_key_file_is_readable_by_its_owner_only(tmp_path):
    provider = LocalProvider.create(tmp_path / "log", b"test")
    create_log_key("residency/eu-west-1", tmp_path, provider)
    assert stat.S_IMODE((tmp_path / "log.key").stat().st_mode) == 0o600
    signer = load_log_key(tmp_path / "log.key", provider)
    assert signer.verifier_key == (tmp_path / "log.pub").read_text().strip()


def test_a_forged_or_altered_checkpoint_is_refused(signer: LogSigner, tmp_path):
    note = signer.sign(Checkpoint("residency/cn-north", 42, ROOT))
    with pytest.raises(CheckpointError, match="forged or altered"):
        open_note(note.replace("\n42\n", "\n43\n"), signer.verifier_key)
    other = LogSigner.new("residency/cn-north")  # same name, another key
    with pytest.raises(CheckpointError, match="no signature"):
        open_note(other.sign(Checkpoint("residency/cn-north", 42, ROOT)), signer.verifier_key)
    with pytest.raises(CheckpointError):
        open_note("residency/cn-north\n42\n", signer.verifier_key)


# ---- interoperability: the published vectors of Go's sumdb/note and of C2SP signed-note ----

VECTORS = json.loads((Path(__file__).parent / "vectors" / "signed_note.json").read_text())


def test_signing_the_go_vector_reproduces_its_published_note_byte_for_byte():
    go = VECTORS["go"]
    signer = LogSigner.from_signer_key(go["signer_key"])  # Ed25519 signatures are deterministic
    assert signer.verifier_key == go["verifier_key"]
    assert signer.sign_text(go["text"]) == go["text"] + "\n" + go["signature_line"]


def test_go_and_c2sp_notes_verify_with_their_keys_and_cosignatures_are_passed_over():
    go, c2sp = VECTORS["go"], VECTORS["c2sp"]
    both = go["text"] + "\n" + go["signature_line"] + go["cosigner_signature_line"]
    assert verify_note(both, go["verifier_key"]) == go["text"]
    assert verify_note(both, go["cosigner_verifier_key"]) == go["text"]
    assert verify_note(c2sp["note"], c2sp["verifier_key"]) == "This is an example message.\n"
    with pytest.raises(CheckpointError, match="forged or altered"):
        verify_note(both.replace("cryptography", "cryptographY"), go["verifier_key"])
    with pytest.raises(CheckpointError, match="no signature"):
        verify_note(c2sp["note"], go["verifier_key"])


def test_a_signer_key_that_lies_about_its_hash_is_refused():
    go = VECTORS["go"]
    with pytest.raises(CheckpointError, match="hash does not match"):
        LogSigner.from_signer_key(go["signer_key"].replace("c74f20a3", "c74f20a4"))
    with pytest.raises(CheckpointError, match="hash does not match"):
        parse_verifier_key(go["verifier_key"].replace("c74f20a3", "c74f20a4"))


def test_a_fingerprint_names_the_key_not_its_name(signer: LogSigner, tmp_path):
    same_name = LogSigner.new("residency/cn-north")
    assert fingerprint(signer.verifier_key) != fingerprint(same_name.verifier_key)
    assert fingerprint(signer.verifier_key).startswith("sha256:")
