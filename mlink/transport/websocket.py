"""XMPP over WebSocket (RFC 7395) and connection discovery (XEP-0156).

One HTTP port serves the WebSocket endpoint at `/xmpp-websocket`,
`/.well-known/host-meta` (XRD) and `/.well-known/host-meta.json` (JRD)
naming that endpoint, so web clients that discover endpoints find it,
and the path prefixes modules registered (`Module.add_http_handler`). The request head is read here
(`mlink.transport.http`, with h11); upgrades go on to trio-websocket
with the bytes replayed, everything else gets a small HTTP response.

Once open, a WebSocket is driven by `WebSocketClientConnection`, the TCP
connection class with reading and writing by whole messages: the same
sans-IO `C2SStream` negotiates SASL and bind for both transports, with
RFC 7395 framing switched on.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import ssl
import types
from typing import TYPE_CHECKING

import trio

from mlink.stream import c2s
from mlink.stream.framing import FRAMING_NS, WebSocketFraming
from mlink.transport.client import TLS_HANDSHAKE_TIMEOUT, ClientConnection
from mlink.transport.http import (
    HEAD_TIMEOUT,
    HTTPConnection,
    HTTPError,
    PeerGone,
    ReplayStream,
    Request,
    receive_request,
    send_response,
)
from mlink.transport.http_exchange import Exchange
from mlink.xml.serialize import escape_attr

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

    from mlink.module import HTTPHandler
    from mlink.server import Server

log = logging.getLogger(__name__)

# RFC 7395 §3.1 leaves the path to the server; Prosody, ejabberd and most
# web clients' defaults use this one.
WS_PATH = "/xmpp-websocket"
# RFC 7395 §3.1: the WebSocket subprotocol a client must offer.
SUBPROTOCOL = "xmpp"
# XEP-0156 §3: host-meta (RFC 6415) in XRD and JSON (JRD) form.
HOST_META_PATH = "/.well-known/host-meta"
HOST_META_JSON_PATH = "/.well-known/host-meta.json"
ALT_CONNECTIONS_WEBSOCKET = "urn:xmpp:alt-connections:websocket"
XRD_NS = "http://docs.oasis-open.org/ns/xri/xrd-1.0"
# RFC 6455 §4.2.1: the only protocol version there is.
WEBSOCKET_VERSION = "13"
# How long the WebSocket opening handshake may take once the head is in.
WS_HANDSHAKE_TIMEOUT = 10.0
# How long an HTTP error or host-meta response may take to send.
RESPONSE_TIMEOUT = 10.0
# trio-websocket buffers a whole message before handing it over, so it gets
# a hard cap; twice the stanza limit lets a modestly oversized stanza reach
# the XML parser and end in `policy-violation` as on TCP, while anything
# larger is cut off by trio-websocket (close code 1009) without buffering
# more. (The cap counts characters, the stanza limit bytes.)
OVERSIZE_FACTOR = 2
# Messages trio-websocket queues ahead of the reader: one, so a client
# that floods is slowed by TCP back-pressure instead of filling memory.
MESSAGE_QUEUE_SIZE = 1
# RFC 6455 §7.4.1 close codes.
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
# Host header values accepted for building host-meta links: a DNS name or
# bracketed IPv6 literal, with an optional port; nothing that could break
# out of an attribute or a JSON string.
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- policy ---------------------------------------------------------------------


def parse_ip(address: str) -> IPAddress | None:
    """`address` as an IP address, IPv4-mapped IPv6 unwrapped (a dual-stack
    listener reports IPv4 peers as ::ffff:a.b.c.d)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def plain_counts_as_encrypted(peer: IPAddress | None, trusted: tuple[IPNetwork, ...]) -> bool:
    """Whether a plain ws:// stream from `peer` may be treated as encrypted:
    from loopback (the client is on this machine) or from a configured
    TLS-terminating reverse proxy, like Prosody's consider_websocket_secure."""
    if peer is None:
        return False
    return peer.is_loopback or any(peer in net for net in trusted)


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Origin check (RFC 6455 §10.2). No list allows all. A request without
    Origin is not from a browser page, which is all the check can protect
    against (any other client can send any Origin), so it is allowed."""
    if not allowed or origin is None:
        return True
    return origin.strip().lower().rstrip("/") in allowed


def host_meta_xrd(href: str) -> bytes:
    """XEP-0156 §3.3 host-meta in XRD form."""
    return (
        "<?xml version='1.0' encoding='utf-8'?>\n"
        f"<XRD xmlns='{XRD_NS}'>\n"
        f"  <Link rel='{ALT_CONNECTIONS_WEBSOCKET}' href='{escape_attr(href)}'/>\n"
        "</XRD>\n"
    ).encode()


def host_meta_jrd(href: str) -> bytes:
    """XEP-0156 §3.3 host-meta.json (JRD, RFC 6415 appendix A)."""
    doc = {"links": [{"rel": ALT_CONNECTIONS_WEBSOCKET, "href": href}]}
    return (json.dumps(doc, indent=2) + "\n").encode()


# -- HTTP side --------------------------------------------------------------------


class WebSocketEndpoint:
    """One websocket listener's per-connection handler (plain or TLS)."""

    def __init__(self, server: Server, secure: bool) -> None:
        self.server = server
        self.secure = secure
        ws = server.config.websocket
        self.origins = frozenset(ws.origins)
        self.trusted_proxies: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(p, strict=False) for p in ws.trusted_proxies
        )
        self.see_other_uri = ws.see_other_uri
        self.max_message_size = server.config.limits.max_stanza_bytes * OVERSIZE_FACTOR
        self.https_context = self._https_context() if secure else None

    def _https_context(self) -> ssl.SSLContext:
        """The certificate of <tls>, offered as an HTTPS server: ALPN
        http/1.1, which browsers offer (the c2s context speaks xmpp-client)."""
        tls = self.server.config.tls
        assert tls.certificate is not None and tls.key is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # TLS 1.0/1.1 are deprecated (RFC 8996), as on the c2s listeners.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(tls.certificate), str(tls.key))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one accepted TCP connection until it ends."""
        try:
            peer = parse_ip(stream.socket.getpeername()[0])
            local_port = int(stream.socket.getsockname()[1])
        except OSError:
            await stream.aclose()
            return
        transport: trio.abc.Stream = stream
        channel_binding: dict[str, bytes] = {}
        if self.https_context is not None:
            ssl_stream = trio.SSLStream(stream, self.https_context, server_side=True,
                                        https_compatible=True)
            try:
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await ssl_stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                log.info("TLS handshake failed on the websocket listener: %s", exc)
                await stream.aclose()
                return
            transport = ssl_stream
            assert self.server.tls is not None
            # trio's SSLStream does not forward the SSLObject; see tls_exporter.
            channel_binding = self.server.tls.channel_binding(ssl_stream._ssl_object)
        await self.serve_http(transport, peer, channel_binding, local_port)

    async def serve_http(self, stream: trio.abc.Stream, peer: IPAddress | None,
                         channel_binding: dict[str, bytes] | None = None,
                         local_port: int | None = None) -> None:
        """Answer one request on `stream` (already decrypted) from `peer`,
        then close it: a WebSocket session, host-meta, or an HTTP error."""
        conn = HTTPConnection()
        try:
            try:
                request: Request | None = None
                with trio.move_on_after(HEAD_TIMEOUT):
                    request = await receive_request(stream, conn)
                if request is None:
                    if not conn.started:
                        return  # a spare preconnected socket: nothing to answer
                    raise HTTPError(408, "the request head did not arrive within "
                                         f"{HEAD_TIMEOUT:g} seconds")
                if request.path == WS_PATH:
                    self.check_upgrade(request)
                    await self._upgrade(stream, conn.raw, peer, channel_binding or {})
                    return
                handler = self.server.http_handler(request.path)
                if handler is not None:
                    await self._module_request(handler, stream, conn, request, peer)
                    return
                body, content_type = self.discovery(request, peer, local_port)
                reply = conn.response(200, body, content_type,
                                      (("Access-Control-Allow-Origin", "*"),))
            except HTTPError as exc:
                log.info("websocket listener: HTTP %d to %s: %s", exc.status, peer, exc.message)
                reply = conn.error_response(exc)
            await send_response(stream, reply, RESPONSE_TIMEOUT)
        except PeerGone:
            pass
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _module_request(self, handler: HTTPHandler, stream: trio.abc.Stream,
                              conn: HTTPConnection, request: Request,
                              peer: IPAddress | None) -> None:
        """A request for a module's path prefix: the module answers it; a
        handler that crashes costs its own request (500), nothing else."""
        secure = self.secure or plain_counts_as_encrypted(peer, self.trusted_proxies)
        exchange = Exchange(stream, conn, request, None if peer is None else str(peer), secure)
        try:
            await handler(exchange)
        except Exception:
            log.exception("HTTP handler for %s %s crashed", request.method, request.path)
        await exchange.finish()

    def discovery(self, request: Request, peer: IPAddress | None,
                  local_port: int | None = None) -> tuple[bytes, str]:
        """The host-meta documents (XEP-0156); 404 for any other path."""
        if request.path not in (HOST_META_PATH, HOST_META_JSON_PATH):
            raise HTTPError(404, f"nothing here: the XMPP WebSocket endpoint is {WS_PATH}")
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "use GET", (("Allow", "GET, HEAD"),))
        href = self.endpoint_url(request, peer, local_port)
        if request.path == HOST_META_JSON_PATH:
            return host_meta_jrd(href), "application/json"
        return host_meta_xrd(href), "application/xrd+xml; charset=utf-8"

    def endpoint_url(self, request: Request, peer: IPAddress | None,
                     local_port: int | None = None) -> str:
        """The WebSocket URL for clients: `<websocket public-url>` when set;
        else ws(s)://DOMAIN[:PORT]/xmpp-websocket, where DOMAIN is the served
        domain the Host header names (else the first one) and PORT the
        listener's. Never the Host header itself: anyone can send any Host,
        and a link built from it would send clients elsewhere (a cache or
        proxy in between could keep such an answer for others). wss when
        this listener is TLS or a trusted proxy says the client used https
        (the proxy's port is then the scheme's default)."""
        host = request.header("host")
        if not host or not _HOST_RE.match(host):
            raise HTTPError(400, "a valid Host header is required")
        ws = self.server.config.websocket
        if ws.public_url:
            return ws.public_url
        named = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        domains = self.server.config.domains
        domain = named.lower() if named.lower() in domains else domains[0]
        secure, port = self.secure, local_port
        if peer is not None and any(peer in net for net in self.trusted_proxies):
            if request.header("x-forwarded-proto") == "https":
                secure, port = True, None
        scheme = "wss" if secure else "ws"
        default_port = 443 if secure else 80
        where = domain if port in (None, default_port) else f"{domain}:{port}"
        return f"{scheme}://{where}{WS_PATH}"

    def check_upgrade(self, request: Request) -> None:
        """RFC 6455 §4.2.1 handshake checks, done here so each refusal gets
        a clear body (trio-websocket would drop the connection), then the
        Origin list and the `xmpp` subprotocol (RFC 7395 §3.1)."""
        if request.method != "GET":
            raise HTTPError(405, "the WebSocket handshake is a GET", (("Allow", "GET"),))
        if "websocket" not in request.tokens("upgrade") or \
                "upgrade" not in request.tokens("connection"):
            raise HTTPError(
                426,
                "this is the XMPP over WebSocket endpoint (RFC 7395): connect with a "
                "WebSocket client offering the 'xmpp' subprotocol",
                (("Upgrade", "websocket"),),
            )
        if request.version != "HTTP/1.1":
            raise HTTPError(400, "the WebSocket handshake needs HTTP/1.1")
        if request.header("sec-websocket-version") != WEBSOCKET_VERSION:
            raise HTTPError(426, "unsupported WebSocket version: use 13 (RFC 6455)",
                            (("Sec-WebSocket-Version", WEBSOCKET_VERSION),))
        if not request.header("sec-websocket-key"):
            raise HTTPError(400, "missing Sec-WebSocket-Key")
        if not origin_allowed(request.header("origin"), self.origins):
            raise HTTPError(403, f"origin {request.header('origin')!r} may not use this server")
        if SUBPROTOCOL not in request.tokens("sec-websocket-protocol"):
            raise HTTPError(
                400,
                "the 'xmpp' WebSocket subprotocol is required (RFC 7395 section 3.1): "
                "offer Sec-WebSocket-Protocol: xmpp",
            )

    async def _upgrade(self, stream: trio.abc.Stream, raw: bytes, peer: IPAddress | None,
                       channel_binding: dict[str, bytes]) -> None:
        """Finish the handshake in trio-websocket and run the XMPP session."""
        encrypted = self.secure or plain_counts_as_encrypted(peer, self.trusted_proxies)
        async with trio.open_nursery() as nursery:
            ws: WebSocketConnection | None = None
            with trio.move_on_after(WS_HANDSHAKE_TIMEOUT):
                request = await _trio_websocket().wrap_server_stream(
                    nursery, ReplayStream(stream, raw),
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    max_message_size=self.max_message_size,
                )
                ws = await request.accept(subprotocol=SUBPROTOCOL)
            if ws is None:
                log.info("websocket handshake from %s timed out", peer)
                nursery.cancel_scope.cancel()
                return
            how = "wss" if self.secure else "plain, counts as encrypted" if encrypted else "plain"
            log.info("websocket from %s (%s)", peer, how)
            conn = WebSocketClientConnection(
                self.server, ws, encrypted=encrypted, channel_binding=channel_binding,
                refusal=self._refusal(encrypted),
            )
            await self.server.run_connection(conn)
            # The connection closed the WebSocket; stop its reader task too.
            nursery.cancel_scope.cancel()

    def _refusal(self, encrypted: bool) -> list[bytes] | None:
        """What ends a stream right after our <open/>, or None to serve it.
        RFC 7395 §3.6.1: a configured see-other-uri redirects every stream;
        RFC 6120 §5.3.1: where TLS is required, an unencrypted stream is
        refused (from loopback and trusted proxies it counts as encrypted)."""
        if self.see_other_uri:
            return [f"<close xmlns='{FRAMING_NS}' "
                    f"see-other-uri='{escape_attr(self.see_other_uri)}'/>".encode()]
        if self.server.config.tls.required and not encrypted:
            return WebSocketFraming().error(
                "policy-violation",
                "encryption is required: connect with wss:// (plain ws:// is accepted only "
                "from this machine and from configured trusted proxies)",
            )
        return None


