"""Mutual TLS on every connection: who may connect at all (a certificate from the deployment's
CA, unexpired, not revoked, naming an identity), and that the caller's identity and location
are its certificate's, whatever the request or its metadata claim."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from residency.cli.channel import Credentials
from residency.server.api import tls_floor
from residency.server.core.errors import ConfigError
from residency.server.deployment import PRIMARY, init_deployment
from residency.server.keys import pki
from residency.v1 import records_pb2, records_pb2_grpc
from tests.conftest import Cluster, ctx, values

SG = "ap-southeast-1"


async def serving(creds: Credentials, address: str) -> None:
    """A health check over a new channel with `creds`; raises the call's error."""
    async with creds.channel(address) as ch:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def put_over(creds: Credentials, address: str, user: str) -> None:
    async with creds.channel(address) as ch:
        await records_pb2_grpc.RecordServiceStub(ch).PutRecord(record_request(user), timeout=5)


def crafted(ca_dir: Path, out: Path, sans: list[x509.GeneralName]) -> Credentials:
    """A client certificate the deployment's CA signed, with exactly `sans` (none naming a
    valid identity): what a CA misused by another tool could hand out."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.with_name(out.name + ".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.with_name(out.name + ".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Credentials.files(out, ca_dir / "ca.crt")


async def refused(creds: Credentials, address: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await serving(creds, address)
    return e.value.code()


def test_a_node_without_tls_or_with_certificates_it_cannot_use_does_not_start(tmp_path: Path):
    init_deployment(tmp_path / "d")
    config = tmp_path / "d" / f"{PRIMARY}.yaml"
    doc = yaml.safe_load(config.read_text())
    cases = {
        "'tls' is required": {k: v for k, v in doc.items() if k != "tls"},
        "'tls.cert': cannot read": {**doc, "tls": {**doc["tls"], "cert": "pki/missing.crt"}},
        "'tls.key': ": {**doc, "tls": {**doc["tls"], "key": "pki/operator.key"}},  # not the cert's key
        "'tls' has unknown key(s) ['plaintext']": {
            **doc,
            "tls": {**doc["tls"], "plaintext": True},
        },  # no way to turn it off
    }
    for expected, bad in cases.items():
        config.write_text(yaml.safe_dump(bad))
        r = subprocess.run(
            [sys.executable, "-m", "residency.cli.main", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and expected in r.stderr and str(config) in r.stderr, r.stderr


async def test_a_plaintext_client_and_a_client_without_certificate_are_refused(module_cluster: Cluster):
    address = module_cluster.dep.addresses[PRIMARY]
    async with grpc.aio.insecure_channel(address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    ca = (module_cluster.dir / "pki" / "ca.crt").read_bytes()
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca)) as ch:  # no client cert
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    await serving(module_cluster.dep.operator, address)  # while a certificate of the CA connects


async def test_expired_and_foreign_ca_certificates_are_refused_at_the_handshake(
    module_cluster: Cluster, tmp_path: Path
):
    address, folder = module_cluster.dep.addresses[PRIMARY], module_cluster.dir / "pki"
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    pki.issue(folder, "service", PRIMARY, "expired", tmp_path / "expired", days=1, not_before=past)
    expired = Credentials.files(tmp_path / "expired", folder / "ca.crt")
    pki.create_ca(tmp_path / "foreign")  # the same trust domain, another CA
    pki.issue(tmp_path / "foreign", "operator", PRIMARY, "operator", tmp_path / "foreign-op")
    foreign = Credentials.files(tmp_path / "foreign-op", folder / "ca.crt")
    before = (await module_cluster.status(PRIMARY)).records
    for creds in (expired, foreign):
        assert await refused(creds, address) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await put_over(creds, address, "intruder-1")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await module_cluster.status(PRIMARY)).records == before


async def test_a_certificate_of_the_ca_naming_no_identity_of_the_trust_domain_is_unauthenticated(
    module_cluster: Cluster, tmp_path: Path
):
    address, folder = module_cluster.dep.addresses[PRIMARY], module_cluster.dir / "pki"
    cases = {
        "none": [],
        "dns-only": [x509.DNSName("localhost")],
        "other-domain": [x509.UniformResourceIdentifier("spiffe://elsewhere/operator/cn-north/root")],
        "unknown-role": [x509.UniformResourceIdentifier("spiffe://residency/root/cn-north/root")],
        "two-identities": [
            x509.UniformResourceIdentifier("spiffe://residency/service/cn-north/a"),
            x509.UniformResourceIdentifier("spiffe://residency/operator/cn-north/b"),
        ],
    }
    for name, sans in cases.items():
        creds = crafted(folder, tmp_path / name, sans)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await put_over(creds, address, "anon-1")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert "spiffe://residency/ROLE/REGION/NAME" in e.value.details()
        assert await refused(creds, address) == grpc.StatusCode.UNAUTHENTICATED  # health too
    with pytest.raises(grpc.aio.AioRpcError):
        await module_cluster.get("anon-1")


async def test_a_location_the_certificate_does_not_name_is_refused_and_logged(module_cluster: Cluster):
    c = module_cluster
    await c.put(
        "loc-1", {"email": "li@example.cn", "national_id": "110105194912310021", "address": "Beijing"}
    )
    # An ap-southeast-1 service claims the home region: refused, nothing read, the refusal logged.
    liar = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", SG))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await liar.GetRecord(
            records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="loc-1"),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate names ap-southeast-1" in e.value.details() and "110105" not in e.value.details()
    entries = [json.loads(e) for _, e, _ in await c.log()]
    refusal = [x for x in entries if x["subject"] == "loc-1" and x["outcome"] == "denied"][-1]
    assert refusal["actor"] == "spiffe://residency/service/ap-southeast-1/test-suite"
    assert refusal["destination_region"] == SG and refusal["fields"] == []
    assert "110105" not in json.dumps(refusal) and "Beijing" not in json.dumps(refusal)
    # Without a stated location it reads as what it is: only what a rule sends to ap-southeast-1.
    reply = await liar.GetRecord(
        records_pb2.GetRecordRequest(context=ctx("", "essential.service"), user_id="loc-1"), timeout=10
    )
    assert values(reply) == {"email": "li@example.cn"}
    assert {w.field for w in reply.withheld} == {"national_id", "address"}
    # ... and it may write nothing claiming to be at home either.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await liar.DeleteRecord(
            records_pb2.DeleteRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="loc-1"),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert values(await c.get("loc-1"))["national_id"] == "110105194912310021"


async def test_identity_metadata_changes_nothing(module_cluster: Cluster):
    c = module_cluster
    await c.put("meta-1", {"email": "m@example.cn", "national_id": "110105194912310021"})
    stub = records_pb2_grpc.RecordServiceStub(c.channel(PRIMARY, "service", SG))
    request = records_pb2.GetRecordRequest(context=ctx(SG, "essential.service"), user_id="meta-1")
    plain = await stub.GetRecord(request, timeout=10)
    claimed = await stub.GetRecord(
        request,
        metadata=(("x-residency-identity", "spiffe://residency/operator/cn-north/root"),),
        timeout=10,
    )
    assert values(plain) == values(claimed) == {"email": "m@example.cn"}
    entries = {seq: json.loads(e) for seq, e, _ in await c.log()}
    assert entries[claimed.log_sequence]["actor"] == "spiffe://residency/service/ap-southeast-1/test-suite"


async def test_tls_1_3_is_negotiated_and_status_shows_the_certificate_expiry(module_cluster: Cluster):
    c = module_cluster
    version, peer = await asyncio.to_thread(handshake, c)
    assert version == "TLSv1.3"
    assert ("URI", "spiffe://residency/node/cn-north/primary") in peer["subjectAltName"]
    node_cert = x509.load_pem_x509_certificate((c.dir / "pki" / f"{PRIMARY}.crt").read_bytes())
    status = await c.status(PRIMARY)
    assert status.certificate_expires.ToDatetime(datetime.UTC) == node_cert.not_valid_after_utc


async def eventually(check, what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < end, f"not within {deadline} s: {what}"
        await asyncio.sleep(0.1)


async def test_sighup_rereads_the_revocation_list_and_the_node_certificate_without_a_restart(
    idle_cluster: Cluster,
):
    c = idle_cluster
    folder = c.dir / "pki"
    revoked = revocation_list(c)
    await c.start(PRIMARY)
    address, proc = c.dep.addresses[PRIMARY], c.dep.procs[PRIMARY]
    stolen = c.dep.credentials("service", PRIMARY, "checkout")
    async with stolen.channel(address) as kept:  # a connection opened before the revocation
        stub = records_pb2_grpc.RecordServiceStub(kept)
        await stub.PutRecord(record_request("kept-1"), timeout=10)
        serial = x509.load_pem_x509_certificate(stolen.cert.read_bytes()).serial_number
        revoked.write_text(revoked.read_text() + f"{serial:x}\n")
        proc.send_signal(signal.SIGHUP)

        async def refused_now() -> bool:
            try:
                await serving(stolen, address)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details()
                return True
            return False

        await eventually(refused_now, "the revoked certificate is refused")
        with pytest.raises(grpc.aio.AioRpcError) as e:  # on the connection opened before, too
            await stub.PutRecord(record_request("rv-1"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError):
        await c.get("rv-1")
    # The same identity, reissued: accepted at once.
    pki.issue(folder, "service", PRIMARY, "checkout", folder / "checkout-2")
    await put_over(Credentials.files(folder / "checkout-2", folder / "ca.crt"), address, "rv-2")
    # The node's own certificate, reissued and reread on SIGHUP: new connections are served it.
    pki.issue(folder, "node", PRIMARY, "primary", folder / PRIMARY, days=30, hosts=pki.NODE_HOSTS)
    fresh = x509.load_pem_x509_certificate((folder / f"{PRIMARY}.crt").read_bytes())
    proc.send_signal(signal.SIGHUP)

    async def reissued() -> bool:
        _, peer = await asyncio.to_thread(handshake, c)
        return int(peer["serialNumber"], 16) == fresh.serial_number

    await eventually(reissued, "the reissued node certificate is served")
    status = await c.status(PRIMARY)
    assert status.certificate_expires.ToDatetime(datetime.UTC) == fresh.not_valid_after_utc
    assert proc.poll() is None and c.dep.procs[PRIMARY] is proc  # never restarted


def revocation_list(c: Cluster) -> Path:
    """An empty revocation list, `pki/revoked.txt`, named in the primary's config (`tls.revoked`)."""
    revoked = c.dir / "pki" / "revoked.txt"
    revoked.write_text("# revoked client certificates\n")
    config = c.dep.configs[PRIMARY]
    doc = yaml.safe_load(config.read_text())
    doc["tls"]["revoked"] = "pki/revoked.txt"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return revoked


