"""The WebSocket port's HTTP layer against hostile and odd requests: the
sans-IO `HTTPConnection` (h11 underneath) byte by byte, the listener
in-process on memory streams with Trio's autojump clock (so timeouts
fire without waiting), and a few requests over real sockets where TCP
itself matters (a body left unread, pipelining).

Every test asserts what a client sees: one complete response parsed by
h11's client side, then end of input."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from mlink.config import load_config
from mlink.server import Server
from mlink.transport.http import (
    HEAD_TIMEOUT,
    LINGER_TIMEOUT,
    MAX_HEAD_BYTES,
    MAX_HEADER_FIELDS,
    READ_CHUNK,
    HTTPConnection,
    HTTPError,
    PeerGone,
    Request,
)
from mlink.transport.websocket import WebSocketEndpoint, parse_ip
from tests.serverproc import DOMAIN, MlinkProcess, mlink

GET = b"GET /.well-known/host-meta HTTP/1.1\r\nHost: localhost\r\n\r\n"
GET_JSON = b"GET /.well-known/host-meta.json HTTP/1.1\r\nHost: localhost\r\n\r\n"
# Bounds a test against a real socket; every answer is immediate.
SOCKET_TIMEOUT = 10.0


# -- a client's view of a response ---------------------------------------------------


def parse_response(data: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
    """`data` (everything the server sent before closing) as exactly one
    response and its body; fails on anything before EOF after it."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response), response
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage), event
    # Nothing follows the one response: after it, only the server's EOF.
    assert isinstance(client.next_event(), h11.ConnectionClosed)
    return response, body


def header(response: h11.Response, name: bytes) -> str | None:
    values = [v.decode() for n, v in response.headers if n == name]
    return ", ".join(values) if values else None


def refused(data: bytes, method: bytes = b"GET") -> tuple[int, str]:
    """Status and body of an error response that closes the connection."""
    response, body = parse_response(data, method)
    assert header(response, b"connection") == "close"
    assert (header(response, b"content-type") or "").startswith("text/plain")
    return response.status_code, body.decode()


# -- sans-IO: HTTPConnection ------------------------------------------------------------


def feed(*chunks: bytes) -> Request | None:
    conn = HTTPConnection()
    request = None
    for chunk in chunks:
        request = conn.receive_data(chunk)
    return request


def test_a_head_arriving_a_byte_at_a_time() -> None:
    conn = HTTPConnection()
    assert not conn.started
    results = [conn.receive_data(GET[i:i + 1]) for i in range(len(GET))]
    assert conn.started and results[:-1] == [None] * (len(GET) - 1)
    request = results[-1]
    assert request is not None and request.path == "/.well-known/host-meta"
    assert request.version == "HTTP/1.1" and request.header("host") == "localhost"
    assert conn.raw == GET


def test_pipelined_bytes_are_kept_for_replay_but_not_parsed() -> None:
    conn = HTTPConnection()
    request = conn.receive_data(GET + GET_JSON)
    assert request is not None and request.path == "/.well-known/host-meta"
    assert conn.raw == GET + GET_JSON
    # More input does not start a second request.
    assert conn.receive_data(b"garbage") is request
    response, _ = parse_response(conn.response(200, b"x"))
    assert response.status_code == 200 and header(response, b"connection") == "close"


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_head_is_431(chunked: bool) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    conn = HTTPConnection()
    with pytest.raises(HTTPError) as info:
        if chunked:
            for i in range(0, len(head), READ_CHUNK):
                conn.receive_data(head[i:i + READ_CHUNK])
        else:
            conn.receive_data(head)  # complete: h11 alone would parse it
    assert info.value.status == 431 and "too large" in info.value.message
    assert len(conn.raw) <= MAX_HEAD_BYTES + READ_CHUNK  # refused as soon as it was over
    status, body = refused(conn.error_response(info.value))
    assert status == 431 and str(MAX_HEAD_BYTES) in body


def test_head_that_never_ends_is_refused_once_over_the_limit() -> None:
    conn = HTTPConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(HTTPError) as info:
        for _ in range(MAX_HEAD_BYTES):
            conn.receive_data(b"X-Pad: 0123456789abcdef\r\n")
    assert info.value.status == 431
    assert len(conn.raw) <= MAX_HEAD_BYTES + 32


def test_head_of_exactly_the_limit_is_accepted() -> None:
    start = b"GET / HTTP/1.1\r\nHost: a\r\nX: "
    pad = MAX_HEAD_BYTES - len(start) - 4
    request = feed(start + b"a" * pad + b"\r\n\r\n")
    assert request is not None and len(request.headers["x"]) == pad


def test_too_many_header_fields_is_431() -> None:
    fields = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADER_FIELDS))
    assert feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields[: -len(b"X-0: y\r\n") - 1] + b"\r\n")
    with pytest.raises(HTTPError) as info:
        feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert info.value.status == 431 and "header fields" in info.value.message


