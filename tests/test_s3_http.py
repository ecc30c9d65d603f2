"""The S3 sink's own HTTP/1.1 (`replicator/sinks/http.py`) against a real SeaweedFS: over TLS
verified against AWS_CA_BUNDLE (a TLS terminator in front of the endpoint), through the
environment's proxy (CONNECT for https, the absolute form for http, with the proxy's
credentials), after the endpoint closed its keep-alive connections, and with the answer forms
an S3 endpoint may use besides a Content-Length (chunked, to the connection's end, after an
interim 100)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path

import pytest

from residency.replicator.sinks import http
from residency.replicator.sinks.http import HttpError, Pool
from residency.replicator.sinks.s3 import S3Error, object_key
from residency.server.keys import pki
from residency.v1 import replica_pb2
from tests.conftest import SeaweedFS
from tests.faults.tools import pipe as faults_pipe
from tests.test_s3 import sink


def upstream(seaweed: SeaweedFS) -> tuple[str, int]:
    host, port = seaweed.endpoint.removeprefix("http://").split(":")
    return host, int(port)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await faults_pipe(reader, writer)
    finally:
        writer.close()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b_addr: tuple[str, int]) -> None:
    b_reader, b_writer = await asyncio.open_connection(*b_addr)
    await asyncio.gather(pipe(a[0], b_writer), pipe(b_reader, a[1]))


class TlsTerminator:
    """HTTPS in front of the endpoint, with a certificate for 127.0.0.1 from a CA of the test's."""

    def __init__(self, to: tuple[str, int], directory: Path, host: str = "127.0.0.1"):
        pki.create_ca(directory)
        name = f"s3-{host}"
        pki.issue(directory, "node", "eu-west-1", name, directory / name, hosts=[host])
        self.ca = directory / "ca.crt"
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(directory / f"{name}.crt", directory / f"{name}.key")
        self._to = to
        self.connections = 0

    async def start(self) -> str:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            await splice((r, w), self._to)

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self._tls)
        return f"https://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self._server.close()


class ForwardProxy:
    """An HTTP proxy as a company's egress would be: CONNECT tunnels and absolute-form requests,
    each only with the proxy's credentials; what it was asked for is kept."""

    def __init__(self, user: str, password: str):
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.asked: list[str] = []  # request lines, in order
        self.forged = b""  # sent in the clear right after a tunnel's answer, if any

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        line, *fields = head.decode("latin-1").split("\r\n")
        self.asked.append(line)
        auth = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
        if auth.get("proxy-authorization") != self._auth:
            w.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            w.close()
            return
        method, target, _ = line.split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            w.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + self.forged)
            await splice((r, w), (host, int(port)))
            return
        # The absolute form, passed on as it came (an HTTP/1.1 server must accept it): one
        # connection to the origin per client connection, as the requests on it come.
        host_port = target.removeprefix("http://").split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        b_reader, b_writer = await asyncio.open_connection(host, int(port))
        b_writer.write(head)
        await asyncio.gather(pipe(r, b_writer), pipe(b_reader, w))

    def close(self) -> None:
        self._server.close()


def written(seaweed: SeaweedFS, user_ids: list[str]) -> set[str]:
    listed = seaweed.client().list_objects_v2(Bucket="bkt").get("Contents", [])
    return {o["Key"] for o in listed} & {object_key("residency/", u) for u in user_ids}


def copies(*user_ids: str, version: int = 1) -> list[replica_pb2.SealedCopy]:
    return [replica_pb2.SealedCopy(user_id=u, version=version) for u in user_ids]


