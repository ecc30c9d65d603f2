"""`pki.authenticate`: a client certificate checked outside a handshake (the key commands'
operator), with certificates issued by the deployment's own PKI helpers."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from residency.server.core.errors import CallerDenied, ConfigError
from residency.server.keys import pki

NOW = datetime.datetime.now(datetime.UTC)


class Files:
    """A deployment CA in `dir` and the certificates a test issues from it."""

    def __init__(self, directory: Path, trust_domain: str = pki.TRUST_DOMAIN):
        self.dir = directory
        pki.create_ca(directory, trust_domain)
        self.ca = (directory / "ca.crt").read_bytes()

    def issue(self, role: str, name: str, **kw) -> tuple[bytes, bytes]:
        pki.issue(self.dir, role, "cn-north", name, self.dir / name, **kw)
        return (self.dir / f"{name}.crt").read_bytes(), (self.dir / f"{name}.key").read_bytes()


@pytest.fixture
def deployment(tmp_path: Path) -> Files:
    return Files(tmp_path / "pki")


def refusal(cert: bytes, key: bytes, ca: bytes, **kw) -> str:
    with pytest.raises(CallerDenied) as e:
        pki.authenticate(cert, key, ca, role="operator", **kw)
    return str(e.value)


def test_an_operator_certificate_of_the_ca_with_its_key_names_the_operator(deployment: Files):
    cert, key = deployment.issue("operator", "alice")
    ident = pki.authenticate(cert, key, deployment.ca, role="operator")
    assert ident.uri == "spiffe://residency/operator/cn-north/alice"


def test_another_role_of_the_same_ca_is_refused(deployment: Files):
    for role in ("reviewer", "service", "node"):
        cert, key = deployment.issue(role, f"{role}-1")
        uri = f"spiffe://residency/{role}/cn-north/{role}-1"
        assert f"{uri}, of role {role}; this needs role operator" in refusal(cert, key, deployment.ca)


def test_a_certificate_of_another_ca_naming_an_operator_is_refused(deployment: Files, tmp_path: Path):
    foreign = Files(tmp_path / "foreign")  # same trust domain, same names: only the CA differs
    cert, key = foreign.issue("operator", "operator")
    assert "does not chain to the deployment's CA" in refusal(cert, key, deployment.ca)
    # ... and the other CA's own operator is not refused by it.
    assert pki.authenticate(cert, key, foreign.ca, role="operator").role == "operator"


def test_an_expired_or_not_yet_valid_certificate_is_refused(deployment: Files):
    cert, key = deployment.issue("operator", "old", days=1, not_before=NOW - datetime.timedelta(days=10))
    assert "the certificate expired at" in refusal(cert, key, deployment.ca)
    cert, key = deployment.issue("operator", "early", not_before=NOW + datetime.timedelta(days=1))
    assert "the certificate is not valid before" in refusal(cert, key, deployment.ca)
    # Judged at the time given: the same certificate is good a day later.
    later = NOW + datetime.timedelta(days=1, minutes=1)
    assert pki.authenticate(cert, key, deployment.ca, role="operator", now=later).name == "early"


def test_a_key_that_is_not_the_certificates_is_refused(deployment: Files):
    cert, _ = deployment.issue("operator", "alice")
    _, other_key = deployment.issue("operator", "bob")  # a real key of the CA, the wrong one
    assert "does not hold the certificate's key" in refusal(cert, other_key, deployment.ca)
    assert "no unencrypted PEM private key" in refusal(cert, b"not a key", deployment.ca)
    assert "no PEM certificate" in refusal(b"not a certificate", other_key, deployment.ca)


def test_a_revoked_serial_is_refused(deployment: Files):
    cert, key = deployment.issue("operator", "alice")
    serial = x509.load_pem_x509_certificate(cert).serial_number
    said = refusal(cert, key, deployment.ca, revoked=frozenset({serial}))
    assert f"serial {serial:x} is revoked" in said
    assert pki.authenticate(cert, key, deployment.ca, role="operator", revoked=frozenset({serial + 1}))


def test_an_identity_of_another_trust_domain_is_refused(tmp_path: Path):
    elsewhere = Files(tmp_path / "elsewhere", trust_domain="elsewhere")
    cert, key = elsewhere.issue("operator", "operator")
    said = refusal(cert, key, elsewhere.ca, trust_domain="residency")
    assert "names no identity spiffe://residency/ROLE/REGION/NAME" in said


def test_a_certificate_naming_two_identities_or_a_dot_segment_names_none(deployment: Files):
    """An X.509 SVID carries exactly one URI SAN: one that adds a second, even a well-formed
    identity beside its own, names nobody; and "." or ".." is no NAME (SPIFFE forbids them)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = x509.load_pem_x509_certificate(deployment.ca)
    ca_key = serialization.load_pem_private_key((deployment.dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    mine = "spiffe://residency/service/cn-north/app"

    def certificate(*uris: str) -> x509.Certificate:
        sans = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        return (
            pki.builder(pki.common_name("service/cn-north/app"), ca.subject, key.public_key(), NOW, 30)
            .add_extension(sans, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    assert pki.identity_of(certificate(mine)) == pki.parse_uri(mine)
    for second in ("spiffe://residency/operator/cn-north/app", "https://example.com/app", "spiffe://x"):
        assert pki.identity_of(certificate(mine, second)) is None, second
    for dots in (".", ".."):
        assert pki.parse_uri(f"spiffe://residency/service/cn-north/{dots}") is None
        with pytest.raises(pki.ConfigError):
            pki.issue(deployment.dir, "service", "cn-north", dots, deployment.dir / "dots")


def test_a_revocation_list_with_a_bad_line_still_revokes_its_other_serials_everywhere(tmp_path, caplog):
    """Review: the node took a list with a bad line (its good lines' serials added at SIGHUP), but
    the replicator's check of a region's key statement and `residency keys` refused the whole
    list, and replication to every region stayed held on it. Each checker now revokes every
    serial the list names and logs the line it passed over."""
    listed = tmp_path / "revoked.txt"
    listed.write_text("# revoked\n0a:1b\nnot-a-serial\n0xff  # a comment\n")
    with pytest.raises(ConfigError, match="'not-a-serial' is not a hexadecimal serial number"):
        pki.read_serials(listed)  # a node's start is strict
    assert pki.revoked_serials(listed) == {0x0A1B, 0xFF}
    assert "'not-a-serial' is not a hexadecimal serial number (passed over)" in caplog.text
    assert pki.revoked_serials(None) == frozenset()
    with pytest.raises(ConfigError, match="cannot read"):
        pki.revoked_serials(tmp_path / "missing.txt")
