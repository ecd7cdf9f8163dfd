"""Module HTTP handlers on the WebSocket/HTTPS listener, in process (no
subprocess), for what tests cannot do over a real socket: a peer that
is not this machine (plain HTTP refused by http_upload unless from a
trusted proxy), a handler that crashes (500, the listener goes on), and
a client that stops reading a download (dropped after the idle time)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from mlink.config import load_config
from mlink.module import HTTPExchange
from mlink.modules.http_upload.storage import Meta, UploadStore
from mlink.server import Server
from mlink.transport.websocket import WebSocketEndpoint, parse_ip
from tests.serverproc import DOMAIN, mlink

REMOTE = "198.51.100.7"  # TEST-NET-2: never this machine
MODULE = '<modules><module name="http_upload"/></modules>\n  <data '


@pytest.fixture
def config_path(tmp_path: Path, cert_files: tuple[Path, Path]) -> Iterator[Path]:
    cert, key = cert_files
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    path = tmp_path / "s" / "mlink.xml"
    path.write_text(path.read_text().replace("<data ", MODULE, 1))
    yield path


async def exchange(endpoint: WebSocketEndpoint, peer: str, request: bytes) -> bytes:
    """Send `request` as `peer` through memory streams; all the response."""
    client, server = trio.testing.memory_stream_pair()
    out = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve_http, server, parse_ip(peer))
        await client.send_all(request)
        await client.send_eof()  # a client that has said everything
        with trio.fail_after(10):
            while chunk := await client.receive_some(65536):
                out += chunk
    return out


GET = (b"GET /upload/" + b"0" * 32 + b"/" + b"A" * 24 + b"/x.txt HTTP/1.1\r\n"
       b"Host: localhost\r\n\r\n")


async def test_plain_http_from_elsewhere_is_refused(config_path: Path) -> None:
    server = Server(load_config(config_path))
    reply = await exchange(WebSocketEndpoint(server, secure=False), REMOTE, GET)
    assert reply.startswith(b"HTTP/1.1 403 ") and reply.endswith(b"use https\n"), reply
    # From this machine (a local reverse proxy) it is served: no such file.
    reply = await exchange(WebSocketEndpoint(server, secure=False), "127.0.0.1", GET)
    assert reply.startswith(b"HTTP/1.1 404 "), reply


async def test_plain_http_from_a_trusted_proxy_is_served(config_path: Path) -> None:
    text = config_path.read_text()
    config_path.write_text(text.replace(
        "<data ", "<websocket><trusted-proxy>198.51.100.0/24</trusted-proxy></websocket>\n"
                  "  <data ", 1))
    server = Server(load_config(config_path))
    reply = await exchange(WebSocketEndpoint(server, secure=False), REMOTE, GET)
    assert reply.startswith(b"HTTP/1.1 404 "), reply


async def test_crashing_handler_costs_its_request_only(config_path: Path) -> None:
    server = Server(load_config(config_path))
    calls = 0

    async def crash(ex: HTTPExchange) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug in a module")

    server.add_http_handler("/crash/", crash)
    endpoint = WebSocketEndpoint(server, secure=True)
    reply = await exchange(endpoint, REMOTE, b"GET /crash/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500 "), reply
    # The listener goes on: the next request is answered as usual.
    reply = await exchange(endpoint, REMOTE,
                           b"GET /.well-known/host-meta HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and calls == 1


async def test_body_past_content_length_is_not_read(config_path: Path) -> None:
    """h11 holds the body to Content-Length: bytes after it are never
    handed to the module as body."""
    server = Server(load_config(config_path))
    seen: list[bytes] = []

    async def echo(ex: HTTPExchange) -> None:
        while (piece := await ex.receive_body(5)) is not None:
            seen.append(piece)
        await ex.respond(200, (), b"ok")

    server.add_http_handler("/echo/", echo)
    reply = await exchange(WebSocketEndpoint(server, secure=True), REMOTE,
                           b"PUT /echo/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n"
                           b"helloEXTRA-BYTES-THAT-ARE-NOT-BODY")
    assert reply.startswith(b"HTTP/1.1 200 ") and b"".join(seen) == b"hello"


async def test_prefix_must_be_a_directory(config_path: Path) -> None:
    server = Server(load_config(config_path))
    module = server.modules[0]
    with pytest.raises(ValueError, match="must start and end with"):
        module.add_http_handler("/nothing", lambda ex: trio.sleep(0))
    with pytest.raises(ValueError, match="already served"):
        server.add_http_handler("/upload/", lambda ex: trio.sleep(0))


async def test_download_to_a_client_that_stops_reading_is_dropped(config_path: Path) -> None:
    text = config_path.read_text()
    config_path.write_text(text.replace(
        '<module name="http_upload"/>',
        '<module name="http_upload"><idle-timeout>1</idle-timeout></module>', 1))
    server = Server(load_config(config_path))
    store = UploadStore(server.config.data_dir / "upload")
    owner, slot_id = "0" * 32, "A" * 24
    part, fd = store.open_part(owner, slot_id, 4 * 1024 * 1024)
    os.write(fd, b"z" * (4 * 1024 * 1024))
    assert store.commit(part, fd, owner, slot_id, Meta("big.bin", "application/zip",
                                                       4 * 1024 * 1024))
    client, server_side = trio.testing.lockstep_stream_pair()
    endpoint = WebSocketEndpoint(server, secure=True)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve_http, server_side, parse_ip(REMOTE))
        await client.send_all(GET.replace(b"/x.txt", b"/big.bin"))
        head = await client.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 200 ")
        # ... and the client reads nothing more: the server gives up.
    assert 1 <= trio.current_time() - started < 10
