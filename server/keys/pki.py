"""The deployment's PKI: a CA, the certificates it issues (the URI SAN
`spiffe://TRUST_DOMAIN/ROLE/REGION/NAME` is the holder's identity), reading that identity back,
and checking a client certificate presented outside a TLS handshake (`authenticate`)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from residency.server.core.errors import CallerDenied, ConfigError

log = logging.getLogger("residency.pki")

TRUST_DOMAIN = "residency"
ROLES = ("service", "operator", "reviewer", "approver", "recipient", "node")
# A node's certificate also names its listen address: nodes listen on loopback by default.
NODE_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: its role, its region (the holder's location) and its name."""

    trust_domain: str
    role: str
    region: str
    name: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.role}/{self.region}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def parse_uri(uri: str) -> Identity | None:
    """The identity of a `spiffe://TD/ROLE/REGION/NAME` URI, or None if it is not one."""
    if not uri.startswith("spiffe://"):
        return None
    parts = uri[len("spiffe://") :].split("/")
    if len(parts) != 4 or parts[1] not in ROLES or not all(_valid(p) for p in parts):
        return None
    return Identity(*parts)


def _valid(part: str) -> bool:
    # SPIFFE IDs forbid the dot segments "." and "..".
    return (
        part not in (".", "..")
        and bool(part)
        and all(c.isalnum() or c in "._-" for c in part)
        and part.isascii()
    )


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The identity a certificate's one URI SAN names, or None if it has none, several (an
    X.509 SVID has exactly one), or one that is no identity."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return parse_uri(uris[0]) if len(uris) == 1 else None


def read_serials(path: Path) -> frozenset[int]:
    """A revocation list: one hexadecimal serial number a line (colons allowed, `#` comments)."""
    serials, bad = read_serials_leniently(path)
    if bad:
        raise ConfigError(bad[0])
    return serials


def revoked_serials(path: Path | None) -> frozenset[int]:
    """For a check of another's certificate: every serial a revocation list names, a line that
    is not one logged and passed over (a bad line must not un-revoke the others); none without
    a list. ConfigError if the file cannot be read."""
    if path is None:
        return frozenset()
    serials, bad = read_serials_leniently(path)
    for line in bad:
        log.warning("revocation list: %s (passed over)", line)
    return serials


def read_serials_leniently(path: Path) -> tuple[frozenset[int], list[str]]:
    """The serial numbers of every line of a revocation list that reads as one, and what is
    wrong with the others. ConfigError if the file cannot be read at all."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:  # a node keeps the list it has (`ServerTls.reload`)
        raise ConfigError(f"cannot read the revocation list {path}: {e}") from None
    serials, bad = set(), []
    for n, line in enumerate(text.splitlines(), 1):
        text = line.split("#", 1)[0].strip().replace(":", "").lower().removeprefix("0x")
        if not text:
            continue
        try:
            serials.add(int(text, 16))
        except ValueError:
            bad.append(f"{path}:{n}: {line.strip()!r} is not a hexadecimal serial number")
    return frozenset(serials), bad


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def key_pem(key: PrivateKeyTypes) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (its file is 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def builder(
    subject: x509.Name, issuer: x509.Name, public_key: Any, start: datetime.datetime, days: float
) -> x509.CertificateBuilder:
    """What every certificate here has: subject, issuer, key, a random serial, and validity
    from `start` for `days` days; extensions are the caller's."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
    )


