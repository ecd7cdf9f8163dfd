"""WebSocket listener policy without a subprocess: which plain ws:// peers
count as encrypted, the Origin list, request-head parsing, and an
in-process run of the listener for a peer address that tests cannot
connect from (a non-loopback client when TLS is required)."""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from trio_websocket import wrap_client_stream

from mlink.config import ConfigError, load_config
from mlink.server import Server
from mlink.transport.http import HTTPError, ReplayStream, parse_head
from mlink.transport.websocket import (
    WebSocketEndpoint,
    origin_allowed,
    parse_ip,
    plain_counts_as_encrypted,
)
from tests.serverproc import DOMAIN, mlink

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
OPEN = f"<open xmlns='{FRAMING}' to='{DOMAIN}' version='1.0'/>"
REMOTE = "198.51.100.7"  # TEST-NET-2: never this machine
PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::1/128"))


@pytest.mark.parametrize(("peer", "expected"), [
    ("127.0.0.1", True),
    ("127.5.6.7", True),
    ("::1", True),
    ("::ffff:127.0.0.1", True),  # IPv4 client on a dual-stack listener
    ("10.1.2.3", True),  # trusted proxy network
    ("::ffff:10.1.2.3", True),
    ("2001:db8::1", True),
    ("2001:db8::2", False),
    (REMOTE, False),
    ("192.168.1.1", False),
])
def test_plain_counts_as_encrypted(peer: str, expected: bool) -> None:
    assert plain_counts_as_encrypted(parse_ip(peer), PROXIES) is expected


def test_unknown_peer_is_not_encrypted() -> None:
    assert parse_ip("not-an-address") is None
    assert not plain_counts_as_encrypted(None, PROXIES)


def test_origin_allowed() -> None:
    allowed = frozenset({"https://chat.example.org"})
    assert origin_allowed("https://evil.example", frozenset())  # no list: all
    assert origin_allowed("https://chat.example.org", allowed)
    assert origin_allowed("HTTPS://CHAT.EXAMPLE.ORG/", allowed)
    assert origin_allowed(None, allowed)  # not a browser page
    assert not origin_allowed("https://evil.example", allowed)
    assert not origin_allowed("http://chat.example.org", allowed)
    assert not origin_allowed("null", allowed)


def test_parse_head() -> None:
    request = parse_head(b"GET /xmpp-websocket?x=1 HTTP/1.1\r\nHost: a\r\n"
                         b"Sec-WebSocket-Protocol: chat\r\nsec-websocket-protocol: XMPP ")
    assert request.path == "/xmpp-websocket" and request.header("host") == "a"
    assert request.tokens("sec-websocket-protocol") == ["chat", "xmpp"]
    for bad in (b"GET /\r\n", b"GET / HTTP/1.1\r\n Folded: x", b"GET / HTTP/1.1\r\nA : b",
                b"GET / HTTP/1.1\r\nX: \xff"):
        with pytest.raises(HTTPError):
            parse_head(bad)


async def test_replay_stream_gives_back_what_was_read() -> None:
    left, right = trio.testing.memory_stream_pair()
    replay = ReplayStream(right, b"abcdef")
    await left.send_all(b"gh")
    assert await replay.receive_some(4) == b"abcd"
    assert await replay.receive_some(100) == b"ef"
    assert await replay.receive_some(100) == b"gh"


# -- the listener in-process ---------------------------------------------------------


@pytest.fixture
def config_path(tmp_path: Path, cert_files: tuple[Path, Path]) -> Iterator[Path]:
    cert, key = cert_files
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    yield tmp_path / "s" / "mlink.xml"


def add_websocket_element(path: Path, inner: str) -> None:
    text = path.read_text()
    path.write_text(text.replace("<data ", f"<websocket>{inner}</websocket>\n  <data ", 1))


