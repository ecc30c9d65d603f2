"""A region's blind-index keys (issue 18): HMAC-SHA256 keys, kept in `index.key` in the key
folder only wrapped by the region's key provider (like `region.key`), one line per version.

One version is `active` (finds and writes use it); during a rotation a second one is
`building` (writes key under both, a background rebuild fills it in); when the rebuild is
complete the building one becomes active and the old one is dropped. Raw keys never leave
this module: callers get digests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from residency.server.core.errors import FailedPrecondition, KeyUnavailable
from residency.server.core.lookup import index_input
from residency.server.keys.files import shred_file, write_private
from residency.server.keys.providers import KeyProvider

FILE = "index.key"
# What a version's fingerprint is the keyed hash of (no lookup field's input has this form).
_FINGERPRINT = b"residency index key fingerprint\x00"
ACTIVE, BUILDING = "active", "building"
# What a key's page-cursor subkey is derived from, and the length a cursor is padded to (a
# user id's longest: `core.schema.USER_ID`).
CURSOR_INPUT = b"\x00residency find page cursor"
CURSOR_BYTES = 128


def _context(region: str, version: int) -> dict[str, str]:
    return {"region": region, "purpose": "index-key", "version": str(version)}


class IndexKey:
    """One version of the index key: it answers digests, never its bytes."""

    __slots__ = ("version", "_raw")

    def __init__(self, version: int, raw: bytes):
        self.version, self._raw = version, raw

    def digest(self, field: str, normalized: str) -> bytes:
        """HMAC-SHA256(key, field || 0x00 || normalised value)."""
        return hmac.new(self._raw, index_input(field, normalized), hashlib.sha256).digest()

    def _cursors(self) -> AESGCM:
        # A subkey of its own: an index input starts with a field name, never with 0x00.
        return AESGCM(hmac.new(self._raw, CURSOR_INPUT, hashlib.sha256).digest())

    def seal_cursor(self, context: bytes, position: str) -> bytes:
        """`position` (a user id) sealed with AES-GCM under a subkey, bound to `context`, padded
        to one length so that the sealed form says nothing of the id either."""
        nonce = os.urandom(12)
        padded = position.encode().ljust(CURSOR_BYTES, b"\x00")
        return nonce + self._cursors().encrypt(nonce, padded, context)

    def open_cursor(self, context: bytes, sealed: bytes) -> str | None:
        """The position `seal_cursor` sealed with this key and `context`, or None (forged,
        changed, or another key's or find's)."""
        try:
            padded = self._cursors().decrypt(sealed[:12], sealed[12:], context)
            return padded.rstrip(b"\x00").decode()
        except (InvalidTag, ValueError, UnicodeDecodeError):
            return None

    def fingerprint(self) -> bytes:
        """HMAC-SHA256(key, a constant): stored with the rows of this version, so that rows made
        under another key of the same number (`index.key` lost or restored older) are found."""
        return hmac.new(self._raw, _FINGERPRINT, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class _Line:
    version: int
    state: str
    wrapped: bytes


class IndexKeys:
    """The versions in `index.key`, each opened once through the provider and kept in memory."""

    def __init__(self, region: str, directory: str | Path, provider: KeyProvider):
        self.region, self.path, self.provider = region, Path(directory) / FILE, provider
        # Opened keys by (version, wrapped form): a version rewrapped, or made anew after the
        # file was lost, is opened again.
        self._open: dict[tuple[int, bytes], IndexKey] = {}
        # The file as last read or written, and its stat when it was: every write batch and
        # find asks for the keys, and reads the file again only when it changed. Another
        # front end of the region (same keys folder, one store) may have rotated them.
        self._read: list[_Line] | None = None
        self._seen: tuple[int, int, int] | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _lines(self) -> list[_Line]:
        stamp = self._stamp()
        if self._read is None or stamp != self._seen:
            self._read, self._seen = self._load(), stamp
            held = {(x.version, x.wrapped) for x in self._read}
            self._open = {k: v for k, v in self._open.items() if k in held}  # none kept past its file
        return list(self._read)

    def _load(self) -> list[_Line]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            out = []
            for line in text.splitlines():
                version, state, b64 = line.split()
                if state not in (ACTIVE, BUILDING):
                    raise ValueError(f"state {state!r}")
                out.append(_Line(int(version), state, base64.b64decode(b64, validate=True)))
            return out
        except (ValueError, binascii.Error) as e:
            raise KeyUnavailable(
                f"the index key file {self.path} cannot be read ({type(e).__name__}); restore it from "
                "a backup, or remove it and rotate the index key (`residency keys rotate-index`) "
                "to rebuild the index"
            ) from e

    def _write(self, lines: list[_Line]) -> None:
        text = "".join(f"{x.version} {x.state} {base64.b64encode(x.wrapped).decode()}\n" for x in lines)
        write_private(self.path, text.encode())
        self._read, self._seen = list(lines), self._stamp()

    def _key(self, line: _Line) -> IndexKey:
        key = self._open.get((line.version, line.wrapped))
        if key is None:
            raw = self.provider.unwrap(line.wrapped, _context(self.region, line.version))
            key = self._open[(line.version, line.wrapped)] = IndexKey(line.version, raw)
        return key

    def _new_line(self, version: int, state: str) -> _Line:
        raw = os.urandom(32)
        line = _Line(version, state, self.provider.wrap(raw, _context(self.region, version)))
        self._open[(version, line.wrapped)] = IndexKey(version, raw)
        return line

    def current(self) -> list[IndexKey]:
        """The active version first, then the building one if a rotation is under way. The
        first call on a node without `index.key` makes version 1."""
        lines = self._lines()
        if not lines:
            lines = [self._new_line(1, ACTIVE)]
            self._write(lines)
        lines.sort(key=lambda x: x.state != ACTIVE)
        return [self._key(x) for x in lines]

    def versions(self) -> tuple[int, int]:
        """(active version, building version or 0), read without the provider (0, 0: none yet)."""
        lines = self._load()
        active = next((x.version for x in lines if x.state == ACTIVE), 0)
        return active, next((x.version for x in lines if x.state == BUILDING), 0)

    def start_rotation(self) -> int:
        """A new version, `building`; returns its number. Refused while one is building."""
        # From the file, not memory: a rotation of the region's key rewraps it in place.
        lines = self._load() or [self._new_line(1, ACTIVE)]
        if any(x.state == BUILDING for x in lines):
            raise FailedPrecondition(
                f"the index key of {self.region} is already being rotated; wait until its rebuild "
                "completes (`residency status` shows its progress)"
            )
        new = self._new_line(max(x.version for x in lines) + 1, BUILDING)
        self._write([*lines, new])
        return new.version

    def finish_rotation(self) -> int:
        """The building version becomes the active one and the old one is forgotten; returns the
        old version (whose index rows the caller drops)."""
        lines = self._load()
        old = next(x for x in lines if x.state == ACTIVE)
        new = next(x for x in lines if x.state == BUILDING)
        self._write([_Line(new.version, ACTIVE, new.wrapped)])
        self._open = {k: v for k, v in self._open.items() if k[0] != old.version}
        return old.version

    def rewrap(self) -> None:
        """Every version rewrapped under the provider's newest key version (rotation and
        retirement of the region's key)."""
        if lines := self._load():
            self._write(
                [
                    _Line(
                        x.version, x.state, self.provider.rewrap(x.wrapped, _context(self.region, x.version))
                    )
                    for x in lines
                ]
            )


def shred_index_keys(directory: Path) -> None:
    """With the region's key: the index keys are under it, and unreadable once it is gone."""
    shred_file(directory / FILE)
