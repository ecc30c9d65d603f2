"""The local key provider: key-encryption keys in files on disk, each sealed under a key
derived with scrypt from the node's passphrase (the embedded default)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from residency.server.core.errors import KeyUnavailable
from residency.server.core.sealing import NONCE, Context, KeyDestroyed, SealError, canonical_context
from residency.server.keys.files import shred_file, write_private


def _scrypt(passphrase: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=2**15, r=8, p=1, maxmem=64 * 1024 * 1024, dklen=32)


class LocalProvider:
    """Key-encryption keys in files `kek-vN.key` (mode 0600; `PREFIX-vN.key` for another set
    in the same folder, e.g. the log key's `log-kek-vN.key`), each sealed with AES-256-GCM
    under a key derived with scrypt from the node's passphrase. Wrapped material is
    `b"L" || version (4 bytes) || nonce || ciphertext || tag`."""

    name = "local"

    def __init__(self, directory: str | Path, passphrase: bytes, prefix: str = "kek"):
        if not passphrase:
            raise KeyUnavailable("the local key provider needs a passphrase (keys.passphrase_file or _env)")
        self.dir = Path(directory)
        self.prefix = prefix
        self._passphrase = passphrase
        self._keks: dict[int, AESGCM] = {}
        self._seen: dict[int, tuple[int, int]] = {}
        self._load()

    def _files(self) -> dict[int, Path]:
        out = {}
        for p in self.dir.glob(f"{self.prefix}-v*.key"):
            v = p.stem.removeprefix(f"{self.prefix}-v")
            if v.isdigit():
                out[int(v)] = p
        return out

    def refresh(self) -> None:
        self._load()

    def ping(self) -> None:
        """The key files are still there (a folder unmounted or emptied is not ready)."""
        if not self._files():
            raise KeyUnavailable(f"no {self.prefix}-vN.key in {self.dir}")

    def _load(self) -> None:
        files = self._files()
        for gone in set(self._keks) - set(files):
            del self._keks[gone]
        for version, path in files.items():
            # A version made again after a shred (`residency keys rekey`) is another file.
            seen = (path.stat().st_ino, path.stat().st_mtime_ns)
            if version in self._keks and self._seen.get(version) == seen:
                continue
            self._seen[version] = seen
            blob = path.read_bytes()
            salt, nonce, ct = blob[:16], blob[16 : 16 + NONCE], blob[16 + NONCE :]
            try:
                raw = AESGCM(_scrypt(self._passphrase, salt)).decrypt(
                    nonce, ct, f"{self.prefix}-v{version}".encode()
                )
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
        salt, nonce, raw = os.urandom(16), os.urandom(NONCE), AESGCM.generate_key(bit_length=256)
        sealed = AESGCM(_scrypt(self._passphrase, salt)).encrypt(
            nonce, raw, f"{self.prefix}-v{version}".encode()
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        write_private(self.dir / f"{self.prefix}-v{version}.key", salt + nonce + sealed, exclusive=True)
        self._keks[version] = AESGCM(raw)

    @classmethod
    def create(cls, directory: str | Path, passphrase: bytes, prefix: str = "kek") -> LocalProvider:
        p = cls(directory, passphrase, prefix)
        if not p._keks:
            p._write(1)
        return p

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]:
        raw = AESGCM.generate_key(bit_length=256)
        return raw, self.wrap(raw, context)

    def wrap(self, plaintext: bytes, context: Context) -> bytes:
        v = self.version
        nonce = os.urandom(NONCE)
        return (
            b"L"
            + struct.pack(">I", v)
            + nonce
            + self._keks[v].encrypt(nonce, plaintext, canonical_context(context))
        )

    def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        if wrapped[:1] != b"L" or len(wrapped) < 5 + NONCE + 16:
            raise SealError("wrapped key material is not from the local key provider")
        (v,) = struct.unpack(">I", wrapped[1:5])
        if v not in self._keks:
            self._load()  # another process may have rotated
        kek = self._keks.get(v)
        if kek is None:
            raise KeyDestroyed(f"key-encryption key version {v} in {self.dir} was retired or destroyed")
        try:
            return kek.decrypt(wrapped[5 : 5 + NONCE], wrapped[5 + NONCE :], canonical_context(context))
        except InvalidTag as e:
            raise SealError("wrapped key material does not unwrap in this context") from e

    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        return self.wrap(self.unwrap(wrapped, context), context)

    def rotate(self) -> str:
        self._load()
        v = max(self._keks, default=0) + 1
        self._write(v)
        return f"v{v}"

    def newest_version(self) -> str:
        return f"v{self.version}"

    def version_of(self, wrapped: bytes) -> str:
        if wrapped[:1] != b"L" or len(wrapped) < 5:
            return ""
        return f"v{struct.unpack('>I', wrapped[1:5])[0]}"

    def retire(self, keep: str = "") -> None:
        oldest_kept = int(keep[1:]) if keep else self.version
        for v, path in self._files().items():
            if v < oldest_kept:
                shred_file(path)
                self._keks.pop(v, None)

    def destroy(self) -> None:
        for path in self._files().values():
            shred_file(path)
        self._keks.clear()

    def close(self) -> None:
        pass