@pytest.mark.parametrize(("head", "status", "text"), [
    (b"NOT HTTP\r\n\r\n", 400, "request line"),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "request line"),
    (b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n", 400, "request line"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "request line"),  # TLS
    (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400, "header"),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n  folded\r\n\r\n", 400, "folding"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: \xff\r\n\r\n", 400, "ASCII"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP/1.1"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", 413, "body"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 413, "body"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "chunked"),
])
def test_malformed_requests(head: bytes, status: int, text: str) -> None:
    conn = HTTPConnection()
    with pytest.raises(HTTPError) as info:
        conn.receive_data(head)
    assert (info.value.status, text in info.value.message) == (status, True), info.value.message
    # h11 still lets us answer, whatever state the parse ended in.
    assert refused(conn.error_response(info.value)) == (status, f"{info.value.message}\n")


def test_a_complaint_quoting_the_request_is_kept_short() -> None:
    with pytest.raises(HTTPError) as info:
        feed(b"X" * 4000 + b"\r\n\r\n")
    assert info.value.status == 400 and len(info.value.message) < 200


def test_end_of_input_before_a_whole_head() -> None:
    for chunks in ([b""], [b"GET / HTTP/1.1\r\nHo", b""]):
        with pytest.raises(PeerGone):
            feed(*chunks)


