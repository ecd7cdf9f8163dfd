"""The HTTP side of uploads: PUT into a slot, GET/HEAD of a stored file,
OPTIONS for browsers' CORS preflight (XEP-0363 §6, §7), on the server's
HTTP(S) listeners under `/upload/`, on whichever shard took the
connection (slots are signed, not stored: `slots.py`).

A PUT is checked whole before its body is read (token, size, type,
quota, a file already there): a client waiting on `Expect: 100-continue`
is refused without sending a byte. The body then goes to a private
partial file, each read bounded by the idle timeout (a client that stops
mid-upload is dropped and its partial file removed), never past the
declared size (h11 holds the request to its Content-Length), and is
linked into place when complete. Downloads are served with the uploader's
content type but in a sandbox: `nosniff`, a CSP that runs no script and
loads nothing, and `attachment` for everything but media and plain text,
so an uploaded page cannot act on the server's origin.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import quote

import trio

from mlink.modules.http_upload.ranges import Unsatisfiable, byte_range
from mlink.modules.http_upload.slots import (
    DEFAULT_CONTENT_TYPE,
    FilePath,
    check_content_type,
    parse_authorization,
    parse_path,
    verify,
)
from mlink.modules.http_upload.storage import Meta, UploadStore
from mlink.util.keyed_lock import KeyedLock

if TYPE_CHECKING:
    import logging
    from pathlib import Path

    from mlink.module import HTTPExchange
    from mlink.modules.http_upload import Options

# Bytes gathered from the socket before one write to the file (one thread
# hop each): large enough that disk writes cost little per byte, small
# enough to be nothing per upload in memory.
WRITE_BUFFER = 256 * 1024
# Bytes read from the file per chunk sent on a download.
READ_BUFFER = 256 * 1024
# XEP-0363 §7: browsers upload from the web client's origin; the slot
# URL is the credential, so any origin may use it, and nothing is ever
# sent with cookies (no Allow-Credentials).
CORS = (("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Allow-Methods", "GET, HEAD, PUT, OPTIONS"),
        ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
        ("Access-Control-Max-Age", "86400"))
# Downloads run no script and load nothing, whatever they are.
SANDBOX = (("X-Content-Type-Options", "nosniff"),
           ("Content-Security-Policy", "default-src 'none'; sandbox"),
           ("Referrer-Policy", "no-referrer"))
# Shown in the browser; everything else is offered as a download.
INLINE_PREFIXES = ("image/", "audio/", "video/", "text/plain")
# Active image formats run script when opened as a page.
NEVER_INLINE = ("image/svg+xml",)
TEXT = "text/plain; charset=utf-8"


class UploadWeb:
    def __init__(self, key: bytes, store: UploadStore, options: Callable[[], Options],
                 log: logging.Logger) -> None:
        self.key = key
        self.store = store
        self.options = options
        self.log = log
        self.owner_locks: KeyedLock[str] = KeyedLock()

    async def handle(self, ex: HTTPExchange) -> None:
        if ex.method == "OPTIONS":
            await ex.respond(204, CORS)
            return
        if not ex.secure:
            # The slot's token and the files travel only over TLS
            # (XEP-0363 §10); a reverse proxy that terminates TLS is
            # configured as a trusted proxy.
            await self._text(ex, 403, "use https")
            return
        where = parse_path(ex.path)
        if where is None:
            await self._text(ex, 404, "no such file")
            return
        if ex.method in ("GET", "HEAD"):
            await self.download(ex, where.owner, where.slot_id, where.name)
        elif ex.method == "PUT":
            await self.upload(ex, where)
        else:
            await self._text(ex, 405, "use GET, HEAD or PUT",
                             (("Allow", "GET, HEAD, PUT, OPTIONS"),))

    async def download(self, ex: HTTPExchange, owner: str, slot_id: str, name: str) -> None:
        options = self.options()
        found = await trio.to_thread.run_sync(
            self.store.find, owner, slot_id, options.expiry_days * 86400.0, time.time())
        if found is None or found.meta.name != name:
            await self._text(ex, 404, "no such file (it may have expired)")
            return
        content_type = found.meta.content_type
        inline = (content_type.lower().startswith(INLINE_PREFIXES)
                  and not content_type.lower().startswith(NEVER_INLINE))
        disposition = ("inline" if inline else "attachment") + \
            f"; filename*=UTF-8''{quote(name, safe='')}"
        headers: tuple[tuple[str, str], ...] = (
            ("Content-Type", content_type), ("Content-Disposition", disposition),
            ("Cache-Control", "private, max-age=86400"), ("Accept-Ranges", "bytes"),
            *SANDBOX, *CORS)
        status, first, length = 200, 0, found.size
        # If-Range names a version we have no validator for: whole file.
        if ex.header("if-range") is None:
            try:
                wanted = byte_range(ex.header("range"), found.size)
            except Unsatisfiable:
                await self._text(ex, 416, "the range is outside the file",
                                 (("Content-Range", f"bytes */{found.size}"),))
                return
            if wanted is not None:
                first, last = wanted
                status, length = 206, last - first + 1
                headers += (("Content-Range", f"bytes {first}-{last}/{found.size}"),)
        try:
            f = await trio.open_file(found.path, "rb")
        except OSError:
            await self._text(ex, 404, "no such file")
            return
        async with f:
            await ex.start(status, headers, length)
            if ex.method == "HEAD":
                return
            if first:
                await f.seek(first)
            left = length
            try:
                while left > 0:
                    chunk = await f.read(min(READ_BUFFER, left))
                    if not chunk:
                        break  # truncated under us: the client sees a short body
                    left -= len(chunk)
                    await ex.send(chunk, options.idle_timeout)
            except (TimeoutError, ConnectionError) as exc:
                self.log.info("download to %s stopped: %s", ex.peer, exc)

    async def upload(self, ex: HTTPExchange, where: FilePath) -> None:
        options = self.options()
        now = time.time()
        grant = parse_authorization(ex.header("authorization"))
        if grant is None:
            await self._text(ex, 403, "a slot's Authorization header is required")
            return
        if ex.header("transfer-encoding") is not None or ex.header("content-length") is None:
            await self._text(ex, 411, "send the file with a Content-Length")
            return
        length = int(ex.header("content-length") or "0")  # h11 checked it is a number
        if length > grant.size:
            await self._text(ex, 413, f"the slot is for {grant.size} bytes")
            return
        if length < grant.size:
            await self._text(ex, 400, f"the slot is for {grant.size} bytes, not {length}")
            return
        try:
            content_type = check_content_type(ex.header("content-type")) or DEFAULT_CONTENT_TYPE
        except ValueError:
            await self._text(ex, 400, "the Content-Type is not a media type")
            return
        refusal = verify(self.key, where, grant, content_type, now)
        if refusal is not None:
            await self._text(ex, 403, refusal)
            return
        if grant.size > options.max_file_size:
            await self._text(ex, 413, f"files are limited to {options.max_file_size} bytes")
            return
        expiry = options.expiry_days * 86400.0
        # The check and the partial file (created at full size) are one
        # step per owner on this shard, so uploads running at once cannot
        # each pass the quota the others are about to fill.
        async with self.owner_locks.hold(where.owner):
            if await trio.to_thread.run_sync(self.store.exists, where.owner, where.slot_id):
                await self._text(ex, 409, "this slot has been used: ask for a new one")
                return
            used = await trio.to_thread.run_sync(self.store.usage, where.owner, expiry, now)
            if used + grant.size > options.quota:
                await self._text(ex, 413, "upload quota reached")
                return
            try:
                part, fd = await trio.to_thread.run_sync(
                    self.store.open_part, where.owner, where.slot_id, grant.size)
            except OSError as exc:  # ENOSPC, EDQUOT, EMFILE: the server's problem
                self.log.warning("cannot store an upload: %s", exc)
                await self._text(ex, 507, "the server cannot store the file now")
                return
        await self._receive(ex, where, grant.size, content_type, options, part, fd)

    async def _receive(self, ex: HTTPExchange, where: FilePath, size: int,
                       content_type: str, options: Options, part: Path, fd: int) -> None:
        done = stalled = False
        self.log.info("receiving %d bytes (%s) from %s", size, content_type, ex.peer)
        try:
            received = 0
            buffer = bytearray()
            while True:
                piece = await ex.receive_body(options.idle_timeout)
                if piece is not None:
                    buffer += piece
                    received += len(piece)
                if buffer and (piece is None or len(buffer) >= WRITE_BUFFER):
                    data = bytes(buffer)
                    buffer.clear()
                    await trio.to_thread.run_sync(_write_all, fd, data)
                if piece is None:
                    break
            if received != size:
                await self._text(ex, 400, "the body is not the slot's size")
                return
            meta = Meta(where.name, content_type, size)
            done = True  # commit removes the partial file whatever happens
            try:
                stored = await trio.to_thread.run_sync(
                    self.store.commit, part, fd, where.owner, where.slot_id, meta)
            except OSError as exc:  # ENOSPC at fsync, EDQUOT
                self.log.warning("cannot store an upload: %s", exc)
                await self._text(ex, 507, "the server cannot store the file now")
                return
            if not stored:
                await self._text(ex, 409, "this slot has been used: ask for a new one")
                return
            self.log.info("upload of %d bytes stored (%s)", size, content_type)
            await ex.respond(201, CORS)
        except TimeoutError as exc:
            self.log.info("upload from %s abandoned: %s", ex.peer, exc)
            stalled = True
        except ConnectionError as exc:
            self.log.info("upload from %s broke off: %s", ex.peer, exc)
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.store.abandon, part, fd)
        if stalled:  # told once the partial file is gone
            await self._text(ex, 408, "the upload stalled")

    @staticmethod
    async def _text(ex: HTTPExchange, status: int, message: str,
                    extra: tuple[tuple[str, str], ...] = ()) -> None:
        if ex.started:
            return
        try:
            await ex.respond(status, (("Content-Type", TEXT), *CORS, *extra),
                             f"{message}\n".encode())
        except (TimeoutError, ConnectionError):
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
