"""Just enough HTTP/1.1 for the WebSocket port: read one request head,
answer it with a small response, or hand the bytes on to the WebSocket
handshake.

trio-websocket only speaks the upgrade handshake; the same port also has
to answer plain GETs (XEP-0156 host-meta) and refuse bad requests with a
readable body, so the head is read here first, bounded in size and time,
and replayed to trio-websocket when it is an upgrade. One request per
connection (`Connection: close`): nothing here needs keep-alive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import trio

# A request head larger than this is refused (431). A WebSocket upgrade
# from a browser is well under 2 KiB; 8 KiB is nginx's and Apache's default
# per-line buffer, so anything a proxy passes fits.
MAX_HEAD_BYTES = 8 * 1024
# More header fields than any browser or proxy sends; bounds parsing work.
MAX_HEADER_FIELDS = 64
# One read from the socket while collecting the head.
READ_CHUNK = 4096
# A client has this long to send its request head (slowloris defence);
# a browser sends it at once after connecting.
HEAD_TIMEOUT = 10.0

REASONS: dict[int, str] = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


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


async def read_head(stream: trio.abc.ReceiveStream) -> tuple[Request, bytes]:
    """Read and parse one request head; returns it and every byte read
    (head and anything after it), for replaying to the WebSocket layer.
    Raises HTTPError for a bad head and PeerGone when the client left."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEAD_BYTES:
            raise HTTPError(431, "request head too large")
        try:
            data = await stream.receive_some(READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerGone(str(exc)) from None
        if not data:
            raise PeerGone("connection closed before the request head ended")
        buf += data
    if end > MAX_HEAD_BYTES:
        raise HTTPError(431, "request head too large")
    return parse_head(bytes(buf[:end])), bytes(buf)


def parse_head(head: bytes) -> Request:
    """The request line and header fields of `head` (without the blank line)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN_RE.match(parts[0]) or not parts[1]:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise HTTPError(505, "only HTTP/1.1 is spoken here")
    if len(lines) - 1 > MAX_HEADER_FIELDS:
        raise HTTPError(431, "too many header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        # RFC 9112 §5.1/§5.2: no space before the colon, no line folding.
        if not sep or not _TOKEN_RE.match(name):
            raise HTTPError(400, "malformed header field")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Request(method, target, version, headers)


def response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    extra_headers: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response that ends the connection."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-cache",
        *(f"{name}: {value}" for name, value in extra_headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body


class ReplayStream(trio.abc.Stream):
    """A stream that first returns bytes already read from `inner`, so the
    WebSocket layer sees the request head it would have read itself."""

    def __init__(self, inner: trio.abc.Stream, already_read: bytes) -> None:
        self.inner = inner
        self._pending = already_read

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
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