# -- XMPP side --------------------------------------------------------------------


def _trio_websocket() -> types.ModuleType:
    """trio-websocket, imported at the first WebSocket connection: with its
    wsproto, h11 and importlib.metadata it costs a shard ~3 MiB from its
    start otherwise (issue 14, idle RSS). The first connection pays the
    import once (~0.1 s); an `except` clause evaluates this only when an
    exception reaches it."""
    import trio_websocket

    return trio_websocket


class _WebSocketTransport(trio.abc.Stream):
    """The WebSocket as `ClientConnection.transport`. The connection reads
    and writes whole messages through `ws` directly; what it needs from its
    transport is `aclose`, which here is the WebSocket closing handshake
    (RFC 7395 §3.6: after the <close/> exchange) with `close_code`."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.close_code = CLOSE_NORMAL

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """One text message (the data must be one complete element)."""
        try:
            await self.ws.send_message(bytes(data).decode())
        except _trio_websocket().ConnectionClosed:
            raise trio.BrokenResourceError("websocket closed") from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """One whole message, as bytes; b"" once the WebSocket is closed."""
        try:
            message = await self.ws.get_message()
        except _trio_websocket().ConnectionClosed:
            return b""
        return message.encode() if isinstance(message, str) else message

    async def aclose(self) -> None:
        await self.ws.aclose(self.close_code)


class WebSocketClientConnection(ClientConnection):
    """A client on a WebSocket: the TCP connection with RFC 7395 framing,
    one XML element per message in each direction."""

    joins_output = False  # one WebSocket message per element

    def __init__(self, server: Server, ws: WebSocketConnection, *, encrypted: bool,
                 channel_binding: dict[str, bytes] | None = None,
                 refusal: list[bytes] | None = None) -> None:
        self.ws = ws
        self._ws_transport = _WebSocketTransport(ws)
        # direct_tls=False: TLS, if any, was done below the WebSocket.
        super().__init__(server, self._ws_transport, direct_tls=False)
        # RFC 7395 §3.9: TLS is the WebSocket layer's business, so the stream
        # starts as encrypted when the connection is (or counts as) encrypted
        # and never offers STARTTLS.
        self.xmpp = c2s.C2SStream(server.stream_settings(tls_active=encrypted, websocket=True))
        if channel_binding:
            # wss terminated here: SCRAM-PLUS can bind to this TLS session.
            self.xmpp.channel_binding = channel_binding
        self._refusal = refusal

    async def _read_once(self) -> bool:
        """Handle one WebSocket message; False when the peer is gone."""
        try:
            message = await self.ws.get_message()
        except _trio_websocket().ConnectionClosed:
            if not self._closing:
                self._lost = True  # gone without <close/>: a session may be held
            self._closing = True
            return False
        if isinstance(message, bytes):
            # RFC 7395 §3.2: messages are text frames of UTF-8 XML; binary
            # data is not an encoding of the stream we accept (RFC 6120
            # §4.9.3.22), and 1003 is WebSocket's "cannot accept this type".
            self._ws_transport.close_code = CLOSE_UNSUPPORTED_DATA
            self.kick("unsupported-encoding", "XMPP over WebSocket uses text frames only")
            return True
        data = message.encode()
        if self._refusal is not None:
            self._refuse(data, self._refusal)
            return True
        await self._handle(self.xmpp.receive_message(data))
        return True

    def _refuse(self, data: bytes, ending: list[bytes]) -> None:
        """Answer the client's <open/> with ours, then `ending` (RFC 7395
        §3.5: an error during the opening follows our <open/>)."""
        events = self.xmpp.receive_message(data)
        out = self.xmpp.messages_to_send()
        if not any(isinstance(ev, c2s.StreamEnded) for ev in events) and out:
            # A good <open/>: keep our <open/>, drop the features.
            out = [out[0], *ending]
        for message in out:
            self._queue(message)
        self._closing = True
        self._refusal = None

    async def _send(self, messages: list[bytes]) -> None:
        """One WebSocket text message per element (RFC 7395 §3.3.3)."""
        for message in messages:
            await self._ws_transport.send_all(message)
