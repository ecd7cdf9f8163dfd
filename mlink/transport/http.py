"""Just enough HTTP/1.1 for the WebSocket port: read one request head with
h11, answer it with a small response, or hand the bytes on to the
WebSocket handshake.

trio-websocket only speaks the upgrade handshake; the same port also has
to answer plain GETs (XEP-0156 host-meta) and refuse bad requests with a
readable body, so the head is read here first, bounded in size and time,
and replayed to trio-websocket when it is an upgrade. One request per
connection (`Connection: close`): nothing here needs keep-alive, and a
pipelined second request is never read as a request.

`HTTPConnection` is sans-IO (bytes in, a `Request` or bytes out), like the
stream layers; the Trio glue is the few functions at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11
import trio

# A request head larger than this is refused (431). A WebSocket upgrade
# from a browser is well under 2 KiB; 8 KiB is nginx's and Apache's default
# per-line buffer, so anything a proxy passes fits.
MAX_HEAD_BYTES = 8 * 1024
# More header fields than any browser or proxy sends (431); h11 has no
# such limit of its own, and each field is a dict entry.
MAX_HEADER_FIELDS = 64
# One read from the socket while collecting the head; with MAX_HEAD_BYTES
# this bounds the bytes held per connection before a head is complete.
READ_CHUNK = 4096
# A client has this long to send its request head (slowloris defence);
# a browser sends it at once after connecting.
HEAD_TIMEOUT = 10.0
# After an HTTP response the server ends its side and reads (and drops)
# what the client still sends, until the client's EOF but at most this
# long, before closing: closing a socket with unread input makes the
# kernel send a RST, which can destroy the response before the client
# reads it (RFC 9112 §9.6, "lingering close", as Apache and nginx do).
# Dropped bytes cost no memory, so time is the only bound needed.
LINGER_TIMEOUT = 2.0
# Longest h11 complaint quoted in a 400 body: h11 quotes the offending
# line, which is the client's own bytes and may be up to MAX_HEAD_BYTES.
MAX_DETAIL_CHARS = 120

REASONS: dict[int, str] = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    # h11's hint for a Transfer-Encoding other than chunked.
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
    507: "Insufficient Storage",
}

# The blank line that ends a head, as h11 finds it (bare LF line ends are
# accepted, RFC 9112 §2.2).
_HEAD_END_RE = re.compile(rb"\n\r?\n")

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class HTTPError(Exception):
    """A request that gets an error response instead of a WebSocket."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class PeerGone(Exception):
    """The client closed (or broke) the connection before a whole head."""


@dataclass(slots=True)
class Request:
    method: str
    target: str
    version: str
    # Field names lower-cased; repeated fields joined with ", " as
    # RFC 9110 §5.3 allows for list-valued fields.
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def tokens(self, name: str) -> list[str]:
        """A comma-separated list field, each element trimmed and lower-cased."""
        value = self.headers.get(name, "")
        return [t.strip().lower() for t in value.split(",") if t.strip()]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


