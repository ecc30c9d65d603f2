"""Mutual TLS on every connection: who may connect at all (a certificate from the deployment's
CA, unexpired, not revoked, naming an identity), and that the caller's identity and location
are its certificate's, whatever the request or its metadata claim."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
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


def unauthenticated_on(channel: grpc.aio.Channel, said: str):
    """A check that a health call on an open `channel` is now refused UNAUTHENTICATED, saying `said`."""

    async def refused() -> bool:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and said in e.details(), e.details()
            return True
        return False

    return refused


def crafted(ca_dir: Path, out: Path, sans: list[x509.GeneralName]) -> Credentials:
    """A client certificate the deployment's CA signed, with exactly `sans` (none naming a
    valid identity): what a CA misused by another tool could hand out."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    builder = pki.builder(pki.common_name("x"), ca.subject, key.public_key(), start, 1)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.with_name(out.name + ".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.with_name(out.name + ".key").write_bytes(pki.key_pem(key))
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


async def revoked_now(creds: Credentials, address: str) -> bool:
    """Whether a new connection with `creds` is refused as revoked (else it serves)."""
    try:
        await serving(creds, address)
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details()
        return True
    return False


async def eventually(check, what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < end, f"not within {deadline} s: {what}"
        await asyncio.sleep(0.1)


async def test_a_revocation_holds_though_the_key_beside_it_does_not_load_and_a_bad_line_revokes_no_fewer(
    idle_cluster: Cluster,
):
    """Review: a SIGHUP read the certificate, key, CA and revocation list together, and any of
    them failing dropped the new revocations too: a renewal half written (cert-manager writes
    the certificate, then the key) kept a revoked certificate working, and so did a bad line
    in the list. The list is now applied on its own; a bad line adds its good lines' serials."""
    c = idle_cluster
    revoked = revocation_list(c)
    first, second = (c.dep.credentials("service", PRIMARY, name) for name in ("first", "second"))
    await c.start(PRIMARY)
    address, proc = c.dep.addresses[PRIMARY], c.dep.procs[PRIMARY]

    def serial(creds: Credentials) -> int:
        return x509.load_pem_x509_certificate(creds.cert.read_bytes()).serial_number

    def refused(creds: Credentials) -> Callable[[], Awaitable[bool]]:
        return lambda: revoked_now(creds, address)

    await serving(first, address)
    key = c.dir / "pki" / f"{PRIMARY}.key"
    kept = key.read_bytes()
    key.write_bytes(pki.key_pem(ec.generate_private_key(ec.SECP256R1())))  # not the certificate's
    revoked.write_text(f"{serial(first):x}\n")
    proc.send_signal(signal.SIGHUP)
    await eventually(refused(first), "the revocation holds though the key does not load")
    await serving(second, address)  # the node keeps its certificate
    assert "is not the key of" in c.dep.node_log(PRIMARY).read_text()
    key.write_bytes(kept)
    revoked.write_text(f"{serial(second):x}\nnot-a-serial\n")  # `first` no longer listed
    proc.send_signal(signal.SIGHUP)
    await eventually(refused(second), "the good line of a list with a bad one holds")
    assert await refused(first)()  # a bad list revokes no fewer
    assert "'not-a-serial' is not a hexadecimal serial number" in c.dep.node_log(PRIMARY).read_text()
    assert proc.poll() is None


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

        await eventually(lambda: revoked_now(stolen, address), "the revoked certificate is refused")
        with pytest.raises(grpc.aio.AioRpcError) as e:  # on the connection opened before, too
            await stub.PutRecord(record_request("rv-1"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError):
        await c.get("rv-1")
    # The refused write named a user: the log says who tried, and why (its probes named nobody).
    tried = [json.loads(e) for _, e, _ in await c.log()]
    tried = [e for e in tried if e["actor"] == stolen.identity().uri and e["outcome"] == "denied"]
    assert [(e["subjects"], "revoked" in e["reason"]) for e in tried] == [(["rv-1"], True)]
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


async def test_a_certificate_that_expires_while_its_connection_is_open_is_refused_at_its_next_call(
    module_cluster: Cluster, tmp_path: Path
):
    address, folder = module_cluster.dep.addresses[PRIMARY], module_cluster.dir / "pki"
    # Valid for the next 15 seconds: the handshake and one write fit in them.
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1, seconds=-15)
    pki.issue(folder, "service", PRIMARY, "short-lived", tmp_path / "short", days=1, not_before=start)
    short = Credentials.files(tmp_path / "short", folder / "ca.crt")
    async with short.channel(address) as ch:
        stub = records_pb2_grpc.RecordServiceStub(ch)
        await stub.PutRecord(record_request("short-1"), timeout=5)

        refused_now = unauthenticated_on(ch, "expired")
        await eventually(refused_now, "the expired certificate is refused on its open connection", 30)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.PutRecord(record_request("short-2"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await module_cluster.get("short-1")
    with pytest.raises(grpc.aio.AioRpcError):
        await module_cluster.get("short-2")


async def test_a_certificate_whose_alternative_names_cannot_be_read_is_unauthenticated(
    module_cluster: Cluster, tmp_path: Path
):
    address, folder = module_cluster.dep.addresses[PRIMARY], module_cluster.dir / "pki"
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    # A subject alternative name of a type `cryptography` does not read (an EDIPartyName).
    edi = bytes.fromhex("3007a505a1030c0178")
    sans = x509.UnrecognizedExtension(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, edi)
    cert = (
        pki.builder(pki.common_name("x"), ca.subject, key.public_key(), start, 1)
        .add_extension(sans, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "edi.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "edi.key").write_bytes(pki.key_pem(key))
    creds = Credentials.files(tmp_path / "edi", folder / "ca.crt")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await put_over(creds, address, "edi-1")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "spiffe://residency/ROLE/REGION/NAME" in e.value.details()


async def test_a_connection_made_under_a_ca_the_node_no_longer_trusts_is_refused_at_its_next_call(
    idle_cluster: Cluster, tmp_path: Path
):
    c = idle_cluster
    folder = c.dir / "pki"
    await c.start(PRIMARY)
    address, proc = c.dep.addresses[PRIMARY], c.dep.procs[PRIMARY]
    old = c.dep.credentials("service", PRIMARY, "before")
    async with old.channel(address) as kept:
        stub = records_pb2_grpc.RecordServiceStub(kept)
        await stub.PutRecord(record_request("ca-1"), timeout=10)
        # The old CA's key leaked: the operator makes a new CA, reissues the node, rereads.
        new = tmp_path / "new-ca"
        pki.create_ca(new)
        pki.issue(new, "node", PRIMARY, "primary", folder / PRIMARY, days=30, hosts=pki.NODE_HOSTS)
        (folder / "ca.crt").write_bytes((new / "ca.crt").read_bytes())
        proc.send_signal(signal.SIGHUP)

        await eventually(unauthenticated_on(kept, "CA"), "the old CA's connection is refused")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.PutRecord(record_request("ca-2"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A new connection with the old CA's certificate fails its handshake; the new CA's works.
    before = Credentials.files(folder / f"service-{PRIMARY}-before", new / "ca.crt")
    assert await refused(before, address) == grpc.StatusCode.UNAVAILABLE
    pki.issue(new, "service", PRIMARY, "after", tmp_path / "after")
    after = Credentials.files(tmp_path / "after", new / "ca.crt")
    async with after.channel(address) as ch:
        read = records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="ca-1")
        got = await records_pb2_grpc.RecordServiceStub(ch).GetRecord(read, timeout=10)
        assert values(got) == {"email": "x@example.cn"}
        with pytest.raises(grpc.aio.AioRpcError) as nf:
            await records_pb2_grpc.RecordServiceStub(ch).GetRecord(
                records_pb2.GetRecordRequest(context=ctx(PRIMARY, "essential.service"), user_id="ca-2"),
                timeout=10,
            )
        assert nf.value.code() == grpc.StatusCode.NOT_FOUND


async def test_replication_goes_on_after_the_primarys_node_certificate_is_renewed(idle_cluster: Cluster):
    """Region nodes refuse a certificate that expired on a connection opened before: the
    primary's replicator presents the renewed one from its next call on."""
    c = idle_cluster
    folder = c.dir / "pki"
    lasts = datetime.timedelta(seconds=15)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1) + lasts
    hosts = pki.NODE_HOSTS
    pki.issue(folder, "node", PRIMARY, "primary", folder / PRIMARY, days=1, hosts=hosts, not_before=start)
    expires = x509.load_pem_x509_certificate((folder / f"{PRIMARY}.crt").read_bytes()).not_valid_after_utc
    await c.start()
    await c.put("cr-1", {"email": "cr1@example.cn", "language": "zh-CN"})
    await c.replicated()
    assert values(await c.held("cr-1", SG))["language"] == "zh-CN"
    # Renewed, as cert-manager would, and reread by the node (its listener) on SIGHUP.
    pki.issue(folder, "node", PRIMARY, "primary", folder / PRIMARY, days=30, hosts=pki.NODE_HOSTS)
    c.dep.procs[PRIMARY].send_signal(signal.SIGHUP)

    async def expired() -> bool:
        return datetime.datetime.now(datetime.UTC) > expires

    await eventually(expired, "the first node certificate has expired", 60)
    await c.put("cr-2", {"email": "cr2@example.cn", "language": "zh-CN"})
    await c.replicated()
    assert values(await c.held("cr-2", SG))["language"] == "zh-CN"
    status = await c.replication()
    assert status[SG].dead_lettered == 0 and not status[SG].last_error, status[SG]


async def test_a_large_request_is_read_only_once_its_caller_may_make_it(idle_cluster: Cluster):
    """Review: a request was read (parsed, and every number in it checked) before the caller's
    certificate or role was: 20 MB of empty consents to GrantConsents from a revoked
    certificate held the node's event loop 15 s (a health check waited as long) and took 1.3 GB.
    Now each method has a largest request (4 MiB; consents and bulk methods more), and one over 64 KiB
    is read only after the certificate and the role pass."""
    c = idle_cluster
    revoked = revocation_list(c)
    evil = c.dep.credentials("recipient", PRIMARY, "evil")
    revoked.write_text(f"{x509.load_pem_x509_certificate(evil.cert.read_bytes()).serial_number:x}\n")
    await c.start(PRIMARY)
    address = c.dep.addresses[PRIMARY]
    health = health_pb2_grpc.HealthStub(c.channel(PRIMARY, "operator", PRIMARY))
    method = "/residency.v1.ConsentService/GrantConsents"
    service = c.dep.credentials("service", PRIMARY, "checkout")
    reviewer = c.dep.credentials("reviewer", PRIMARY, "r")
    cases = [
        (evil, 10_000_000, grpc.StatusCode.UNAUTHENTICATED, "revoked"),  # 20 MB
        (evil, 100_000, grpc.StatusCode.UNAUTHENTICATED, "revoked"),  # 200 KB: under the bound, not read
        (service, 10_000_000, grpc.StatusCode.INVALID_ARGUMENT, "larger than 16777216 bytes"),
        (service, 100_000, grpc.StatusCode.INVALID_ARGUMENT, "context"),  # read, then checked
        # Without the permission: refused for it first, whatever the size.
        (reviewer, 10_000_000, grpc.StatusCode.PERMISSION_DENIED, "consents"),
    ]
    for creds, entries, code, says in cases:
        async with creds.channel(address) as ch:
            call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            began = time.monotonic()
            attack = asyncio.ensure_future(call(b"\x12\x00" * entries, timeout=60))
            while not attack.done() and time.monotonic() - began < 0.5:
                await asyncio.sleep(0.01)  # the request on its way, or read
            probe = time.monotonic()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=60)
            assert time.monotonic() - probe < 2.0, (entries, "the node was held")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await attack
            assert e.value.code() == code and says in (e.value.details() or ""), (entries, e.value.details())
            assert time.monotonic() - began < 5.0
    rss = [line for line in Path(f"/proc/{c.dep.procs[PRIMARY].pid}/status").read_text().splitlines()]
    (high,) = [int(line.split()[1]) for line in rss if line.startswith("VmHWM")]
    assert high < 600_000, f"the node's resident memory peaked at {high} kB"


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


async def test_tls_1_2_and_older_are_refused_at_the_handshake(module_cluster: Cluster):
    """The TLS 1.2 floor (`tls_floor`): every node answers a ClientHello of TLS 1.0 to 1.2
    offering every suite with no ServerHello, while TLS 1.3 completes with a certificate of
    the CA. Each node checked it before it opened its port, and said so."""
    op = module_cluster.dep.operator
    files = str(op.cert), str(op.key), str(op.ca)
    for region, address in module_cluster.dep.addresses.items():
        host, port = address.rsplit(":", 1)
        assert await asyncio.to_thread(tls_floor.accepts_tls12, host, int(port)) is False
        v13 = await asyncio.to_thread(tls_floor.handshake, host, int(port), ssl.TLSVersion.TLSv1_3, *files)
        assert v13 == "TLSv1.3"
        v12 = await asyncio.to_thread(tls_floor.handshake, host, int(port), ssl.TLSVersion.TLSv1_2, *files)
        assert v12 is None
        node_log = module_cluster.dep.node_log(region).read_text()
        assert "TLS 1.2 refused at the handshake: listeners serve TLS 1.3 only" in node_log


def rsa_server_credentials() -> grpc.ServerCredentials:
    """A certificate of another kind than `residency init`'s, as an operator's own CA might
    issue: RSA, self-signed, server authentication only."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name, start = pki.common_name("node"), datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (
        pki.builder(name, name, key.public_key(), start, 1)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return grpc.ssl_server_credentials([(pki.key_pem(key), pem)], pem, require_client_auth=True)


async def test_a_process_whose_grpc_loaded_without_the_floor_is_caught(tmp_path: Path):
    """The node checks the floor took instead of trusting it. This test process loaded grpc
    before `residency.cli` pinned the cipher list (conftest imports grpc first), so its
    listeners accept TLS 1.2, with the deployment's certificates or an RSA one alike, and
    `verify` refuses them."""
    d = tmp_path / "pki"
    pki.create_ca(d)
    pki.issue(d, "node", PRIMARY, "primary", d / "node", hosts=["127.0.0.1"])
    pair = [((d / "node.key").read_bytes(), (d / "node.crt").read_bytes())]
    ours = grpc.ssl_server_credentials(pair, (d / "ca.crt").read_bytes(), require_client_auth=True)
    for creds in (ours, rsa_server_credentials()):
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            assert await asyncio.to_thread(tls_floor.accepts_tls12, "127.0.0.1", port) is True
        finally:
            await server.stop(None)
        with pytest.raises(ConfigError, match=r"TLS 1\.2 is accepted: GRPC_SSL_CIPHER_SUITES was not"):
            await tls_floor.verify(creds)


def test_a_node_started_from_a_program_that_loaded_grpc_first_exits(tmp_path: Path):
    """End to end: `serve` run from a program that imported grpc before `residency.cli` stops
    with exit status 2 and says why, before it listens (the module cluster shows `residency
    serve` itself starting)."""
    paths = init_deployment(tmp_path / "dep")
    program = "import sys, grpc; from residency.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != tls_floor.VARIABLE}  # this process pinned it
    r = subprocess.run(
        [sys.executable, "-c", program, "serve", "--config", str(paths[PRIMARY])],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "TLS 1.2 is accepted: GRPC_SSL_CIPHER_SUITES was not" in r.stderr


def test_the_command_loads_grpc_only_after_pinning_the_cipher_list():
    """What the floor hangs on: in a fresh interpreter, `residency.cli.main` (the command's
    entry point) imports grpc only once GRPC_SSL_CIPHER_SUITES is set, whatever it imports."""
    program = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_SSL_CIPHER_SUITES"))
sys.meta_path.insert(0, Watch())
import residency.cli.main
print(seen)
"""
    env = {k: v for k, v in os.environ.items() if k != tls_floor.VARIABLE}
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr([tls_floor.TLS12_SUITES])


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
        listener.settimeout(60)
        port = listener.getsockname()[1]

        def answer() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
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
        server.join(60)
    assert r.returncode != 0 and "UNAVAILABLE" in r.stderr, r.stderr
    assert errors and "NO_SHARED_CIPHER" in errors[0], errors