async def test_an_https_endpoint_is_verified_against_the_ca_bundle(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    tls = TlsTerminator(upstream(seaweed), tmp_path / "pki")
    url = await tls.start()
    # The same CA, a certificate for another name than the one the sink connects to.
    elsewhere = TlsTerminator(upstream(seaweed), tmp_path / "pki", host="localhost")
    elsewhere_url = await elsewhere.start()
    other = tmp_path / "other"
    pki.create_ca(other)  # a CA the endpoint's certificate is not from
    try:
        for bundle, at, why in (
            (other / "ca.crt", url, "certificate verify failed"),  # same CA name, another key
            (tls.ca, elsewhere_url, "IP address mismatch"),
        ):
            monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
            s = sink(at)
            try:
                with pytest.raises(ssl.SSLCertVerificationError, match=why) as e:
                    await s.apply("cn-north", copies("u-1"))
                assert s.permanent(e.value) is None  # retried: the bundle may be fixed
            finally:
                await s.close()
        assert written(seaweed, ["u-1"]) == set()

        monkeypatch.setenv("AWS_CA_BUNDLE", str(tls.ca))
        s = sink(url, concurrency=4)
        try:
            users = [f"u-{i}" for i in range(20)]
            await s.apply("cn-north", copies(*users))
            await s.apply("cn-north", copies(*users, version=2))  # If-Match on kept connections
        finally:
            await s.close()
        assert written(seaweed, users) == {object_key("residency/", u) for u in users}
        assert tls.connections <= 4 + 1  # the batch's 4 and the first check's: kept alive
    finally:
        tls.close()
        elsewhere.close()


async def test_the_environments_proxy_carries_https_by_connect_and_http_by_absolute_url(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    tls = TlsTerminator(upstream(seaweed), tmp_path / "pki")
    https_url = await tls.start()
    proxy = ForwardProxy("egress", "p@ss word")
    at = await proxy.start()
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tls.ca))
    monkeypatch.setenv("HTTPS_PROXY", f"http://egress:p%40ss%20word@{at}")
    monkeypatch.setenv("HTTP_PROXY", f"http://egress:p%40ss%20word@{at}")
    try:
        for url, user in ((https_url, "over-tls"), (seaweed.endpoint, "in-the-clear")):
            s = sink(url, concurrency=1)
            try:
                await s.apply("cn-north", copies(user))
            finally:
                await s.close()
        assert written(seaweed, ["over-tls", "in-the-clear"]) == {
            object_key("residency/", "over-tls"),
            object_key("residency/", "in-the-clear"),
        }
        tunnel = f"CONNECT {https_url.removeprefix('https://')} HTTP/1.1"
        absolute = f"PUT {seaweed.endpoint}/bkt/residency/manifest.json HTTP/1.1"
        assert proxy.asked == [tunnel, absolute], proxy.asked

        # A proxy (or anyone on the way to it) that follows the tunnel's answer with an answer
        # of its own, in the clear, as if from the endpoint: refused, nothing taken from it.
        proxy.forged = b"HTTP/1.1 200 OK\r\nX-Amz-Meta-Residency-Version: 999999\r\nContent-Length: 0\r\n\r\n"
        s = sink(https_url)
        try:
            with pytest.raises(HttpError, match="bytes of its own"):
                await s.apply("cn-north", copies("forged-for", version=2))  # a HEAD first
        finally:
            await s.close()
        proxy.forged = b""

        # Wrong proxy credentials: the operator's to fix, so retried (an S3 refusal would send
        # every copy to the dead letters), by CONNECT and by the absolute form alike.
        monkeypatch.setenv("HTTPS_PROXY", f"http://egress:wrong@{at}")
        monkeypatch.setenv("HTTP_PROXY", f"http://egress:wrong@{at}")
        for url, why in (
            (https_url, r"refused a tunnel .*\(407\)"),
            (seaweed.endpoint, r"credentials \(407\)"),
        ):
            s = sink(url)
            try:
                with pytest.raises(HttpError, match=why) as e:
                    await s.apply("cn-north", copies("refused-by-the-proxy"))
                assert s.permanent(e.value) is None
            finally:
                await s.close()
        assert written(seaweed, ["refused-by-the-proxy"]) == set()
    finally:
        proxy.close()
        tls.close()