def record_request(user: str) -> records_pb2.PutRecordRequest:
    rec = records_pb2.Record(user_id=user)
    rec.fields["email"].string_value = "x@example.cn"
    return records_pb2.PutRecordRequest(context=ctx(PRIMARY, "essential.service"), record=rec)


def handshake(c: Cluster) -> tuple[str | None, dict]:
    """A TLS handshake with the primary by Python's `ssl` (as the operator): the negotiated
    version and the node's certificate."""
    host, port = c.dep.addresses[PRIMARY].rsplit(":", 1)
    op = c.dep.operator
    context = ssl.create_default_context(cafile=str(op.ca))
    context.load_cert_chain(str(op.cert), str(op.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as s,
        context.wrap_socket(s, server_hostname=host) as t,
    ):
        return t.version(), t.getpeercert() or {}


async def test_tls_1_2_is_refused_at_the_handshake_even_offering_the_one_suite_named(
    module_cluster: Cluster,
):
    """The TLS 1.2 floor (`tls_floor`): with the operator's own certificate, TLS 1.3 is agreed
    and TLS 1.2 refused; a client that offers the very suite the nodes name, with a
    pre-shared key of its choosing, agrees on nothing either. Each node said so at start."""
    op = module_cluster.dep.operator
    for region, address in module_cluster.dep.addresses.items():
        assert (
            await asyncio.to_thread(
                tls_floor.handshake, address, ssl.TLSVersion.TLSv1_3, op.cert, op.key, op.ca
            )
            == "TLSv1.3"
        )
        assert (
            await asyncio.to_thread(
                tls_floor.handshake, address, ssl.TLSVersion.TLSv1_2, op.cert, op.key, op.ca
            )
            is None
        )
        node_log = module_cluster.dep.node_log(region).read_text()
        assert f"listener {address}: TLS 1.3 agreed, TLS 1.2 refused" in node_log
    if shutil.which("openssl") is None:  # .ci/run installs it
        pytest.skip("no openssl command for the pre-shared-key liar")
    address = module_cluster.dep.addresses[PRIMARY]
    argv = ["openssl", "s_client", "-connect", address, "-tls1_2", "-cipher", tls_floor.TLS12_SUITES]
    liar = subprocess.run(
        [*argv, "-psk", "00112233445566778899aabbccddeeff", "-cert", str(op.cert), "-key", str(op.key)],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    assert liar.returncode != 0 and b"Cipher is (NONE)" in liar.stdout, liar.stdout[-2000:]


async def test_a_listener_whose_process_loaded_grpc_without_the_floor_is_caught(tmp_path: Path):
    """The node checks the floor took instead of trusting it: here a listener started by this
    test process, whose gRPC loaded before `residency.cli` pinned the cipher list (conftest
    imports grpc first), accepts TLS 1.2, and the check refuses it."""
    d = tmp_path / "pki"
    pki.create_ca(d)
    pki.issue(d, "node", PRIMARY, "primary", d / "node", hosts=["127.0.0.1"])
    pair = [((d / "node.key").read_bytes(), (d / "node.crt").read_bytes())]
    creds = grpc.ssl_server_credentials(pair, (d / "ca.crt").read_bytes(), require_client_auth=True)
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        address, files = f"127.0.0.1:{port}", (d / "node.crt", d / "node.key", d / "ca.crt")
        assert (
            await asyncio.to_thread(tls_floor.handshake, address, ssl.TLSVersion.TLSv1_2, *files) == "TLSv1.2"
        )
        with pytest.raises(ConfigError, match=r"accepts a TLS 1\.2 client: GRPC_SSL_CIPHER_SUITES was not"):
            await asyncio.to_thread(tls_floor.check, address, *files)
    finally:
        await server.stop(None)


def test_the_command_line_refuses_a_server_that_speaks_only_tls_1_2(module_cluster: Cluster):
    """`residency` clients are held to TLS 1.3 too: a server offering only TLS 1.2, with a
    certificate of the deployment's CA, finds no cipher it shares with `residency status`."""
    pki_dir = module_cluster.dir / "pki"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki_dir / f"{PRIMARY}.crt", pki_dir / f"{PRIMARY}.key")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    errors: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                try:
                    context.wrap_socket(conn, server_side=True).close()
                except ssl.SSLError as e:
                    errors.append(str(e))

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        op = module_cluster.dep.operator
        r = subprocess.run(
            [sys.executable, "-m", "residency.cli", "status", "--target", f"127.0.0.1:{port}",
             "--cert", str(op.cert), "--key", str(op.key), "--ca", str(op.ca), "--timeout", "5"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        server.join(30)
    assert r.returncode != 0 and "UNAVAILABLE" in r.stderr, r.stderr
    assert errors and "NO_SHARED_CIPHER" in errors[0], errors
