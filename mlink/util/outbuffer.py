"""A bounded buffer of bytes waiting for one writer task, with write marks.

Used by client connections and by the bus between shards: producers push
without waiting (a shard's loop never blocks on one slow peer), one writer
task takes everything pending and writes it with one `send_all` (one system
call, one TLS record per batch). `limit` bounds what a peer that stops
reading can make us hold; what to do past it (drop the frame, end the
session) is the owner's decision, so `push` only reports it.

Byte marks say what really left: `mark()` after pushing a stanza is the
position its last byte has in the stream of bytes; once `written` reaches
that mark the stanza was handed to the kernel. Offline delivery deletes a
stored message only then (a session cut for not reading must not take
queued messages with it).

A chunk may carry an item (the stanza it encodes): when the buffer is
discarded (the peer is cut), `discard` returns the items of everything not
confirmed written — queued, or taken by a write that never completed — so
the owner can store or bounce them instead of losing them.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class OutputBuffer(Generic[T]):
    __slots__ = ("limit", "_chunks", "_items", "_inflight", "_pending", "_pushed", "written",
                 "_ready", "_drained", "_progress", "_watchers")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: list[bytes] = []
        # Items of queued chunks (None where a chunk carries none), and of
        # the batch being written now.
        self._items: list[T] = []
        self._inflight: list[T] = []
        self._pending = 0  # bytes pushed and not yet written (taken or not)
        self._pushed = 0  # bytes ever pushed
        self.written = 0  # bytes ever written (reported by the writer)
        self._ready = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._progress = trio.Event()
        # Tasks in wait_progress: only they need waking (the hot path then
        # creates no Event per write).
        self._watchers = 0

    @property
    def frames_queued(self) -> int:
        """Chunks queued and not taken by the writer."""
        return len(self._chunks)

    @property
    def pending(self) -> int:
        """Bytes pushed and not yet written."""
        return self._pending

    def fits(self, size: int) -> bool:
        return self._pending + size <= self.limit

    def push(self, data: bytes, item: T | None = None) -> None:
        """Queue `data` (the caller checked `fits`, or accepts the overrun)."""
        if not data:
            return
        self._chunks.append(data)
        if item is not None:
            self._items.append(item)
        self._pending += len(data)
        self._pushed += len(data)
        if self._drained.is_set():
            self._drained = trio.Event()
        self._ready.set()

    def note_written_through(self, size: int) -> None:
        """`size` bytes went straight to the socket, never queued."""
        self._pushed += size
        self.written += size
        self._wake_progress()

    def mark(self) -> int:
        """The stream position right after everything pushed so far."""
        return self._pushed

    def take(self) -> list[bytes]:
        """Everything queued, for one write; `written_now` when it is out."""
        chunks, self._chunks = self._chunks, []
        self._inflight, self._items = self._items, []
        self._ready = trio.Event()
        return chunks

    def written_now(self, size: int) -> None:
        self._inflight = []
        self._pending = max(0, self._pending - size)
        self.written += size
        self._wake_progress()
        if not self._pending:
            self._drained.set()

    def discard(self) -> list[T]:
        """Drop what is queued (the peer is gone or cut); the items of every
        chunk not confirmed written, oldest first. Marks beyond `written`
        will never be reached."""
        items = self._inflight + self._items
        self._inflight, self._items = [], []
        self._pending = 0  # queued and in flight alike: none will count now
        self._chunks = []
        if not self._pending:
            self._drained.set()
        self._wake_progress()
        return items

    async def wait_ready(self) -> None:
        """Until something is queued."""
        if not self._chunks:
            await self._ready.wait()

    async def wait_drained(self) -> None:
        await self._drained.wait()

    async def wait_progress(self) -> None:
        """Until the writer reports progress (or the buffer is discarded)."""
        self._watchers += 1
        try:
            await self._progress.wait()
        finally:
            self._watchers -= 1

    def _wake_progress(self) -> None:
        if self._watchers:
            self._progress.set()
            self._progress = trio.Event()