class HTTPConnection:
    """One HTTP/1.1 server connection that reads one request and sends one
    response, sans-IO: `receive_data` takes bytes from the socket and gives
    the `Request` once its head is complete, `response` gives the bytes to
    send. h11 does the parsing; this class adds the policy h11 leaves to
    its user (size and field-count limits, versions, ASCII-only values, no
    line folding) and turns every refusal into an `HTTPError`."""

    def __init__(self) -> None:
        self._needs_data = False
        # h11 refuses (431) an incomplete head buffered past this size, but
        # parses a complete one of any size; _check_size covers that.
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._raw = bytearray()
        # How far _raw has been searched for the end of the head, so a
        # client sending a byte at a time costs linear, not quadratic, work.
        self._scanned = 0
        self._request: Request | None = None

    @property
    def started(self) -> bool:
        """Whether any byte of a request has arrived (a browser's spare
        preconnected socket sends none and deserves no 408)."""
        return bool(self._raw)

    @property
    def raw(self) -> bytes:
        """Every byte received: the head and whatever followed it in the
        same reads, for replaying to the WebSocket handshake."""
        return bytes(self._raw)

    def receive_data(self, data: bytes | bytearray) -> Request | None:
        """Take `data` read from the socket (b"" at end of input); the
        request once its head is complete, None while more is needed.
        Raises HTTPError for a request to refuse, PeerGone at end of input
        before a whole head. Bytes that came with the head and after it are
        kept in `raw` but not parsed: one request per connection."""
        if self._request is not None:
            return self._request
        if not data:
            raise PeerGone("connection closed before the request head ended")
        self._raw += data
        self._check_size()
        self._h11.receive_data(bytes(data))
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _refusal(exc) from None
        if event is h11.NEED_DATA:
            return None
        # The only other event a server reads first is a Request (end of
        # input is handled above, and PAUSED needs a request before it).
        assert isinstance(event, h11.Request), event
        self._request = self._checked(event)
        return self._request

    def _check_size(self) -> None:
        """431 when the head is, or is going to be, over MAX_HEAD_BYTES,
        whether or not it is complete; before h11 sees it, so an oversized
        head is refused as such and not for whatever else is wrong in it."""
        end = _HEAD_END_RE.search(self._raw, max(0, self._scanned - 2))
        self._scanned = len(self._raw)
        if (end.end() if end else len(self._raw)) > MAX_HEAD_BYTES:
            raise HTTPError(431, f"request head too large: the limit is {MAX_HEAD_BYTES} bytes")

    def _checked(self, event: h11.Request) -> Request:
        """The policy on top of h11's grammar, then the request as text."""
        head = self._raw[: len(self._raw) - len(self._h11.trailing_data[0])]
        if len(event.headers) > MAX_HEADER_FIELDS:
            raise HTTPError(431, f"too many header fields: the limit is {MAX_HEADER_FIELDS}")
        # RFC 9112 §5.2: a server may reject obs-fold with 400; h11 would
        # unfold it, but nothing legitimate sends it any more.
        if b"\n " in head or b"\n\t" in head:
            raise HTTPError(400, "malformed header field: obsolete line folding")
        version = event.http_version.decode("ascii")
        if not version.startswith("1."):
            raise HTTPError(505, "only HTTP/1.1 is spoken here")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                raise HTTPError(400, "malformed header field: value is not ASCII") from None
            key = name.decode("ascii")  # h11 lower-cases names and checks they are tokens
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        method = event.method.decode("ascii")
        if method in ("GET", "HEAD") and (
                headers.get("content-length", "0") != "0" or "transfer-encoding" in headers):
            # Nothing served here reads a body, and a GET with one has no
            # meaning (RFC 9110 §9.3.1); on an upgrade it would be replayed
            # to the WebSocket layer as if it were frames. Other methods
            # get their 405 and the body is dropped by the lingering close.
            raise HTTPError(413, "a GET request here takes no body")
        return Request(method, event.target.decode("ascii"),
                       f"HTTP/{version}", headers)

    def response(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        """A complete response that ends the connection (`Connection:
        close`); to a HEAD request, the head alone, with the body's length."""
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("Cache-Control", "no-cache"),
            *extra_headers,
        ]
        out = self._h11.send(h11.Response(
            status_code=status, reason=REASONS.get(status, "Error"), headers=headers))
        assert out is not None
        # h11 knows the request method: for HEAD it refuses body bytes.
        if self._request is None or self._request.method != "HEAD":
            out += self._h11.send(h11.Data(data=body)) or b""
        out += self._h11.send(h11.EndOfMessage()) or b""
        return out

    # -- a request body and a streamed response (module HTTP handlers) --------

    def receive_body_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read after the head (b"" at end of input) to h11."""
        self._h11.receive_data(bytes(data))

    def next_body_event(self) -> bytes | None:
        """The next piece of the request body: bytes (possibly empty when
        more must be read first: see `body_wants_data`), or None once the
        body is complete. HTTPError for a malformed body or a peer that
        ended it early."""
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _refusal(exc) from None
        if event is h11.NEED_DATA:
            self._needs_data = True
            return b""
        self._needs_data = False
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise HTTPError(400, "the connection ended before the request body did")
        return b""

    @property
    def body_wants_data(self) -> bool:
        """Whether the last `next_body_event` needs more bytes read first."""
        return self._needs_data

    @property
    def client_waits_for_continue(self) -> bool:
        """The client sent `Expect: 100-continue` and waits before its body."""
        return bool(self._h11.they_are_waiting_for_100_continue)

    def continue_response(self) -> bytes:
        """`100 Continue`: go on with the body (RFC 9110 §10.1.1)."""
        out = self._h11.send(h11.InformationalResponse(status_code=100, headers=[]))
        return out or b""

    def response_head(self, status: int, headers: tuple[tuple[str, str], ...]) -> bytes:
        """The head of a response whose body follows in `response_data`
        (`headers` should give its Content-Length); the connection ends
        after it."""
        out = self._h11.send(h11.Response(
            status_code=status, reason=REASONS.get(status, "Error"),
            headers=[*headers, ("Connection", "close")]))
        return out or b""

    def response_data(self, data: bytes) -> bytes:
        """A piece of the body (nothing to a HEAD request)."""
        if self._request is not None and self._request.method == "HEAD":
            return b""
        return self._h11.send(h11.Data(data=data)) or b""

    def response_end(self) -> bytes:
        return self._h11.send(h11.EndOfMessage()) or b""

    def error_response(self, error: HTTPError) -> bytes:
        """The response for `error`: its message as a text/plain body."""
        return self.response(error.status, f"{error.message}\n".encode(),
                             extra_headers=error.headers)


def _refusal(exc: h11.RemoteProtocolError) -> HTTPError:
    """h11's complaint as an HTTPError: its suggested status (400, or 431
    for an oversized head) and a short, readable reason."""
    if exc.error_status_hint == 431:
        return HTTPError(431, f"request head too large: the limit is {MAX_HEAD_BYTES} bytes")
    detail = str(exc)
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS] + "..."
    return HTTPError(exc.error_status_hint, f"malformed request: {detail}")


def parse_head(head: bytes) -> Request:
    """The request in `head` (request line and header fields, without the
    blank line that ends them); HTTPError if it is refused."""
    conn = HTTPConnection()
    request = conn.receive_data(head + b"\r\n\r\n")
    if request is None:
        raise HTTPError(400, "malformed request: incomplete head")
    return request


# -- Trio glue ----------------------------------------------------------------------


async def receive_request(stream: trio.abc.ReceiveStream, conn: HTTPConnection) -> Request:
    """Read from `stream` into `conn` until a request head is complete.
    The caller bounds the time (HEAD_TIMEOUT); `conn` bounds the size."""
    while True:
        try:
            data = await stream.receive_some(READ_CHUNK)
        except _STREAM_ERRORS as exc:
            raise PeerGone(str(exc)) from None
        request = conn.receive_data(data)
        if request is not None:
            return request


async def send_response(stream: trio.abc.Stream, data: bytes, timeout: float) -> None:
    """Send a whole response, then close gently: end our side and drop
    what the client still sends (see LINGER_TIMEOUT), all within bounded
    time. The caller closes the stream."""
    with trio.move_on_after(timeout):
        try:
            await stream.send_all(data)
        except _STREAM_ERRORS:
            return
    await linger(stream)


async def linger(stream: trio.abc.Stream) -> None:
    """End our side and drop what the client still sends, for at most
    LINGER_TIMEOUT (see there)."""
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return  # TLS: no half-close; closing sends close_notify instead
    with trio.move_on_after(LINGER_TIMEOUT):
        try:
            await stream.send_eof()
            while await stream.receive_some(READ_CHUNK):
                pass
        except _STREAM_ERRORS:
            pass


class ReplayStream(trio.abc.Stream):
    """A stream that first returns bytes already read from `inner`, so the
    WebSocket layer sees the request head it would have read itself."""

    def __init__(self, inner: trio.abc.Stream, already_read: bytes) -> None:
        self.inner = inner
        self._pending = already_read

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._pending:
            n = len(self._pending) if max_bytes is None else max_bytes
            chunk, self._pending = self._pending[:n], self._pending[n:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
