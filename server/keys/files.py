"""Key files on disk: written whole, durably and with mode 0600, never overwritten where they
must not be, and shredded (overwritten, then unlinked)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from residency.server.core.errors import FailedPrecondition


class KeyExists(FailedPrecondition):
    """A key file that would be created is already there."""


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Writes a key file whole and durably, mode 0600: a temporary file, fsynced, then renamed
    over `path` (or, `exclusive`, linked to it only if no file is there yet), then the folder
    fsynced. A power cut leaves the old key or the new one, never none or half of one, and a
    reader never sees half a key. `exclusive` never overwrites: two processes creating one
    key version, or `init` run twice, cannot replace a key that exists."""
    # Named for this one write: two threads of a process writing one file at once (two key
    # events appended together) each have their own.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise KeyExists(
                    f"{path} exists: a key is never overwritten (move it away first only if you "
                    "mean to destroy what it protects)"
                ) from e
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def shred_file(path: Path) -> None:
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


def loose_permissions(*folders: Path) -> list[str]:
    """What in `folders` (a node's data and key folders) others than the node's user could read:
    folders should be 0700, files 0600 (the store, its WAL, the keyring, the keys; public keys,
    `*.pub`, may be read by anyone)."""
    problems = []
    for folder in dict.fromkeys(folders):
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".pub")
        for path in (folder, *files):
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                want = "700" if path.is_dir() else "600"
                problems.append(f"{path} is {mode:o}, readable beyond its owner: chmod {want} {path}")
    return problems


def exposed_secret(secret: Path, keys_dir: Path) -> str:
    """Why the file holding a key provider's passphrase or token is exposed, or "": readable by
    others, or kept in the key folder it protects (one copy or backup of the folder would then
    carry both the wrapped keys and what unwraps them)."""
    problems = []
    if secret.resolve().parent == keys_dir.resolve() or keys_dir.resolve() in secret.resolve().parents:
        problems.append(
            f"{secret} sits beside the keys it protects ({keys_dir}): keep it apart, e.g. in a "
            "Secret or another folder, so a copy of the key folder does not open them"
        )
    try:
        mode = secret.stat().st_mode & 0o777
    except OSError:
        mode = 0
    if mode & 0o077:
        problems.append(f"{secret} is {mode:o}, readable beyond its owner: chmod 600 {secret}")
    return "; ".join(problems)
