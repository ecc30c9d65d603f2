"""The node's side of mutual TLS: its server credentials (reread on SIGHUP without a restart)
and the check every call passes first (`access.Gate` asks it): a certificate from the
deployment's CA that names an identity of this trust domain, is not on the revocation list,
has not expired since its connection began, and still chains to the CA after a reload
changed it."""

from __future__ import annotations

import contextvars
import datetime
import functools
import logging
import ssl
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from residency.server.config.tls import TlsConfig
from residency.server.core.errors import ConfigError
from residency.server.keys import pki
from residency.server.keys.pki import Identity, identity_of, read_serials

log = logging.getLogger("residency.tls")


class Peer(NamedTuple):
    """What a call's client certificate says, read once per certificate (not per call)."""

    serial: int
    identity: Identity | None  # None: it names no identity of the right form, or several
    not_after: datetime.datetime
    cert: x509.Certificate


@functools.lru_cache(maxsize=1024)
def _read_peer(pem: bytes) -> Peer | None:
    """A peer certificate as `Peer`; None for one the TLS stack took but `cryptography`
    cannot read (the call is refused)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        not_after = cert.not_valid_after_utc
    except ValueError:
        return None
    try:
        ident = identity_of(cert)
    except Exception:  # an extension `cryptography` cannot read (a SAN of a type it lacks)
        ident = None
    return Peer(cert.serial_number, ident, not_after, cert)


def read_peer(der: bytes) -> Peer | None:
    """`_read_peer` of a certificate in DER (the standard library's TLS gives it so)."""
    return _read_peer(ssl.DER_cert_to_PEM_cert(der).encode())


# The identity `access.Gate` established for the call being served (each call runs in its
# own task, so its own context): servicers read it without asking gRPC again.
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)


