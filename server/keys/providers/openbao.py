"""The OpenBao / Vault Transit key provider, over HTTP (httpx)."""

from __future__ import annotations

import base64
from typing import Any

from residency.server.core.errors import KeyServiceDenied, KeyUnavailable
from residency.server.core.sealing import Context, KeyDestroyed, SealError, canonical_context


class OpenBaoProvider:
    """A Transit key (`derived`, so the context is bound into every ciphertext). `datakey`,
    `encrypt`, `decrypt` and `rewrap` with the context; `rotate` adds a key version; `retire`
    raises `min_decryption_version` to the newest; `destroy` deletes the key."""

    name = "openbao"

    def __init__(self, address: str, token: str, key: str, mount: str = "transit", timeout: float = 5.0):
        import httpx

        self.key = key
        self.mount = mount
        self._http = httpx.Client(base_url=address, headers={"X-Vault-Token": token}, timeout=timeout)

    def _req(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            r = self._http.request(method, f"/v1/{self.mount}/{path}", json=body)
        except httpx.HTTPError as e:
            raise KeyUnavailable(
                f"OpenBao cannot be reached for {path}: {e.__class__.__name__}: {e}; nothing was "
                "written or opened with another key: retry once OpenBao answers"
            ) from e
        try:
            doc = r.json() if r.content else {}
        except ValueError:  # an error page (a proxy's, a load balancer's), not OpenBao's JSON
            raise KeyUnavailable(
                f"OpenBao (or a proxy before it) answered {r.status_code} for {path} with a page "
                "that is not OpenBao's JSON; nothing was written or opened with another key"
            ) from None
        if r.status_code < 300:
            return doc.get("data") or {}
        errors = "; ".join(doc.get("errors", []))
        if r.status_code == 403:
            raise KeyServiceDenied(
                f"OpenBao denied {path} on Transit key {self.key} ({errors or 'permission denied'}): "
                "the node's token or its policy do not allow it"
            )
        # A server-side status first: OpenBao that is starting, sealed or electing a leader
        # answers 5xx, some with "not found" in the text ("active cluster node not found"),
        # which says nothing of the key.
        if r.status_code >= 500 or r.status_code == 429:
            raise KeyUnavailable(f"OpenBao answered {r.status_code} for {path}: {errors}")
        if any(s in errors for s in ("not found", "no existing key", "disallowed by policy (too old)")):
            raise KeyDestroyed(f"Transit key {self.key} was destroyed or the version retired: {errors}")
        if r.status_code == 400 and ("authentication failed" in errors or "invalid" in errors):
            raise SealError("wrapped key material does not decrypt in this context")
        raise KeyUnavailable(f"OpenBao refused {path} ({r.status_code}): {errors}")

    @staticmethod
    def _material(wrapped: bytes) -> str:
        # Transit ciphertext is ASCII (`vault:vN:BASE64`); anything else (another provider's
        # material, a damaged file) is refused here as it would be by Transit.
        try:
            return wrapped.decode("ascii")
        except UnicodeDecodeError:
            raise SealError("wrapped key material is not OpenBao Transit's (`vault:vN:...`)") from None

    @staticmethod
    def _ctx(context: Context) -> str:
        return base64.b64encode(canonical_context(context)).decode()

    def ping(self) -> None:
        self._req("GET", f"keys/{self.key}")

    def ensure_key(self) -> None:
        self._req("POST", f"keys/{self.key}", {"type": "aes256-gcm96", "derived": True})

    def new_data_key(self, context: Context) -> tuple[bytes, bytes]:
        d = self._req("POST", f"datakey/plaintext/{self.key}", {"context": self._ctx(context), "bits": 256})
        return base64.b64decode(d["plaintext"]), d["ciphertext"].encode()

    def wrap(self, plaintext: bytes, context: Context) -> bytes:
        d = self._req(
            "POST",
            f"encrypt/{self.key}",
            {"plaintext": base64.b64encode(plaintext).decode(), "context": self._ctx(context)},
        )
        return d["ciphertext"].encode()

    def unwrap(self, wrapped: bytes, context: Context) -> bytes:
        body = {"ciphertext": self._material(wrapped), "context": self._ctx(context)}
        d = self._req("POST", f"decrypt/{self.key}", body)
        return base64.b64decode(d["plaintext"])

    def rewrap(self, wrapped: bytes, context: Context) -> bytes:
        body = {"ciphertext": self._material(wrapped), "context": self._ctx(context)}
        d = self._req("POST", f"rewrap/{self.key}", body)
        return d["ciphertext"].encode()

    def rotate(self) -> str:
        d = self._req("POST", f"keys/{self.key}/rotate")
        return f"v{d.get('latest_version', '?')}"

    def newest_version(self) -> str:
        return f"v{self._req('GET', f'keys/{self.key}')['latest_version']}"

    def version_of(self, wrapped: bytes) -> str:
        # Transit ciphertext is `vault:vN:BASE64`.
        prefix, _, rest = wrapped.partition(b":")
        version = rest.partition(b":")[0]
        return version.decode() if prefix == b"vault" and version[1:].isdigit() else ""

    def retire(self, keep: str = "") -> None:
        key = self._req("GET", f"keys/{self.key}")
        oldest_kept = int(keep[1:]) if keep else key["latest_version"]
        # Never lowered: a late retire must not let versions retired since decrypt again.
        floor = max(oldest_kept, int(key.get("min_decryption_version") or 0))
        self._req("POST", f"keys/{self.key}/config", {"min_decryption_version": floor})

    def refresh(self) -> None:
        pass

    def destroy(self) -> None:
        self._req("POST", f"keys/{self.key}/config", {"deletion_allowed": True})
        self._req("DELETE", f"keys/{self.key}")

    def close(self) -> None:
        self._http.close()