async def first_messages(endpoint: WebSocketEndpoint, peer: str) -> list[str]:
    """Connect as `peer` through memory streams, send <open/>, collect what
    the server sends until it closes."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    received: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve_http, server_stream, parse_ip(peer))
        ws = await wrap_client_stream(nursery, client_stream, "localhost", "/xmpp-websocket",
                                      subprotocols=["xmpp"])
        await ws.send_message(OPEN)
        with trio.fail_after(10):
            try:
                while True:
                    message = await ws.get_message()
                    assert isinstance(message, str)
                    received.append(message)
                    if message.startswith("<close"):
                        await ws.aclose()
            except Exception:  # ConnectionClosed: the server is done
                pass
        nursery.cancel_scope.cancel()
    return received


async def test_plain_ws_from_elsewhere_is_refused_when_tls_is_required(
        config_path: Path) -> None:
    server = Server(load_config(config_path))
    assert server.config.tls.required
    messages = await first_messages(WebSocketEndpoint(server, secure=False), REMOTE)
    assert messages[0].startswith(f"<open xmlns='{FRAMING}'")
    error = ET.fromstring(messages[1])
    assert error[0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}policy-violation"
    assert "wss://" in (error.findtext("{urn:ietf:params:xml:ns:xmpp-streams}text") or "")
    assert messages[2] == f"<close xmlns='{FRAMING}'/>"


async def test_plain_ws_from_a_trusted_proxy_is_served(config_path: Path) -> None:
    add_websocket_element(config_path, "<trusted-proxy>198.51.100.0/24</trusted-proxy>")
    server = Server(load_config(config_path))
    endpoint = WebSocketEndpoint(server, secure=False)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve_http, server_stream, parse_ip(REMOTE))
        ws = await wrap_client_stream(nursery, client_stream, "localhost", "/xmpp-websocket",
                                      subprotocols=["xmpp"])
        await ws.send_message(OPEN)
        with trio.fail_after(10):
            assert (await ws.get_message()).startswith("<open ")  # type: ignore[union-attr]
            features = await ws.get_message()
        assert "<mechanism>PLAIN</mechanism>" in features  # type: ignore[operator]
        await ws.aclose()
        nursery.cancel_scope.cancel()


async def test_plain_ws_from_elsewhere_is_served_when_tls_is_optional(
        config_path: Path) -> None:
    text = config_path.read_text()
    config_path.write_text(text.replace('required="true"', 'required="false"'))
    server = Server(load_config(config_path))
    messages_seen: list[str] = []
    client_stream, server_stream = trio.testing.memory_stream_pair()
    endpoint = WebSocketEndpoint(server, secure=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.serve_http, server_stream, parse_ip(REMOTE))
        ws = await wrap_client_stream(nursery, client_stream, "localhost", "/xmpp-websocket",
                                      subprotocols=["xmpp"])
        await ws.send_message(OPEN)
        with trio.fail_after(10):
            for _ in range(2):
                message = await ws.get_message()
                assert isinstance(message, str)
                messages_seen.append(message)
        await ws.aclose()
        nursery.cancel_scope.cancel()
    # Unencrypted and allowed: SCRAM (and PLAIN, as on TCP without TLS).
    assert "<mechanism>SCRAM-SHA-256</mechanism>" in messages_seen[1]


@pytest.mark.parametrize(("inner", "problem"), [
    ("<origin>chat.example.org</origin>", "scheme://host"),
    ("<origin>https://chat.example.org/path</origin>", "scheme://host"),
    ("<trusted-proxy>proxy.example</trusted-proxy>", "IP address or network"),
    ("<unknown/>", "unknown element"),
])
def test_websocket_config_errors(config_path: Path, inner: str, problem: str) -> None:
    add_websocket_element(config_path, inner)
    with pytest.raises(ConfigError, match=problem):
        load_config(config_path)


def test_websocket_config_loads_and_renders_back(config_path: Path, tmp_path: Path) -> None:
    from mlink.config import render_config

    add_websocket_element(config_path, "<origin>HTTPS://Chat.Example.org/</origin>"
                                       "<trusted-proxy>10.0.0.1</trusted-proxy>")
    text = config_path.read_text()
    config_path.write_text(text.replace(
        "<websocket>", "<websocket see-other-uri='wss://b.example/xmpp-websocket'>"))
    cfg = load_config(config_path)
    assert cfg.websocket.origins == ("https://chat.example.org",)
    assert cfg.websocket.trusted_proxies == ("10.0.0.1/32",)
    assert cfg.websocket.see_other_uri == "wss://b.example/xmpp-websocket"
    again = config_path.parent / "again.xml"
    again.write_text(render_config(cfg, config_path.parent))
    assert load_config(again).websocket == cfg.websocket


def test_websocket_tls_listener_needs_a_certificate(tmp_path: Path) -> None:
    path = tmp_path / "mlink.xml"
    path.write_text("<mlink><domain>localhost</domain><listen type='websocket-tls'/>"
                    "<tls required='false'/></mlink>")
    with pytest.raises(ConfigError, match='type="websocket-tls" listener needs'):
        load_config(path)