def peer_certificate(context: grpc.aio.ServicerContext) -> Peer | None:
    """The verified client certificate of a call, or None without one."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return _read_peer(bytes(pems[0])) if pems else None


def peer_chain(context: grpc.aio.ServicerContext) -> list[x509.Certificate]:
    """The certificates the client sent with its own (intermediate CAs), as far as readable."""
    pems = (context.auth_context() or {}).get("x509_pem_cert_chain") or []
    try:
        return x509.load_pem_x509_certificates(bytes(pems[0])) if pems else []
    except ValueError:
        return []


def _can_issue(issuer: x509.Certificate, now: datetime.datetime) -> bool:
    """Whether `issuer` is a CA certificate, for signing certificates, valid at `now`."""
    try:
        if not issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        if not issuer.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            return False
    except x509.ExtensionNotFound:
        pass
    return issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, now: datetime.datetime) -> bool:
    try:
        if cert.issuer != issuer.subject or not _can_issue(issuer, now):
            return False
        cert.verify_directly_issued_by(issuer)
    except Exception:  # another key or algorithm, an extension that does not parse: not its issuer
        return False
    return True


# A client sends its certificate and a few intermediates; more are not looked at.
MAX_CHAIN = 10


def chains_to(cert: x509.Certificate, chain: list[x509.Certificate], anchors: list[x509.Certificate]) -> bool:
    """Whether `cert` was issued by one of `anchors`, directly or through CA certificates of
    `chain` (the client's intermediates), each valid now and signed by the next: every path
    is tried, each certificate at most once."""
    now = datetime.datetime.now(datetime.UTC)
    pool = chain[:MAX_CHAIN]
    tried: set[int] = set()

    def reaches(c: x509.Certificate, depth: int) -> bool:
        if any(_issued_by(c, ca, now) for ca in anchors):
            return True
        if depth == 0:
            return False
        for i, up in enumerate(pool):
            if i not in tried and up is not c and _issued_by(c, up, now):
                tried.add(i)
                if reaches(up, depth - 1):
                    return True
        return False

    return reaches(cert, 8)


def _ssl_context(cert: Any, key: Any, ca_pem: bytes) -> ssl.SSLContext:
    """The same certificate, CA and floor as the gRPC port's, for the standard library's TLS
    (the metrics port, `https`): TLS 1.3 only, a client certificate of the CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(f"'tls': {cert}, {key} or the CA cannot be used for TLS: {e}") from e
    return context


class ServerTls:
    """The node's certificate, key, CA and revocation list, as last (re)loaded."""

    def __init__(self, config: TlsConfig):
        self.config = config
        self.revoked: frozenset[int] = frozenset()
        self.expires = datetime.datetime.min.replace(tzinfo=datetime.UTC)
        # The CA's certificates, and how many times a reload changed them: a connection made
        # before a change was checked against the CA of its day, so its calls are checked
        # again (once per certificate and change, `_still_trusted`).
        self._ca_pem = b""
        self.anchors: list[x509.Certificate] = []
        self.ca_changes = 0
        self._trusted: dict[bytes, bool] = {}
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
            anchors = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as e:
            raise ConfigError(f"'tls': {c.cert}, {c.key} or {c.ca} is not PEM of the right kind: {e}") from e
        if key.public_key() != cert.public_key():
            raise ConfigError(f"'tls.key': {c.key} is not the key of {c.cert}")
        if not self._ca_pem and c.revoked:  # at start: a list that does not read stops the node
            self.revoked = read_serials(c.revoked)
        conf = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)
        context = _ssl_context(c.cert, c.key, ca_pem)
        self.expires, self.ssl_context = cert.not_valid_after_utc, context
        if ca_pem != self._ca_pem:
            self.ca_changes += 1 if self._ca_pem else 0
            self._ca_pem, self.anchors, self._trusted = ca_pem, anchors, {}
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
        """Rereads every file. The revocation list first, on its own: a certificate, key or CA
        that does not load (a renewal half written) must not keep a new revocation from
        holding. A list with a bad line adds the serials of its good ones to those in force
        (it revokes no fewer); one that does not read keeps them. A bad certificate, key or CA
        keeps what runs. Each is logged."""
        self._reload_revoked()
        try:
            self._pending = self._load()
        except ConfigError as e:
            log.error("TLS reload refused, the node keeps its certificate: %s", e)
            return
        log.info(
            "TLS reloaded: certificate valid until %s, %d serials revoked", self.expires, len(self.revoked)
        )

    def _reload_revoked(self) -> None:
        if not self.config.revoked:
            return
        try:
            serials, bad = pki.read_serials_leniently(self.config.revoked)
        except ConfigError as e:
            log.error("revocation list not reread, the %d serials in force stay: %s", len(self.revoked), e)
            return
        if bad:
            self.revoked |= serials
            log.error(
                "revocation list: %s; its other serials are added to those in force (%d now)",
                "; ".join(bad[:3]),
                len(self.revoked),
            )
        else:
            self.revoked = serials

    def refusal(
        self, peer: Peer | None, chain: Callable[[], list[x509.Certificate]] | None = list
    ) -> str | None:
        """Why a call's peer (`peer_certificate`) may not call at all, or None. A connection
        outlives its certificate and the CA of its handshake: each call checks the one's
        validity, and, once the CA changed, that the certificate is still the CA's (`chain`:
        the intermediate certificates the client sent, `peer_chain`; None for a connection
        that serves one request and shook hands with the CA of now, the metrics port's)."""
        if peer is None:
            return "a client certificate from the deployment's CA is required"
        if (why := self.disowned(peer)) is not None:
            return why
        if chain is not None and self.ca_changes and not self._still_trusted(peer, chain):
            return "the client certificate is not from the node's CA (it changed since the connection began)"
        ident = peer.identity
        if ident is None or ident.trust_domain != self.config.trust_domain:
            return (
                "the client certificate must name one identity "
                f"spiffe://{self.config.trust_domain}/ROLE/REGION/NAME in its URI SAN"
            )
        return None

    def disowned(self, peer: Peer) -> str | None:
        """Why a certificate of the CA, and so of someone known, is refused all the same:
        revoked, or expired (its start was checked at the handshake)."""
        if peer.serial in self.revoked:
            return f"the client certificate with serial {peer.serial:x} is revoked"
        if datetime.datetime.now(datetime.UTC) > peer.not_after:
            return f"the client certificate expired at {peer.not_after:%Y-%m-%d %H:%M:%S} UTC"
        return None

    def _still_trusted(self, peer: Peer, chain: Callable[[], list[x509.Certificate]]) -> bool:
        key = peer.cert.fingerprint(hashes.SHA256())
        if key not in self._trusted:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            self._trusted[key] = chains_to(peer.cert, chain(), self.anchors)
        return bool(self._trusted[key])