async def test_keep_alive_connections_the_endpoint_closed_are_replaced_without_an_error(seaweed: SeaweedFS):
    await asyncio.to_thread(seaweed.make_bucket, "bkt")
    s = sink(seaweed.endpoint, concurrency=4)
    try:
        await s.apply("cn-north", copies(*(f"a-{i}" for i in range(8))))
        assert s._http is not None and len(s._http._idle) == 4  # kept for the next batch
        await asyncio.to_thread(seaweed.stop)  # every kept connection is closed by the endpoint
        await asyncio.to_thread(seaweed.start)
        users = [f"b-{i}" for i in range(8)]
        await s.apply("cn-north", copies(*users))  # once, no retry: no error reaches the worker
        assert written(seaweed, users) == {object_key("residency/", u) for u in users}
    finally:
        await s.close()


class Canned:
    """An endpoint that gives each request the next of a list of answers, as raw bytes, and
    closes a connection when its answers run out; it counts connections and keeps requests."""

    def __init__(self, *answers: bytes):
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0

    async def start(self) -> str:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            while self.answers:
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                    length = head.partition(b"Content-Length: ")[2].partition(b"\r\n")[0]
                    await r.readexactly(int(length or 0))
                except asyncio.IncompleteReadError:
                    break
                self.requests.append(head)
                answer = self.answers.pop(0)
                if answer is HANG:
                    await r.read()  # until the client gives up
                    break
                if answer is DROP:
                    break
                w.write(answer)
                await w.drain()
                if answer.endswith(CLOSE):
                    break
            w.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"


HANG = b"(no answer)"
DROP = b"(the connection ends without an answer)"
CLOSE = b"(then the connection ends)"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
ERROR_XML = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"


async def test_each_answer_form_is_read_whole_and_its_connection_kept_only_when_it_may_be():
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (ERROR_XML[:10], ERROR_XML[10:]))
    canned = Canned(
        b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\nX-T: 1\r\n\r\n",
        b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nETag: "e1"\r\nContent-Length: 0\r\n\r\n',
        b'HTTP/1.1 200 OK\r\nETag: "e2"\r\nX-Amz-Meta-Residency-Version: 7\r\nContent-Length: 5\r\n\r\n',
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",  # HTTP/1.0: not kept
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",  # not kept
        b"HTTP/1.1 500 Internal Error\r\n\r\n" + ERROR_XML + CLOSE,  # to the end: not kept
    )
    pool = Pool(await canned.start())
    try:
        a = await pool.request("PUT", "/bkt/k", {"Host": "h"}, b"body")
        assert (a.status, S3Error.from_body(a.status, a.body).code) == (503, "SlowDown")
        a = await pool.request("PUT", "/bkt/k", {"Host": "h"}, b"body")
        assert (a.status, a.headers["etag"]) == (200, '"e1"')
        a = await pool.request("HEAD", "/bkt/k", {"Host": "h"})  # a length, but no body to a HEAD
        assert (a.status, a.headers["x-amz-meta-residency-version"], a.body) == (200, "7", b"")
        for _ in range(4):
            assert (await pool.request("DELETE", "/bkt/k", {"Host": "h"})).status in (200, 204)
        a = await pool.request("DELETE", "/bkt/k", {"Host": "h"})
        assert a.status == 500 and a.body == ERROR_XML + CLOSE
        assert pool._idle == []
        assert canned.connections == 3  # one for the first six, then after each "not kept"
        assert [r.split(b"\r\n")[0] for r in canned.requests] == [
            b"PUT /bkt/k HTTP/1.1",
            b"PUT /bkt/k HTTP/1.1",
            b"HEAD /bkt/k HTTP/1.1",
            *[b"DELETE /bkt/k HTTP/1.1"] * 5,
        ]
        assert b"Content-Length: 4\r\n" in canned.requests[0]
    finally:
        await pool.close()


