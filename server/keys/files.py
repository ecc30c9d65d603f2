"""Key files on disk: written whole, durably and with mode 0600, never overwritten where they
must not be, and shredded (overwritten, then unlinked)."""

from __future__ import annotations

import os
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
