"""The node's side of mutual TLS: its server credentials (reread on SIGHUP without a restart)
and the check every call passes first (`access.Gate` asks it): a certificate from the
deployment's CA that names an identity of this trust domain and is not on the revocation list."""

from __future__ import annotations

import contextvars
import datetime
import functools
import logging
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from residency.server.config.tls import TlsConfig
from residency.server.core.errors import ConfigError
from residency.server.keys import pki
from residency.server.keys.pki import Identity, identity_of, read_serials

log = logging.getLogger("residency.tls")


@functools.lru_cache(maxsize=1024)
def _read_peer(pem: bytes) -> tuple[int, Identity | None] | None:
    """A peer certificate's serial and identity (parsed once per certificate, not per call);
    None for one the TLS stack took but `cryptography` cannot read (the call is refused)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return cert.serial_number, identity_of(cert)
    except ValueError:
        return None


# The identity `access.Gate` established for the call being served (each call runs in its
# own task, so its own context): servicers read it without asking gRPC again.
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)


def peer_certificate(context: grpc.aio.ServicerContext) -> tuple[int, Identity | None] | None:
    """The verified client certificate's serial and identity, or None without one."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return _read_peer(bytes(pems[0])) if pems else None


class ServerTls:
    """The node's certificate, key, CA and revocation list, as last (re)loaded."""

    def __init__(self, config: TlsConfig):
        self.config = config
        self.revoked: frozenset[int] = frozenset()
        self.expires = datetime.datetime.min.replace(tzinfo=datetime.UTC)
        self._initial = self._load()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def _read(self, key: str, path: Any) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise ConfigError(f"'tls.{key}': cannot read {path}: {e}") from e

    def _load(self) -> grpc.ServerCertificateConfiguration:
        c = self.config
        cert_pem, key_pem, ca_pem = (
            self._read("cert", c.cert),
            self._read("key", c.key),
            self._read("ca", c.ca),
        )
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, None)
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as e:
            raise ConfigError(f"'tls': {c.cert}, {c.key} or {c.ca} is not PEM of the right kind: {e}") from e
        if key.public_key() != cert.public_key():
            raise ConfigError(f"'tls.key': {c.key} is not the key of {c.cert}")
        revoked = read_serials(c.revoked) if c.revoked else frozenset()
        conf = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)
        self.revoked, self.expires = revoked, cert.not_valid_after_utc
        self._key, self.cert_pem = key, cert_pem
        return conf

    def sign(self, data: bytes) -> bytes:
        """`data` signed with the node certificate's key (statements the node makes about
        itself, checked with `pki.verify_signed` against `cert_pem`)."""
        return pki.sign(self._key, data)

    def credentials(self) -> grpc.ServerCredentials:
        """TLS that requires a client certificate from the CA; each new connection first asks
        `_fetch` whether a reload changed the certificate."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=True
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        conf, self._pending = self._pending, None
        return conf

    def reload(self) -> None:
        """Rereads every file; a bad one keeps what runs (and is logged)."""
        try:
            self._pending = self._load()
        except ConfigError as e:
            log.error("TLS reload refused, the node keeps its certificate: %s", e)
            return
        log.info(
            "TLS reloaded: certificate valid until %s, %d serials revoked", self.expires, len(self.revoked)
        )

    def refusal(self, peer: tuple[int, Identity | None] | None) -> str | None:
        """Why a call's peer (`peer_certificate`) may not call at all, or None."""
        if peer is None:
            return "a client certificate from the deployment's CA is required"
        serial, ident = peer
        if serial in self.revoked:
            return f"the client certificate with serial {serial:x} is revoked"
        if ident is None or ident.trust_domain != self.config.trust_domain:
            return (
                "the client certificate must name one identity "
                f"spiffe://{self.config.trust_domain}/ROLE/REGION/NAME in its URI SAN"
            )
        return None
