"""A module's HTTP request on the WebSocket/HTTPS listeners: the Trio side
of `mlink.module.HTTPExchange`.

The listener has read and checked the head (`mlink.transport.http`); the
exchange then lets the module read the body in pieces, each read bounded
in time (a client that stops sending mid-body is dropped, not waited for),
and send a response whole or streamed, each write bounded in time (a
client that stops reading is dropped too). h11 keeps the framing honest:
never more body than Content-Length, never a body to a HEAD request.
"""

from __future__ import annotations

from collections.abc import Sequence

import h11
import trio

from mlink.transport.http import LINGER_TIMEOUT, HTTPConnection, HTTPError, Request, linger

# How long the final response of a module may take to send when the
# module gave no timeout of its own (a small error or empty answer).
RESPONSE_TIMEOUT = 10.0
# Reads while streaming a body: a large read costs one syscall and one
# h11 event for up to this many bytes (the head is read in READ_CHUNK).
BODY_READ_CHUNK = 64 * 1024

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Exchange:
    """One request and its response on `stream` (already decrypted)."""

    def __init__(self, stream: trio.abc.Stream, conn: HTTPConnection, request: Request,
                 peer: str | None, secure: bool) -> None:
        self._stream = stream
        self._conn = conn
        self._request = request
        self.method = request.method
        self.path, _, self.query = request.target.partition("?")
        self.peer = peer
        self.secure = secure
        self._started = False
        # Bytes of the body that came in the same reads as the head are
        # already in h11's buffer (HTTPConnection fed it everything read).
        self._body_done = False
        self._waited_for_continue = conn.client_waits_for_continue
        self._continued = False

    def header(self, name: str) -> str | None:
        return self._request.header(name)

    @property
    def started(self) -> bool:
        return self._started

    async def receive_body(self, idle_timeout: float) -> bytes | None:
        if self._body_done:
            return None
        if self._conn.client_waits_for_continue and not self._started:
            self._continued = True
            await self._write(self._conn.continue_response(), idle_timeout)
        while True:
            try:
                piece = self._conn.next_body_event()
            except HTTPError as exc:
                raise ConnectionError(exc.message) from None
            if piece is None:
                self._body_done = True
                return None
            if piece:
                return piece
            if not self._conn.body_wants_data:
                continue
            data: bytes | bytearray = b""
            with trio.move_on_after(idle_timeout) as scope:
                try:
                    data = await self._stream.receive_some(BODY_READ_CHUNK)
                except _STREAM_ERRORS as exc:
                    raise ConnectionError(str(exc)) from None
            if scope.cancelled_caught:
                raise TimeoutError(f"no request body data for {idle_timeout:g} s")
            if not data:
                raise ConnectionError("the client closed before the end of its body")
            self._conn.receive_body_data(data)

    async def respond(self, status: int, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"") -> None:
        await self.start(status, headers, len(body))
        if body:
            await self.send(body, RESPONSE_TIMEOUT)

    async def start(self, status: int, headers: Sequence[tuple[str, str]],
                    length: int) -> None:
        if self._started:
            raise RuntimeError("the response has already started")
        self._started = True
        fields = tuple((k, v) for k, v in headers if k.lower() != "content-length")
        await self._write(self._conn.response_head(
            status, (*fields, ("Content-Length", str(length)))), RESPONSE_TIMEOUT)

    async def send(self, data: bytes, idle_timeout: float) -> None:
        out = self._conn.response_data(data)
        if out:
            await self._write(out, idle_timeout)

    async def finish(self) -> None:
        """End the response (the module's handler returned) and close
        gently. A handler that sent nothing gets a 500."""
        try:
            if not self._started:
                await self.respond(500, (("Content-Type", "text/plain; charset=utf-8"),),
                                   b"the request could not be answered\n")
            await self._write(self._conn.response_end(), RESPONSE_TIMEOUT)
        except (TimeoutError, ConnectionError):
            return
        except h11.LocalProtocolError:
            return  # the handler sent less than it announced: just close
        if self._unread_body and not isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._drain()
        await linger(self._stream)

    @property
    def _unread_body(self) -> bool:
        """Whether the request has a body the handler did not read whole."""
        has_body = (self._request.header("content-length") not in (None, "0")
                    or self._request.header("transfer-encoding") is not None)
        # A client waiting for `100 Continue` that never came sends no body.
        withheld = self._waited_for_continue and not self._continued
        return has_body and not self._body_done and not withheld

    async def _drain(self) -> None:
        """Read and drop a refused body for a moment before closing: a
        client that sends its whole body before reading (most do) would
        otherwise meet a reset, which destroys the response it has not
        read yet. `linger` does this for plain TCP; TLS has no half-close,
        so here the client's close or the time ends it. Dropped bytes cost
        no memory; time is the bound."""
        with trio.move_on_after(LINGER_TIMEOUT):
            try:
                while await self._stream.receive_some(BODY_READ_CHUNK):
                    pass
            except (*_STREAM_ERRORS, trio.TooSlowError):
                pass

    async def _write(self, data: bytes, timeout: float) -> None:
        if not data:
            return
        with trio.move_on_after(timeout) as scope:
            try:
                await self._stream.send_all(data)
            except _STREAM_ERRORS as exc:
                raise ConnectionError(str(exc)) from None
        if scope.cancelled_caught:
            raise TimeoutError(f"the client took no response data for {timeout:g} s")