def test_requests_that_are_accepted() -> None:
    request = feed(b"GET /xmpp-websocket?x=1 HTTP/1.1\r\nHost: a\r\n"
                   b"Sec-WebSocket-Protocol: chat\r\nsec-websocket-protocol: XMPP \r\n\r\n")
    assert request is not None and request.path == "/xmpp-websocket"
    assert request.tokens("sec-websocket-protocol") == ["chat", "xmpp"]
    # HTTP/1.0 needs no Host; bare LF line ends (RFC 9112 §2.2); a body
    # on a method that is refused anyway (405) is left unread.
    assert feed(b"GET / HTTP/1.0\r\n\r\n") is not None
    assert feed(b"GET / HTTP/1.1\nHost: a\n\n") is not None
    assert feed(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n") is not None
    post = feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    assert post is not None and post.method == "POST"


def test_response_to_head_has_the_length_but_no_body() -> None:
    conn = HTTPConnection()
    conn.receive_data(GET.replace(b"GET", b"HEAD", 1))
    data = conn.response(200, b"0123456789", "application/json", (("X-Extra", "1"),))
    assert data.endswith(b"\r\n\r\n")
    response, body = parse_response(data, method=b"HEAD")
    assert body == b"" and header(response, b"content-length") == "10"
    assert header(response, b"content-type") == "application/json"
    assert header(response, b"x-extra") == "1" and header(response, b"cache-control") == "no-cache"


# -- the listener in-process (memory streams, virtual time) -----------------------------


@pytest.fixture
def endpoint(tmp_path: Path, cert_files: tuple[Path, Path]) -> Iterator[WebSocketEndpoint]:
    cert, key = cert_files
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    server = Server(load_config(tmp_path / "s" / "mlink.xml"))
    yield WebSocketEndpoint(server, secure=False)


async def converse(endpoint: WebSocketEndpoint, *chunks: bytes,
                   close: bool = False) -> tuple[bytes, float]:
    """Send `chunks` (then EOF if `close`) to a listener connection; all
    it sends until it closes, and how long (virtual time) that took."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve_http, server, parse_ip("127.0.0.1"))
        for chunk in chunks:
            await client.send_all(chunk)
        if close:
            await client.send_eof()
        while data := await client.receive_some():
            received += data
        elapsed = trio.current_time() - start
        await client.aclose()
    return bytes(received), elapsed


async def test_host_meta_in_process(endpoint: WebSocketEndpoint,
                                    autojump_clock: trio.testing.MockClock) -> None:
    data, elapsed = await converse(endpoint, GET)
    response, body = parse_response(data)
    assert response.status_code == 200 and b"/xmpp-websocket" in body
    assert elapsed < LINGER_TIMEOUT  # answered at once; EOF right after the response
    data, _ = await converse(endpoint, GET.replace(b"GET", b"HEAD", 1))
    response, body = parse_response(data, method=b"HEAD")
    assert response.status_code == 200 and body == b""
    assert int(header(response, b"content-length") or 0) > 0


async def test_host_meta_names_the_configured_public_url(
        endpoint: WebSocketEndpoint, autojump_clock: trio.testing.MockClock) -> None:
    """Behind a reverse proxy the administrator names the public URL, and
    host-meta gives exactly that, whatever the request's Host."""
    public = "wss://chat.example.org/xmpp-websocket"
    config = endpoint.server.config
    endpoint.server.config = dataclasses.replace(
        config, websocket=dataclasses.replace(config.websocket, public_url=public))
    data, _ = await converse(endpoint, GET_JSON.replace(b"Host: localhost", b"Host: evil.example"))
    response, body = parse_response(data)
    assert response.status_code == 200
    assert json.loads(body)["links"][0]["href"] == public


async def test_pipelined_requests_get_one_response(
        endpoint: WebSocketEndpoint, autojump_clock: trio.testing.MockClock) -> None:
    data, _ = await converse(endpoint, GET + GET_JSON + GET)
    response, body = parse_response(data)  # exactly one, then EOF
    assert response.status_code == 200 and body.startswith(b"<?xml")
    assert header(response, b"connection") == "close"


async def test_a_request_that_stops_midway_gets_408(
        endpoint: WebSocketEndpoint, autojump_clock: trio.testing.MockClock) -> None:
    data, elapsed = await converse(endpoint, b"GET /.well-known/host-meta HTTP/1.1\r\nHo")
    status, body = refused(data)
    assert status == 408 and "did not arrive" in body
    assert HEAD_TIMEOUT <= elapsed <= HEAD_TIMEOUT + LINGER_TIMEOUT


async def test_a_head_sent_a_byte_at_a_time_is_still_bounded(
        endpoint: WebSocketEndpoint, autojump_clock: trio.testing.MockClock) -> None:
    """Slowloris: each byte arrives in time, the whole head does not."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve_http, server, parse_ip("127.0.0.1"))
        start = trio.current_time()

        async def drip() -> None:
            try:
                for byte in GET[:-1]:
                    await client.send_all(bytes([byte]))
                    await trio.sleep(HEAD_TIMEOUT / 20)  # virtual time: the client's pace
            except trio.BrokenResourceError:
                pass

        nursery.start_soon(drip)
        while data := await client.receive_some():
            received += data
        assert trio.current_time() - start <= HEAD_TIMEOUT + LINGER_TIMEOUT
        nursery.cancel_scope.cancel()
    assert refused(bytes(received))[0] == 408


async def test_an_idle_connection_is_closed_without_a_word(
        endpoint: WebSocketEndpoint, autojump_clock: trio.testing.MockClock) -> None:
    # A browser's spare preconnected socket: no 408 (Chrome would retry on it).
    data, elapsed = await converse(endpoint)
    assert data == b"" and HEAD_TIMEOUT <= elapsed <= HEAD_TIMEOUT + 1


async def test_a_client_that_leaves_midway_gets_nothing(
        endpoint: WebSocketEndpoint, autojump_clock: trio.testing.MockClock) -> None:
    data, elapsed = await converse(endpoint, b"GET / HTTP/1.1\r\n", close=True)
    assert data == b"" and elapsed < 1


@pytest.mark.parametrize(("chunks", "status", "text"), [
    ((b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES,), 431, "too large"),
    # The limit holds however the head is cut up, and it is refused before
    # the client has finished sending it.
    (tuple(b"X-Pad: %0100d\r\n" % i for i in range(200)), 431, "too large"),
    ((b"GET / HTTP/1.1\r\nHost: a\r\n" + b"A: b\r\n" * (MAX_HEADER_FIELDS + 1) + b"\r\n",),
     431, "header fields"),
    ((b"BREW /pot HTCPCP/1.0\r\n\r\n",), 400, "request line"),
    ((b"GET / HTTP/1.1\r\nX\x00: y\r\n\r\n",), 400, "header"),
    ((b"PUT /.well-known/host-meta HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody",),
     405, "GET"),
    ((b"GET /.well-known/host-meta HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody",),
     413, "body"),
    ((b"GET /xmpp-websocket HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",),
     413, "body"),
])
async def test_hostile_requests_in_process(
        endpoint: WebSocketEndpoint, autojump_clock: trio.testing.MockClock,
        chunks: tuple[bytes, ...], status: int, text: str) -> None:
    data, elapsed = await converse(endpoint, *chunks)
    got, body = refused(data)
    assert got == status and text in body, (got, body)
    assert elapsed <= LINGER_TIMEOUT  # refused at once, not after a timeout


# -- over real sockets ------------------------------------------------------------------


def socket_exchange(port: int, data: bytes) -> bytes:
    """Send `data`, end our side, and read everything until the server's EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_pipelined_requests_over_tcp(embedded_server: MlinkProcess) -> None:
    assert embedded_server.ws_port is not None
    response, body = parse_response(socket_exchange(embedded_server.ws_port, GET_JSON + GET))
    assert response.status_code == 200 and body.startswith(b"{")


def test_a_refused_request_body_does_not_reset_the_response(
        embedded_server: MlinkProcess) -> None:
    """A body the server never reads (405) is drained after the response,
    so the client gets the 405 and not a connection reset."""
    assert embedded_server.ws_port is not None
    body = b"x" * (1024 * 1024)
    head = (b"POST /.well-known/host-meta HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    status, text = refused(socket_exchange(embedded_server.ws_port, head + body))
    assert status == 405 and "GET" in text


def test_oversized_head_over_tcp(embedded_server: MlinkProcess) -> None:
    assert embedded_server.ws_port is not None
    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: 0123456789abcdef\r\n" * 2000 + b"\r\n"
    status, text = refused(socket_exchange(embedded_server.ws_port, head))
    assert status == 431 and "too large" in text
