"""HTTP/1.1 for the S3 sink: a pool of keep-alive connections over asyncio streams, with TLS and
the environment's proxy, and nothing else.

Written here, not taken from aiohttp (the sink's client until 2026-12-01), because aiohttp's
request machinery was 42 % of the sink's CPU per object (py-spy, docs/performance.md): cookie
jar, redirects, URL objects, tracing hooks, multidicts, for requests that need none of them.
The sink sends three kinds of request, all of one shape: a PUT with a body whose length it
knows, a HEAD, a DELETE; one at a time per connection; no redirects (an S3 endpoint that
redirects is misconfigured, and the signature would not survive one anyway). So a request is
one write, and an answer is a head read up to its blank line and a body read by its length,
its chunks, or to the connection's end (RFC 9112, sections 4 to 7). The parsing is strict on
purpose: an answer framed two ways, or not quite HTTP, is an error and its connection is
closed, never kept, so that no answer can be taken for the next request's (a HEAD's version
or a PUT's entity tag attributed to another user's object). `tests/test_s3_http.py` exercises
each part against SeaweedFS, a TLS terminator and a forward proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

# No S3 answer this sink reads has a body near this (an error document is a few hundred bytes).
MAX_BODY = 1 << 20
# A kept connection unused for longer is closed rather than reused (aiohttp's default too): a
# NAT or firewall may have dropped it without a word, and a request on it would only time out.
KEEP_IDLE = 15.0
USER_AGENT = "residency-s3-sink"

_STATUS = re.compile(r"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: .*)?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;.*)?")
_UNSAFE = re.compile(r"[\r\n\0]")
# Header names found to be tokens (they are few: the sink's own and an endpoint's usual ones).
_TOKENS: set[str] = set()


def _is_token(name: str) -> bool:
    if name in _TOKENS:
        return True
    if not _TOKEN.fullmatch(name):
        return False
    if len(_TOKENS) < 1024:
        _TOKENS.add(name)
    return True


class HttpError(ConnectionError):
    """The connection failed or the answer was not HTTP: transient, like a refused connection."""


class _Stale(HttpError):
    """A kept connection ended before any byte of its answer: the server had closed it."""


class Answer:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers  # names in lower case
        self.body = body


def tls_context() -> ssl.SSLContext:
    """The system's trust store, or the bundle in AWS_CA_BUNDLE as botocore would use it;
    host names checked."""
    return ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)


def _host_port(netloc: str, scheme: str) -> tuple[str, int]:
    url = urlsplit(f"//{netloc}")
    return url.hostname or "", url.port or (443 if scheme == "https" else 80)


class _Connection:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.idle_since = reader, writer, 0.0

    def usable(self, now: float) -> bool:
        """Kept, unused not too long, not closed by the other end, and nothing unasked for
        waiting to be read (which would be taken for the next request's answer)."""
        return (
            now - self.idle_since < KEEP_IDLE
            and not self.writer.transport.is_closing()
            and not self.reader.at_eof()
            and not _unread(self.reader)
        )

    def abort(self) -> None:
        """Closed at once with a reset: what asyncio or the kernel still holds unsent is
        dropped (a PUT abandoned at a fence's deadline should not leave after it; what is
        already on the wire cannot be called back, see docs/operators.md)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def _unread(reader: asyncio.StreamReader) -> int:
    # StreamReader has no public way to ask; its buffer has been `_buffer` since Python 3.4.
    return len(reader._buffer)  # type: ignore[attr-defined]


class Pool:
    """Keep-alive connections to one origin. The caller bounds how many requests are in flight
    (the sink's `_slots`); the pool keeps every connection a finished request leaves usable."""

    def __init__(self, origin: str, *, proxy: str | None = None, timeout: float = 5.0):
        url = urlsplit(origin)
        self._scheme, self._netloc = url.scheme, url.netloc
        self._host, self._port = _host_port(url.netloc, url.scheme)
        self._tls = tls_context() if url.scheme == "https" else None
        if proxy and "://" not in proxy:
            proxy = "http://" + proxy  # as botocore reads `HTTPS_PROXY=host:port`
        self._proxy = urlsplit(proxy) if proxy else None
        self._proxy_auth = ""
        if self._proxy is not None and self._proxy.username is not None:
            user = f"{unquote(self._proxy.username)}:{unquote(self._proxy.password or '')}"
            self._proxy_auth = f"Proxy-Authorization: Basic {base64.b64encode(user.encode()).decode()}\r\n"
        # A plain-http origin through a proxy is asked for by its absolute URL; everything else
        # (no proxy, or a CONNECT tunnel for https) by its path.
        self._absolute = self._proxy is not None and self._tls is None
        self._timeout = timeout
        self._idle: list[_Connection] = []  # the longest unused first
        self.closed = False
        self.loop = asyncio.get_running_loop()  # its connections work on this loop only

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes = b"",
        check: Callable[[], object] | None = None,
    ) -> Answer:
        """Send one request (`target`: the path, already percent-encoded) and read its answer.
        `check()` runs right before each send and may raise to stop it (a batch's fence).
        Connecting, sending with reading the answer's head, and reading its body are each
        bounded by the pool's timeout. A kept connection that turns out closed before any
        byte of an answer is replaced once, by a new one: the requests here (PUTs with
        conditions, HEADs, DELETEs) may be sent again."""
        head = self._head(method, target, headers, body)
        fresh = False  # after a stale connection: a new one, not another kept one
        while True:
            conn = None if fresh else self._take()
            kept = conn is not None
            if conn is None:
                async with asyncio.timeout(self._timeout):
                    conn = await self._connect()
            if check is not None:
                try:
                    check()
                except BaseException:
                    if kept and not self.closed:
                        self._idle.append(conn)  # unused: as good as before
                    else:
                        conn.abort()
                    raise
            try:
                answer, keep = await self._exchange(conn, method, head, body, kept)
            except _Stale:
                conn.abort()
                fresh = True
                continue
            except BaseException:  # a timeout, a cancelled batch, a broken answer: never kept
                conn.abort()
                raise
            if keep and not self.closed:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.writer.close()
            return answer

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle and now - idle[0].idle_since >= KEEP_IDLE:  # unused too long: closed
            idle.pop(0).abort()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn
            conn.abort()
        return None

    def _head(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        if self._absolute:
            target = f"http://{self._netloc}{target}"
        # A value with a line break would add a header of its own (an entity tag the endpoint sent).
        if _UNSAFE.search("".join(headers.values())) or not all(map(_is_token, headers)):
            raise HttpError("a request header holds a line break, or its name is not a token")
        lines = [f"{k}: {v}\r\n" for k, v in headers.items()]
        lines.append(f"User-Agent: {USER_AGENT}\r\n")
        if body or method == "PUT":
            lines.append(f"Content-Length: {len(body)}\r\n")
        if self._absolute:
            lines.append(self._proxy_auth)
        return f"{method} {target} HTTP/1.1\r\n{''.join(lines)}\r\n".encode("latin-1")

    async def _connect(self) -> _Connection:
        # Happy eyeballs, as aiohttp did: a host's unreachable IPv6 address costs 0.25 s, not
        # the whole connect timeout.
        eyeballs: dict[str, Any] = {"happy_eyeballs_delay": 0.25, "interleave": 1}
        if self._proxy is None:
            r, w = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._tls,
                server_hostname=self._host if self._tls else None,
                **eyeballs,
            )
            return _Connection(r, w)
        p = self._proxy
        if p.scheme not in ("http", "https"):
            raise HttpError(f"the environment's proxy is {p.scheme}://, not an HTTP proxy")
        proxy_host, proxy_port = _host_port(p.netloc.rpartition("@")[2], p.scheme)
        proxy_tls = tls_context() if p.scheme == "https" else None
        r, w = await asyncio.open_connection(proxy_host, proxy_port, ssl=proxy_tls, **eyeballs)
        conn = _Connection(r, w)
        if self._tls is None:
            return conn
        try:
            authority = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
            w.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{self._proxy_auth}\r\n".encode())
            status, _, _ = await _read_head(r)  # a 2xx's framing headers mean nothing (RFC 9110)
            if not 200 <= status < 300:
                raise HttpError(f"the proxy refused a tunnel to the S3 endpoint ({status})")
            if _unread(r):  # sent in the clear after the tunnel's answer: never the endpoint's
                raise HttpError("the proxy sent bytes of its own after opening the tunnel")
            await w.start_tls(self._tls, server_hostname=self._host)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _exchange(
        self, conn: _Connection, method: str, head: bytes, body: bytes, kept: bool
    ) -> tuple[Answer, bool]:
        r, w = conn.reader, conn.writer
        try:
            async with asyncio.timeout(self._timeout):
                w.write(head + body)
                await w.drain()
                status, version, headers = await _read_head(r, stale_if_empty=kept)
                while status < 200:  # an interim answer (none is asked for): the real one follows
                    status, version, headers = await _read_head(r)
            if status == 407 and self._absolute:  # the proxy's, not the endpoint's: fixable, so retried
                raise HttpError("the proxy asked for credentials (407): check HTTP_PROXY's user:password")
            connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
            keep = "close" not in connection and (version == "1" or "keep-alive" in connection)
            coding, length = headers.get("transfer-encoding"), headers.get("content-length")
            if version == "0" and coding is not None:  # HTTP/1.0 has no chunks: framed wrongly
                raise HttpError("the S3 endpoint's answer is framed ambiguously")
            if status in (204, 304) and (coding is not None or length not in (None, "0")):
                keep = False  # a body where none may be: whatever follows is not kept for later
            if method == "HEAD" or status in (204, 304) or (length == "0" and coding is None):
                return Answer(status, headers, b""), keep
            async with asyncio.timeout(self._timeout):
                if coding is not None:
                    if length is not None or coding.lower() != "chunked":  # framed two ways, or coded
                        raise HttpError("the S3 endpoint's answer is framed ambiguously")
                    data = await _read_chunked(r)
                elif length is not None:
                    if not (length.isascii() and length.isdigit()) or int(length) > MAX_BODY:
                        raise HttpError("the S3 endpoint's answer has a bad Content-Length")
                    data = await r.readexactly(int(length))
                else:  # delimited by the connection's end
                    data, keep = b"", False
                    while chunk := await r.read(65536):
                        data += chunk
                        if len(data) > MAX_BODY:
                            raise HttpError("the S3 endpoint's answer is too long")
        except (HttpError, TimeoutError, asyncio.CancelledError):
            raise
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise HttpError("the S3 endpoint's connection broke during an exchange") from None
        return Answer(status, headers, data), keep

    def forget(self) -> None:
        """Closed without touching its connections: for a pool whose loop is not running here
        (their transports are that loop's); the sockets close when collected."""
        self.closed = True
        self._idle = []

    async def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        if self.loop.is_closed():  # a loop that is gone: its transports cannot be touched
            return
        for conn in idle:
            conn.abort()  # nothing to finish on an unused connection


async def _read_head(
    r: asyncio.StreamReader, stale_if_empty: bool = False
) -> tuple[int, str, dict[str, str]]:
    """The status, the HTTP/1.x minor version and the header fields (names in lower case,
    repeated fields joined by commas) of the next answer on `r`."""
    try:
        raw = await r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionResetError) as e:
        nothing = not e.partial if isinstance(e, asyncio.IncompleteReadError) else not _unread(r)
        if stale_if_empty and nothing:
            raise _Stale() from None
        raise HttpError("the S3 endpoint's connection broke before its answer") from None
    except asyncio.LimitOverrunError:  # over the stream's 64 KiB: no S3 endpoint's head
        raise HttpError("the S3 endpoint's answer has an oversized head") from None
    # No bare CR or LF (each ends a line only as CRLF), no NUL.
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf or b"\0" in raw:
        raise HttpError("the S3 endpoint's answer has a malformed header line")
    status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
    m = _STATUS.fullmatch(status_line)
    if m is None:
        raise HttpError("the S3 endpoint did not answer in HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _is_token(name):  # also no folded lines, no space before the colon
            raise HttpError("the S3 endpoint's answer has a malformed header line")
        name, value = name.lower(), value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(m[2]), m[1], headers


async def _read_chunked(r: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        m = _CHUNK_SIZE.fullmatch((await r.readuntil(b"\r\n"))[:-2])
        if m is None:
            raise HttpError("the S3 endpoint's chunked answer is malformed")
        size = int(m[1], 16)
        if size == 0:
            while await r.readuntil(b"\r\n") != b"\r\n":  # trailers, if any, end in a blank line
                pass
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            raise HttpError("the S3 endpoint's answer is too long")
        chunk = await r.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise HttpError("the S3 endpoint's chunked answer is malformed")
        parts.append(chunk[:-2])