def common_name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def create_ca(pki: Path, trust_domain: str = TRUST_DOMAIN, days: int = 3650) -> None:
    """Writes `pki/ca.crt` and `pki/ca.key` (0600), unless a CA key is there already: an
    existing CA key is never overwritten (every certificate it issued would stop working)."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "ca.key").exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = common_name(f"{trust_domain} deployment CA")
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        builder(name, name, key.public_key(), now - datetime.timedelta(minutes=5), days + 5 / 1440)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        # The CA names its trust domain, so that `certs issue` needs no other setting.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(pki / "ca.key", key_pem(key))
    (pki / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def trust_domain_of(ca: x509.Certificate) -> str:
    """The trust domain a CA made by `create_ca` names (default `residency`)."""
    try:
        san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return TRUST_DOMAIN
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
            return uri[len("spiffe://") :]
    return TRUST_DOMAIN


def issue(
    pki: Path,
    role: str,
    region: str,
    name: str,
    out: Path,
    days: int = 365,
    hosts: Iterable[str] = (),
    not_before: datetime.datetime | None = None,
) -> Identity:
    """Issues `OUT.crt` and `OUT.key` (0600) from the CA in `pki` for `spiffe://TD/ROLE/REGION/NAME`.
    `hosts`: DNS names and IP addresses the holder serves on (a node's)."""
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if days < 1:
        raise ConfigError(f"days must be 1 or more, got {days}")
    if not (_valid(region) and _valid(name)):
        raise ConfigError(f"region and name must be non-empty, from [A-Za-z0-9._-]; got {region!r}, {name!r}")
    try:
        ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CA in {pki} (ca.crt, ca.key): {e}") from e
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ident = Identity(trust_domain_of(ca), role, region, name)
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ident.uri)]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if role == "node" else [])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        builder(common_name(f"{role}/{region}/{name}"), ca.subject, key.public_key(), start, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_private(out.with_name(out.name + ".key"), key_pem(key))
    out.with_name(out.name + ".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ident


def _when(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def authenticate(
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    *,
    role: str,
    trust_domain: str = TRUST_DOMAIN,
    revoked: frozenset[int] = frozenset(),
    now: datetime.datetime | None = None,
) -> Identity:
    """The identity of a client certificate that is checked as a node checks its callers, but
    outside a handshake (a command run on the node's machine, `residency keys`): its key is
    the one given, it is valid at `now`, chains to a CA of `ca_pem` (the node's `tls.ca`),
    is not revoked and names one identity of `trust_domain` with role `role`. Raises
    `CallerDenied` naming the first check that fails."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CallerDenied("the certificate file holds no PEM certificate") from None
    cert = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError):  # TypeError: a key protected by a passphrase
        raise CallerDenied("the key file holds no unencrypted PEM private key") from None
    if key.public_key() != cert.public_key():
        raise CallerDenied("the key file does not hold the certificate's key")
    return _check(cert, chain[1:], ca_pem, role, trust_domain, revoked, now)


def _check(
    cert: x509.Certificate,
    intermediates: list[x509.Certificate],
    ca_pem: bytes,
    role: str,
    trust_domain: str,
    revoked: frozenset[int],
    now: datetime.datetime,
) -> Identity:
    """The identity of a certificate valid at `now`, chaining to `ca_pem`, not revoked, and
    naming one identity of `trust_domain` with role `role`; CallerDenied otherwise."""
    if now < cert.not_valid_before_utc:
        raise CallerDenied(f"the certificate is not valid before {_when(cert.not_valid_before_utc)}")
    if now > cert.not_valid_after_utc:
        raise CallerDenied(f"the certificate expired at {_when(cert.not_valid_after_utc)}")
    try:
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise ConfigError("the deployment's CA file holds no PEM certificate") from None
    try:
        _verifier(roots, now).verify(cert, intermediates)
    except VerificationError as e:
        raise CallerDenied(f"the certificate does not chain to the deployment's CA ({e})") from None
    if cert.serial_number in revoked:
        raise CallerDenied(f"the certificate with serial {cert.serial_number:x} is revoked")
    ident = identity_of(cert)
    if ident is None or ident.trust_domain != trust_domain:
        raise CallerDenied(f"the certificate names no identity spiffe://{trust_domain}/ROLE/REGION/NAME")
    if ident.role != role:
        raise CallerDenied(f"the certificate names {ident.uri}, of role {ident.role}; this needs role {role}")
    return ident


def verify_signed(
    data: bytes,
    signature: bytes,
    cert_pem: bytes,
    ca_pem: bytes,
    *,
    role: str,
    trust_domain: str = TRUST_DOMAIN,
    revoked: frozenset[int] = frozenset(),
    now: datetime.datetime | None = None,
) -> Identity:
    """The identity that signed `data` with the key of the certificate `cert_pem` (a statement
    a node makes, e.g. its region's new public key), checked as `authenticate` checks a
    certificate. Raises CallerDenied naming what fails."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CallerDenied("the statement's certificate is not PEM") from None
    ident = _check(chain[0], chain[1:], ca_pem, role, trust_domain, revoked, now)
    key = chain[0].public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            raise CallerDenied(f"a {type(key).__name__} certificate key cannot sign statements here")
    except InvalidSignature:
        raise CallerDenied(f"the statement is not signed by the key of {ident.uri}'s certificate") from None
    return ident


def sign(key: Any, data: bytes) -> bytes:
    """`data` signed with a certificate's private key, as `verify_signed` checks it."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise ConfigError(f"a {type(key).__name__} certificate key cannot sign statements")


def _verifier(roots: list[x509.Certificate], now: datetime.datetime) -> x509.verification.ClientVerifier:
    """RFC 5280 path validation under the Web PKI profile, except that an Authority Key
    Identifier may be missing: `create_ca` and `issue` (so every `residency init` deployment)
    write none, and a TLS handshake does not ask for one either."""
    aki = (x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    return (
        PolicyBuilder()
        .store(Store(roots))
        .time(now)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca().may_be_present(*aki),
            ee_policy=ExtensionPolicy.webpki_defaults_ee().may_be_present(*aki),
        )
        .build_client_verifier()
    )
