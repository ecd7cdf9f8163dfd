"""XMPP over WebSocket (RFC 7395) and host-meta (XEP-0156) against a real
`mlink serve`, with trio-websocket as the client library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from tests.rawclient import RawClient, read_stanza, resource
from tests.serverproc import ALICE, ALICE_PW, BOB, BOB_PW, DOMAIN, MlinkProcess, start_mlink

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
STREAMS = "urn:ietf:params:xml:ns:xmpp-streams"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
OPEN = f"<open xmlns='{FRAMING}' to='{DOMAIN}' version='1.0'/>"
CLOSE = f"<close xmlns='{FRAMING}'/>"
# No reply takes this long on loopback; it bounds a hung test.
READ_TIMEOUT = 10.0
# The default stanza limit (limits stanza-bytes) of the test servers.
STANZA_LIMIT = 256 * 1024
ALLOWED_ORIGIN = "https://chat.example.org"
SEE_OTHER = "wss://other.example.org/xmpp-websocket"


def ws_url(server: MlinkProcess, path: str = "/xmpp-websocket", host: str = "127.0.0.1") -> str:
    return f"ws://{host}:{server.ws_port}{path}"


class WSClient:
    """A thin XMPP-over-WebSocket client for wire-level assertions."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: str | bytes) -> None:
        await self.ws.send_message(message)

    async def recv(self) -> str:
        with trio.fail_after(READ_TIMEOUT):
            message = await self.ws.get_message()
        assert isinstance(message, str), message
        return message

    async def recv_element(self) -> ET.Element:
        return ET.fromstring(await self.recv())

    async def open(self) -> ET.Element:
        """Send <open/>; check the server's; return its features."""
        await self.send(OPEN)
        reply = await self.recv_element()
        assert reply.tag == f"{{{FRAMING}}}open" and reply.get("from") == DOMAIN, reply.attrib
        assert reply.get("version") == "1.0" and reply.get("id")
        features = await self.recv_element()
        assert features.tag == "{http://etherx.jabber.org/streams}features"
        return features

    async def auth_plain(self, user: str, password: str) -> ET.Element:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        return await self.recv_element()

    async def auth_scram(self, mechanism: str, user: str, password: str) -> ET.Element:
        """SCRAM (RFC 5802) without channel binding, checking the server's
        signature; returns <success/>."""
        digest = "sha256" if mechanism == "SCRAM-SHA-256" else "sha1"
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={user},r={nonce}"
        initial = base64.b64encode(f"n,,{first_bare}".encode()).decode()
        await self.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{initial}</auth>")
        challenge = await self.recv_element()
        assert challenge.tag == f"{{{SASL}}}challenge", ET.tostring(challenge)
        server_first = base64.b64decode(challenge.text or "").decode()
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        assert fields["r"].startswith(nonce)
        without_proof = f"c={base64.b64encode(b'n,,').decode()},r={fields['r']}"
        salted = hashlib.pbkdf2_hmac(digest, password.encode(), base64.b64decode(fields["s"]),
                                     int(fields["i"]))
        client_key = hmac.digest(salted, b"Client Key", digest)
        stored = hashlib.new(digest, client_key).digest()
        auth_message = f"{first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(stored, auth_message, digest)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}"
        await self.send(f"<response xmlns='{SASL}'>{base64.b64encode(final.encode()).decode()}"
                        "</response>")
        success = await self.recv_element()
        assert success.tag == f"{{{SASL}}}success", ET.tostring(success)
        verifier = base64.b64decode(success.text or "").decode()
        server_key = hmac.digest(salted, b"Server Key", digest)
        expected = base64.b64encode(hmac.digest(server_key, auth_message, digest)).decode()
        assert verifier == f"v={expected}"
        return success

    async def bind(self, res: str) -> str:
        await self.send("<iq xmlns='jabber:client' type='set' id='bind1'>"
                        "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                        f"<resource>{res}</resource></bind></iq>")
        reply = await self.recv_element()
        jid = reply.find(".//{urn:ietf:params:xml:ns:xmpp-bind}jid")
        assert reply.get("type") == "result" and jid is not None, ET.tostring(reply)
        return jid.text or ""

    async def login(self, user: str = "alice", password: str = ALICE_PW,
                    mechanism: str = "PLAIN", res: str = "web") -> str:
        features = await self.open()
        mechanisms = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
        assert mechanism in mechanisms, mechanisms
        if mechanism == "PLAIN":
            assert (await self.auth_plain(user, password)).tag == f"{{{SASL}}}success"
        else:
            await self.auth_scram(mechanism, user, password)
        features = await self.open()
        assert features.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None
        return await self.bind(res)

    async def expect_stream_error(self, condition: str) -> str:
        """The server sends `condition`, then <close/>; returns the error text."""
        error = await self.recv_element()
        assert error.tag == "{http://etherx.jabber.org/streams}error", ET.tostring(error)
        assert error[0].tag == f"{{{STREAMS}}}{condition}", ET.tostring(error)
        assert await self.recv() == CLOSE
        return error.findtext(f"{{{STREAMS}}}text") or ""

    async def expect_closed(self) -> int | None:
        """The WebSocket is closed by the server; its close code."""
        with trio.fail_after(READ_TIMEOUT), pytest.raises(ConnectionClosed) as info:
            await self.ws.get_message()
        reason = info.value.reason
        return None if reason is None else reason.code


@asynccontextmanager
async def connect(url: str, **kwargs: object) -> AsyncIterator[WSClient]:
    kwargs.setdefault("subprotocols", ["xmpp"])
    async with open_websocket_url(url, **kwargs) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "xmpp"
        yield WSClient(ws)


def http_request(port: int, head: bytes) -> tuple[int, dict[str, str], str]:
    """Send a raw request head; (status, headers, body) of the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    lines = head_text.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body.decode()


def upgrade_head(path: str = "/xmpp-websocket", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").encode()


# -- login and chat -------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"])
async def test_login_bind_and_close_handshake(embedded_server: MlinkProcess,
                                              mechanism: str) -> None:
    async with connect(ws_url(embedded_server)) as client:
        features = await client.open()
        # RFC 7395 §3.9: TLS belongs to the WebSocket layer, never STARTTLS.
        assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is None
        await client.send(OPEN.replace("to=", "id='x' to="))  # a second <open/> is an error
        assert await client.expect_stream_error("not-well-formed")
    async with connect(ws_url(embedded_server)) as client:
        res = resource()
        assert await client.login(mechanism=mechanism, res=res) == f"{ALICE}/{res}"
        # RFC 7395 §3.6: our <close/> is answered with <close/>, then the
        # server closes the WebSocket normally.
        await client.send(CLOSE)
        assert await client.recv() == CLOSE
        assert await client.expect_closed() == 1000


async def test_messages_both_ways_with_a_tcp_client(embedded_server: MlinkProcess,
                                                    ca_file: Path) -> None:
    tcp = RawClient(embedded_server.c2s_port, ca_file)
    try:
        bob = tcp.login(DOMAIN, "bob", BOB_PW, resource=resource())
        async with connect(ws_url(embedded_server)) as client:
            alice = await client.login(res=resource())
            await client.send(f"<message xmlns='jabber:client' to='{bob}' type='chat' id='w1'>"
                              "<body>hello from the web</body></message>")
            got = read_stanza(tcp, "message", "w1")
            assert got.get("from") == alice and got.findtext("{jabber:client}body") == \
                "hello from the web"
            tcp.send(f"<message to='{alice}' type='chat' id='t1'><body>hello &amp; welcome"
                     "</body></message>")
            reply = await client.recv_element()
            assert reply.tag == "{jabber:client}message" and reply.get("id") == "t1"
            assert reply.get("from") == bob
            assert reply.findtext("{jabber:client}body") == "hello & welcome"
            await client.send(CLOSE)
            assert await client.recv() == CLOSE
    finally:
        tcp.close()


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("message", [
    "<presence xmlns='jabber:client'/><presence xmlns='jabber:client'/>",
    "<message xmlns='jabber:client' to='bob@localhost'><body>half",
    "hello",
])
async def test_a_message_that_is_not_one_element_is_not_well_formed(
        embedded_server: MlinkProcess, message: str) -> None:
    async with connect(ws_url(embedded_server)) as client:
        await client.login(res=resource())
        await client.send(message)
        await client.expect_stream_error("not-well-formed")
        assert await client.expect_closed() == 1000


async def test_binary_frame_is_a_stream_error(embedded_server: MlinkProcess) -> None:
    async with connect(ws_url(embedded_server)) as client:
        await client.login(res=resource())
        await client.send(b"<presence xmlns='jabber:client'/>")
        # RFC 7395 §3.2: text frames only; RFC 6455 §7.4.1: 1003 for a data
        # type the endpoint does not accept.
        assert "text frames" in await client.expect_stream_error("unsupported-encoding")
        assert await client.expect_closed() == 1003


async def test_stream_header_instead_of_open(embedded_server: MlinkProcess) -> None:
    async with connect(ws_url(embedded_server)) as client:
        await client.send("<stream:stream xmlns='jabber:client' xmlns:stream="
                          f"'http://etherx.jabber.org/streams' to='{DOMAIN}' version='1.0'>")
        # RFC 7395 §3.5: our <open/> first, then the error.
        assert (await client.recv_element()).tag == f"{{{FRAMING}}}open"
        await client.expect_stream_error("not-well-formed")


async def test_oversized_message(embedded_server: MlinkProcess) -> None:
    body = "x" * (STANZA_LIMIT + 1000)
    async with connect(ws_url(embedded_server)) as client:
        await client.login(res=resource())
        await client.send(f"<message xmlns='jabber:client' to='{BOB}'><body>{body}</body>"
                          "</message>")
        # As on TCP: past the stanza limit, policy-violation.
        await client.expect_stream_error("policy-violation")
    async with connect(ws_url(embedded_server)) as client:
        await client.login(res=resource())
        # Far past it, the WebSocket layer stops reading: 1009 (RFC 6455
        # §7.4.1), possibly while the client is still sending.
        try:
            await client.send("x" * (3 * STANZA_LIMIT))
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason else None
        else:
            code = await client.expect_closed()
        assert code == 1009


async def test_unauthenticated_stanza_is_refused(embedded_server: MlinkProcess) -> None:
    async with connect(ws_url(embedded_server)) as client:
        await client.open()
        await client.send(f"<message xmlns='jabber:client' to='{BOB}'><body>hi</body></message>")
        await client.expect_stream_error("not-authorized")


# -- HTTP -------------------------------------------------------------------------------


def test_handshake_without_xmpp_subprotocol_is_refused(embedded_server: MlinkProcess) -> None:
    assert embedded_server.ws_port is not None
    status, _, body = http_request(embedded_server.ws_port, upgrade_head())
    assert status == 400 and "'xmpp' WebSocket subprotocol is required" in body
    status, _, body = http_request(
        embedded_server.ws_port, upgrade_head(extra="Sec-WebSocket-Protocol: chat, mqtt\r\n"))
    assert status == 400 and "subprotocol" in body


async def test_client_library_sees_the_refusal(embedded_server: MlinkProcess) -> None:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url(embedded_server), subprotocols=["chat"]):
            pass
    assert info.value.status_code == 400
    assert b"subprotocol" in (info.value.body or b"")


@pytest.mark.parametrize(("head", "status", "text"), [
    (b"GET /xmpp-websocket HTTP/1.1\r\nHost: localhost\r\n\r\n", 426, "WebSocket client"),
    (b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n", 404, "/xmpp-websocket"),
    (b"POST /.well-known/host-meta HTTP/1.1\r\nHost: localhost\r\n\r\n", 405, "GET"),
    (b"GET / HTTP/2.0\r\nHost: localhost\r\n\r\n", 505, "HTTP/1.1"),
    (b"NOT HTTP\r\n\r\n", 400, "request line"),
    (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400, "header"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431, "too large"),
    (upgrade_head().replace(b"Version: 13", b"Version: 8"), 426, "version"),
])
def test_http_errors(embedded_server: MlinkProcess, head: bytes, status: int, text: str) -> None:
    assert embedded_server.ws_port is not None
    got, headers, body = http_request(embedded_server.ws_port, head)
    assert got == status and text in body, (got, body)
    assert headers["connection"] == "close" and headers["content-type"].startswith("text/plain")


def test_host_meta(embedded_server: MlinkProcess) -> None:
    """XEP-0156: both forms name the endpoint as the client reached it."""
    base = f"http://localhost:{embedded_server.ws_port}/.well-known"
    with urllib.request.urlopen(f"{base}/host-meta", timeout=READ_TIMEOUT) as resp:
        assert resp.headers["Content-Type"].startswith("application/xrd+xml")
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        xrd = ET.fromstring(resp.read())
    assert xrd.tag == "{http://docs.oasis-open.org/ns/xri/xrd-1.0}XRD"
    links = [(link.get("rel"), link.get("href"))
             for link in xrd.iter("{http://docs.oasis-open.org/ns/xri/xrd-1.0}Link")]
    href = f"ws://localhost:{embedded_server.ws_port}/xmpp-websocket"
    assert links == [("urn:xmpp:alt-connections:websocket", href)]
    with urllib.request.urlopen(f"{base}/host-meta.json", timeout=READ_TIMEOUT) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        jrd = json.loads(resp.read())
    assert jrd == {"links": [{"rel": "urn:xmpp:alt-connections:websocket", "href": href}]}


def test_host_meta_ignores_a_foreign_host(embedded_server: MlinkProcess) -> None:
    """Issue 18: a Host header naming another site does not make host-meta
    send clients there; the link names the served domain and this port."""
    assert embedded_server.ws_port is not None
    status, _, body = http_request(
        embedded_server.ws_port,
        b"GET /.well-known/host-meta.json HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert status == 200
    href = json.loads(body)["links"][0]["href"]
    assert href == f"ws://localhost:{embedded_server.ws_port}/xmpp-websocket"


def test_host_meta_needs_a_sane_host(embedded_server: MlinkProcess) -> None:
    assert embedded_server.ws_port is not None
    status, _, body = http_request(
        embedded_server.ws_port,
        b"GET /.well-known/host-meta HTTP/1.1\r\nHost: evil'/><x\r\n\r\n")
    assert status == 400 and "Host" in body


# -- configured servers: Origin list, wss, see-other-uri ---------------------------


@pytest.fixture(scope="module")
def restricted_server(tmp_path_factory: pytest.TempPathFactory,
                      cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    """Origins restricted, and a wss:// listener."""
    def edit(text: str) -> str:
        text = re.sub(r'(<listen type="websocket"[^>]*/>)',
                      r'\1\n  <listen type="websocket-tls" port="0" address="127.0.0.1"/>', text)
        return text.replace("<data ", f"<websocket><origin>{ALLOWED_ORIGIN}</origin>"
                            "</websocket>\n  <data ", 1)
    setup = tmp_path_factory.mktemp("mlink-ws")
    with start_mlink(setup, DOMAIN, cert_files, users={ALICE: ALICE_PW, BOB: BOB_PW},
                     edit_config=edit) as server:
        yield server


async def test_origin_not_listed_is_refused(restricted_server: MlinkProcess) -> None:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url(restricted_server), subprotocols=["xmpp"],
                                      extra_headers=[(b"Origin", b"https://evil.example")]):
            pass
    assert info.value.status_code == 403
    assert b"may not use this server" in (info.value.body or b"")