async def test_a_kept_connection_closed_unanswered_is_replaced_once_and_the_fence_checked_again():
    canned = Canned(OK, DROP, OK)
    pool = Pool(await canned.start())
    try:
        await pool.request("PUT", "/bkt/k", {"Host": "h"}, b"x")
        await pool.request("PUT", "/bkt/k", {"Host": "h"}, b"x")  # sent again on a new connection
        assert (canned.connections, len(canned.requests)) == (2, 3)
    finally:
        await pool.close()

    class Deadline(Exception):
        pass

    checks = 0

    def fence() -> None:  # passes for the first send, not for the one again
        nonlocal checks
        checks += 1
        if checks == 3:
            raise Deadline()

    canned = Canned(OK, DROP, OK)
    pool = Pool(await canned.start())
    try:
        await pool.request("PUT", "/bkt/k", {"Host": "h"}, b"x", check=fence)
        with pytest.raises(Deadline):
            await pool.request("PUT", "/bkt/k", {"Host": "h"}, b"x", check=fence)
        assert len(canned.requests) == 2 and pool._idle == []  # never sent again
    finally:
        await pool.close()


async def test_a_connection_with_bytes_nobody_asked_for_is_not_reused():
    canned = Canned(OK + b'HTTP/1.1 200 OK\r\nETag: "someone-else\'s"\r\n\r\n', OK)
    pool = Pool(await canned.start())
    try:
        await pool.request("DELETE", "/bkt/k", {"Host": "h"})
        a = await pool.request("HEAD", "/bkt/k", {"Host": "h"})
        assert "etag" not in a.headers and canned.connections == 2
    finally:
        await pool.close()


async def test_a_connection_idle_past_the_keep_time_is_not_reused(monkeypatch: pytest.MonkeyPatch):
    canned = Canned(OK, OK)
    pool = Pool(await canned.start())
    try:
        await pool.request("DELETE", "/bkt/k", {"Host": "h"})
        monkeypatch.setattr(http, "KEEP_IDLE", 0.0)  # as if it had waited past the keep time
        await pool.request("DELETE", "/bkt/k", {"Host": "h"})
        assert canned.connections == 2
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # not HTTP at all
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 500 Error\r\nContent-Length: %d\r\n\r\n" % (http.MAX_BODY + 1),
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded: continuation\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 0\r\n\r\n",  # a bare LF inside a line
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort" + CLOSE[:0],  # then the connection ends
        b"HTTP/1.1 500 Internal Error\r\n\r\n" + b"x" * (http.MAX_BODY + 1) + CLOSE,
        b"",  # a new connection that ends at once: not sent again
    ],
)
async def test_a_broken_answer_is_a_transient_error_and_its_connection_is_not_kept(answer: bytes):
    canned = Canned(answer)
    pool = Pool(await canned.start(), timeout=5.0)
    try:
        with pytest.raises(HttpError) as e:
            await pool.request("PUT", "/bkt/residency/copies/secret-user.sealedcopy", {"Host": "h"}, b"x")
        assert "secret-user" not in str(e.value)
        assert isinstance(e.value, ConnectionError) and sink().permanent(e.value) is None
        assert pool._idle == [] and len(canned.requests) == 1
    finally:
        await pool.close()


async def test_a_silent_endpoint_times_out_and_its_connection_is_not_kept():
    canned = Canned(HANG)
    pool = Pool(await canned.start(), timeout=0.5)
    try:
        with pytest.raises(TimeoutError):
            await pool.request("PUT", "/bkt/k", {"Host": "h"}, b"x")
        assert pool._idle == []
    finally:
        await pool.close()


async def test_a_header_value_with_a_line_break_is_never_sent():
    canned = Canned(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    pool = Pool(await canned.start())
    try:
        with pytest.raises(HttpError):
            await pool.request("PUT", "/bkt/k", {"Host": "h", "If-Match": '"e1"\r\nX-Injected: 1'}, b"x")
        assert canned.requests == []
    finally:
        await pool.close()
