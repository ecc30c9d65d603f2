"""Key services that misbehave: a KMS that denies access or says the key is disabled, an
OpenBao behind a proxy that answers with an HTML error page, one that denies the token, and
one that never answers. Each is a real HTTP server on loopback that answers as those do; the
providers must say clearly what happened and which service, never that the data is corrupt."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from residency.server.api.errors import status_for
from residency.server.core.errors import KeyServiceDenied, KeyUnavailable
from residency.server.core.sealing import KeyDestroyed, SealError
from residency.server.keys.providers.kms import AwsKmsProvider
from residency.server.keys.providers.openbao import OpenBaoProvider

CTX = {"user": "u-1", "region": "eu-west-1", "purpose": "wrapping-key"}


class Answer:
    """What the server answers next: a status, a content type and a body, or a hang."""

    status, content_type, body, hang = 200, "application/json", b"{}", 0.0


@pytest.fixture
def server() -> Iterator[tuple[str, Answer]]:
    answer = Answer()
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # KMS (JSON 1.1 over POST) and OpenBao Transit alike
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            calls.append(self.headers.get("X-Amz-Target", self.path))
            if answer.hang:
                time.sleep(answer.hang)
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                self.wfile.write(answer.body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    answer.calls = calls  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", answer
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def kms(server, monkeypatch) -> Iterator[tuple[AwsKmsProvider, Answer]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url, answer = server
    p = AwsKmsProvider("alias/residency-eu-west-1", region_name="eu-west-1", endpoint_url=url)
    yield p, answer
    p.close()


def _kms_error(answer: Answer, code: str) -> None:
    answer.status, answer.content_type = 400, "application/x-amz-json-1.1"
    answer.body = json.dumps({"__type": code, "message": "as KMS says it"}).encode()


def test_kms_access_denied_is_permission_denied_naming_kms_not_corrupt_data(kms):
    provider, answer = kms
    _kms_error(answer, "AccessDeniedException")
    for call in (lambda: provider.unwrap(b"blob", CTX), lambda: provider.new_data_key(CTX)):
        with pytest.raises(KeyServiceDenied, match="AWS KMS denied") as e:
            call()
        assert status_for(e.value).code == 7  # PERMISSION_DENIED
        assert "does not decrypt" not in str(e.value)


def test_kms_unwraps_with_one_call_and_a_disabled_key_is_destroyed(kms):
    provider, answer = kms
    answer.body = json.dumps({"Plaintext": "AAAA", "KeyId": "k"}).encode()
    answer.content_type = "application/x-amz-json-1.1"
    assert provider.unwrap(b"blob", CTX) == b"\0\0\0"
    assert answer.calls == ["TrentService.Decrypt"]  # no DescribeKey before every Decrypt
    _kms_error(answer, "DisabledException")
    with pytest.raises(KeyDestroyed, match="disabled"):
        provider.unwrap(b"blob", CTX)


@pytest.fixture
def bao(server) -> Iterator[tuple[OpenBaoProvider, Answer]]:
    url, answer = server
    p = OpenBaoProvider(url, "token", "eu-west-1", timeout=0.5)
    yield p, answer
    p.close()


def test_an_html_error_page_before_openbao_is_unavailable_naming_openbao(bao):
    provider, answer = bao
    answer.status, answer.content_type = 502, "text/html"
    answer.body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    with pytest.raises(KeyUnavailable, match="OpenBao .*answered 502.*not OpenBao's JSON") as e:
        provider.unwrap(b"vault:v1:abc", CTX)
    assert status_for(e.value).code == 14  # UNAVAILABLE
    answer.status = 200  # even a success status with a page is no answer
    with pytest.raises(KeyUnavailable, match="not OpenBao's JSON"):
        provider.new_data_key(CTX)


def test_openbao_permission_denied_is_permission_denied(bao):
    provider, answer = bao
    answer.status, answer.body = (
        403,
        json.dumps({"errors": ["1 error occurred:\n\t* permission denied\n\n"]}).encode(),
    )
    with pytest.raises(KeyServiceDenied, match="OpenBao denied") as e:
        provider.wrap(b"k" * 32, CTX)
    assert status_for(e.value).code == 7


def test_an_openbao_that_never_answers_is_unavailable_within_the_timeout(bao):
    provider, answer = bao
    answer.hang = 3.0
    started = time.monotonic()
    with pytest.raises(KeyUnavailable, match="OpenBao cannot be reached"):
        provider.unwrap(b"vault:v1:abc", CTX)
    assert time.monotonic() - started < 2.5


def test_an_openbao_restarting_is_unavailable_and_a_missing_key_destroyed(bao):
    """Seen in tests/faults/test_key_outage.py: OpenBao unsealed but still electing its
    leader answers 500 "... active cluster node not found", which once read as a destroyed
    key (FAILED_PRECONDITION: the caller would not retry)."""
    provider, answer = bao
    for status, error in (
        (500, "local node not active but active cluster node not found"),
        (503, "Vault is sealed"),
    ):
        answer.status, answer.body = status, json.dumps({"errors": [error]}).encode()
        with pytest.raises(KeyUnavailable, match=f"OpenBao answered {status}") as e:
            provider.new_data_key(CTX)
        assert status_for(e.value).code == 14  # UNAVAILABLE
    # ... while OpenBao's own word that the key is gone stays a destroyed key.
    answer.status, answer.body = 400, json.dumps({"errors": ["encryption key not found"]}).encode()
    with pytest.raises(KeyDestroyed, match="destroyed"):
        provider.unwrap(b"vault:v1:abc", CTX)


def test_material_that_is_not_transits_is_refused_before_openbao_is_asked(bao):
    """Another provider's wrapped key (binary) once escaped as a UnicodeDecodeError."""
    provider, answer = bao
    answer.body = json.dumps({"data": {"plaintext": "AAAA"}}).encode()
    for call in (provider.unwrap, provider.rewrap):
        with pytest.raises(SealError, match="not OpenBao Transit's") as e:
            call(b"\x93\xff local kek material", CTX)
        assert status_for(e.value).code == 9  # FAILED_PRECONDITION