@pytest.mark.parametrize("origin", [ALLOWED_ORIGIN, "HTTPS://Chat.Example.org", None])
async def test_listed_origin_or_none_may_connect(restricted_server: MlinkProcess,
                                                 origin: str | None) -> None:
    headers = [(b"Origin", origin.encode())] if origin else []
    async with connect(ws_url(restricted_server), extra_headers=headers) as client:
        assert (await client.login(res=resource())).startswith(f"{ALICE}/")


async def test_wss_listener(restricted_server: MlinkProcess, ca_file: Path) -> None:
    port = int(restricted_server.wait_for_log(
        r"listening for websocket-tls .* port (\d+)").group(1))
    ctx = ssl.create_default_context(cafile=str(ca_file))
    url = f"wss://localhost:{port}/xmpp-websocket"
    async with connect(url, ssl_context=ctx) as client:
        features = await client.open()
        mechanisms = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
        # TLS ends here, so SCRAM can bind to it (tls-server-end-point at least).
        assert "SCRAM-SHA-256-PLUS" in mechanisms, mechanisms
    async with connect(url, ssl_context=ctx) as client:
        res = resource()
        assert await client.login(mechanism="SCRAM-SHA-256", res=res) == f"{ALICE}/{res}"
    with urllib.request.urlopen(f"https://localhost:{port}/.well-known/host-meta.json",
                                context=ctx, timeout=READ_TIMEOUT) as resp:
        jrd = json.loads(resp.read())
    assert jrd["links"][0]["href"] == f"wss://localhost:{port}/xmpp-websocket"


async def test_plain_ws_offers_no_channel_binding(embedded_server: MlinkProcess) -> None:
    async with connect(ws_url(embedded_server)) as client:
        features = await client.open()
        mechanisms = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
        assert mechanisms and not any(m.endswith("-PLUS") for m in mechanisms), mechanisms


@pytest.fixture(scope="module")
def redirecting_server(tmp_path_factory: pytest.TempPathFactory,
                       cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    def edit(text: str) -> str:
        return text.replace("<data ", f"<websocket see-other-uri='{SEE_OTHER}'/>\n  <data ", 1)
    setup = tmp_path_factory.mktemp("mlink-ws-redirect")
    with start_mlink(setup, DOMAIN, cert_files, edit_config=edit) as server:
        yield server


async def test_see_other_uri(redirecting_server: MlinkProcess) -> None:
    async with connect(ws_url(redirecting_server)) as client:
        await client.send(OPEN)
        assert (await client.recv_element()).tag == f"{{{FRAMING}}}open"
        # RFC 7395 §3.6.1: <close/> naming where to connect instead.
        close = await client.recv_element()
        assert close.tag == f"{{{FRAMING}}}close" and close.get("see-other-uri") == SEE_OTHER
        assert await client.expect_closed() == 1000
