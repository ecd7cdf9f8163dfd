"""The bus between shards: a transport-agnostic interface and a full mesh
of Unix domain stream sockets that implements it.

Why these rules:

* `send` never blocks and never awaits. A shard's loop serves thousands of
  clients; one slow or hung peer must not stall it. Each peer has a bounded
  outbound buffer drained by one writer task; when it is full the frame is
  dropped, counted, and logged (at most one line per peer per
  DROP_LOG_INTERVAL). Dropping is the same outcome as the peer dying a
  moment later, which the XMPP layer must survive anyway (RFC 6120 gives no
  delivery guarantee across a server failure).
* The writer joins everything pending into one `send_all`: one system call
  per batch instead of per frame is where the throughput comes from.
* A connection that ends is reported (`peer_down`) so the owner can drop
  that shard's sessions; a new connection from the same peer is reported
  (`peer_up`) so the owner can ask it for its table. The higher-numbered
  shard of each pair dials, the lower listens, so each pair has exactly one
  connection, and a restarted shard simply dials again (or is dialled).

Another transport (a message system between machines) implements `Bus`
and carries the same frames; the owner does not change.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from mlink.shard.frames import (
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_hello,
    encode_frame,
    encode_hello,
)
from mlink.util.outbuffer import OutputBuffer

log = logging.getLogger(__name__)

# Bytes queued for one peer and not yet written. At local-socket speed
# (~1 GB/s) this is ~16 ms of traffic, so it fills only when the peer has
# stopped reading; it holds four maximum-size frames, so one large stanza
# never fills it alone. Worst-case memory is this times the peer count.
OUTBOUND_BUFFER_BYTES = 16 * 1024 * 1024
# Bytes asked of the socket per receive: big enough that one call drains a
# full batch from a busy peer, small enough to allocate per call.
RECEIVE_BYTES = 256 * 1024
# A new connection has this long to say HELLO; a peer that connects and
# says nothing (a stale process, a stray client) is closed.
HANDSHAKE_TIMEOUT = 5.0
# Redial delays after a failed connection to a lower-numbered peer: quick
# at first (a restarting shard is back within a second), capped so a peer
# that stays away costs one attempt a second.
RECONNECT_INITIAL = 0.05
RECONNECT_MAX = 1.0
# At most one "dropping frames" line per peer this often, with the count
# since the last line: a full buffer at 100k frames/s must not flood the log.
DROP_LOG_INTERVAL = 10.0
# A frame is written through at once (see `_enqueue`) unless another one
# was, less than this many seconds before: then it is queued for the
# writer, so a busy loop's frames still leave in one write per wake-up,
# while a quiet one pays no writer wake-up per frame.
WRITE_THROUGH_GAP = 100e-6
# Pending connections on a shard's bus socket: one per higher peer.
BUS_LISTEN_BACKLOG = 128


class BusHandler(Protocol):
    """What the bus tells its owner (the router, once integrated).

    `frame_received` is awaited in the peer's reader task, so a slow
    handler slows that peer's reading (and its frames then queue on the
    sender's side, where the buffer limit applies). Exceptions from the
    handler are logged and the frame skipped: a bug in one stanza's
    handling must not cut the shard off from a peer."""

    async def frame_received(self, frame: Frame) -> None: ...

    async def peer_up(self, shard: int) -> None: ...

    async def peer_down(self, shard: int) -> None: ...


class NullHandler:
    """Counts and ignores frames; the default until the owner sets
    `bus.handler`."""

    def __init__(self) -> None:
        self.frames = 0

    async def frame_received(self, frame: Frame) -> None:
        self.frames += 1

    async def peer_up(self, shard: int) -> None:
        log.debug("peer shard %d up", shard)

    async def peer_down(self, shard: int) -> None:
        log.debug("peer shard %d down", shard)


@dataclass(slots=True)
class PeerStats:
    frames_out: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    # Frames dropped because the outbound buffer was full.
    drops_full: int = 0
    # Frames dropped because the peer was not connected.
    drops_down: int = 0
    # Times a connection with this peer came up.
    connects: int = 0
    # Write calls: frames_out / writes is the mean batch size.
    writes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Bus(abc.ABC):
    """Frames between the shards of one server, whatever carries them."""

    shard: int
    shards: int
    handler: BusHandler

    @abc.abstractmethod
    def send(self, dest: int, frame: Frame) -> bool:
        """Queue `frame` for shard `dest` without waiting. False when it was
        dropped (peer down or its buffer full); it is counted either way."""

    @abc.abstractmethod
    def broadcast(self, frame: Frame) -> int:
        """Queue `frame` for every other shard; the number that took it."""

    @property
    @abc.abstractmethod
    def peers(self) -> frozenset[int]:
        """Shards connected now."""

    @abc.abstractmethod
    def stats(self) -> dict[int, PeerStats]:
        """Counters per peer shard, since this bus started."""

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry frames until cancelled; `started` once this shard can be
        reached (its peers may come up later)."""


@dataclass(eq=False)
class _Peer:
    index: int
    stats: PeerStats = field(default_factory=PeerStats)
    # The live connection's stream; None while the peer is down.
    stream: trio.SocketStream | None = None
    # Ends the live connection (a newer one replaces it, or it failed).
    scope: trio.CancelScope | None = None
    # Frames queued or being written (the limit counts both); set up with
    # the bus's limit in UnixSocketBus.__init__.
    out: OutputBuffer[bytes] = field(default_factory=lambda: OutputBuffer(0))
    # The writer task is in `send_all` (no write-through meanwhile).
    sending: bool = False
    # When the last frame was written through (time.perf_counter()).
    last_through: float = float("-inf")
    dropped_since_log: int = 0
    last_drop_log: float = float("-inf")
    # Set when the live connection has finished reporting its end.
    closed: trio.Event | None = None


def socket_path(bus_dir: Path, shard: int) -> Path:
    return bus_dir / f"shard-{shard}.sock"


class UnixSocketBus(Bus):
    """A full mesh of Unix stream sockets in `bus_dir`: shard i listens on
    shard-<i>.sock, dials every lower-numbered shard, and is dialled by
    every higher-numbered one."""

    def __init__(self, shard: int, shards: int, bus_dir: Path,
                 handler: BusHandler | None = None,
                 outbound_limit: int = OUTBOUND_BUFFER_BYTES) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
        self.shard = shard
        self.shards = shards
        self.bus_dir = bus_dir
        self.handler: BusHandler = handler if handler is not None else NullHandler()
        self.outbound_limit = outbound_limit
        self._peers = {i: _Peer(i, out=OutputBuffer(outbound_limit))
                       for i in range(shards) if i != shard}
        self._hello = encode_frame(FrameType.HELLO, shard, encode_hello(shards))

    # -- the interface ------------------------------------------------------------

    def send(self, dest: int, frame: Frame) -> bool:
        peer = self._peer(dest)
        return self._enqueue(peer, encode_frame(frame.type, self.shard, frame.payload, frame.flags))

    def broadcast(self, frame: Frame) -> int:
        data = encode_frame(frame.type, self.shard, frame.payload, frame.flags)
        return sum(self._enqueue(peer, data) for peer in self._peers.values())

    @property
    def peers(self) -> frozenset[int]:
        return frozenset(i for i, p in self._peers.items() if p.stream is not None)

    def stats(self) -> dict[int, PeerStats]:
        return {i: p.stats for i, p in self._peers.items()}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = socket_path(self.bus_dir, self.shard)
        listener = await _listen_unix(path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, listener, nursery)
                for index in self._peers:
                    if index < self.shard:
                        nursery.start_soon(self._dial_loop, self._peers[index])
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # -- sending ------------------------------------------------------------------

    def _peer(self, dest: int) -> _Peer:
        try:
            return self._peers[dest]
        except KeyError:
            raise ValueError(f"no peer shard {dest} (this is shard {self.shard} "
                             f"of {self.shards})") from None

    def _enqueue(self, peer: _Peer, data: bytes) -> bool:
        if peer.stream is None:
            peer.stats.drops_down += 1
            return False
        out = peer.out
        now = time.perf_counter()
        if (not out.pending and not peer.sending
                and now - peer.last_through >= WRITE_THROUGH_GAP):
            # Write-through: nothing queued, nothing being written, and no
            # frame went out just before, so the frame goes to the socket
            # now (one system call, no writer wake-up, no scheduler pass);
            # only what the socket does not take is left to the writer.
            # Frames that follow closely (a busy loop) are queued and
            # leave together in the writer's one `send_all`.
            peer.last_through = now
            try:
                sent = os.write(peer.stream.socket.fileno(), data)
            except OSError:
                sent = 0  # full, or broken: the writer and reader find out
            if sent:
                out.note_written_through(sent)
                stats = peer.stats
                stats.bytes_out += sent
                if sent == len(data):
                    stats.frames_out += 1
                    stats.writes += 1
                    return True
                data = data[sent:]
        if not out.fits(len(data)):
            peer.stats.drops_full += 1
            self._log_drop(peer)
            return False
        out.push(data)
        return True

    def _log_drop(self, peer: _Peer) -> None:
        peer.dropped_since_log += 1
        now = time.monotonic()
        if now - peer.last_drop_log >= DROP_LOG_INTERVAL:
            log.warning("bus to shard %d: outbound buffer full (%d bytes); dropped %d frame(s)",
                        peer.index, self.outbound_limit, peer.dropped_since_log)
            peer.last_drop_log = now
            peer.dropped_since_log = 0

    async def _writer(self, peer: _Peer, stream: trio.SocketStream) -> None:
        """Drain the peer's buffer, everything pending in one write."""
        while True:
            await peer.out.wait_ready()
            batch = peer.out.take()
            data = b"".join(batch)
            peer.sending = True
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                # The reader sees the end too and closes the connection.
                log.info("bus: sending to shard %d failed: %s", peer.index, exc)
                return
            finally:
                peer.sending = False
            peer.out.written_now(len(data))
            peer.stats.frames_out += len(batch)
            peer.stats.bytes_out += len(data)
            peer.stats.writes += 1

    # -- receiving ----------------------------------------------------------------

    async def _reader(self, peer: _Peer, stream: trio.SocketStream, decoder: FrameDecoder) -> None:
        """Read frames until the connection ends. Its errors end it here, not
        in the nursery around reader and writer (which would wrap them in an
        ExceptionGroup that nothing above expects)."""
        try:
            await self._read_frames(peer, stream, decoder)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("bus: connection to shard %d lost: %s", peer.index, exc)
        except FrameError as exc:
            log.warning("bus: shard %d sent a bad frame: %s; reconnecting", peer.index, exc)

    async def _read_frames(self, peer: _Peer, stream: trio.SocketStream,
                           decoder: FrameDecoder) -> None:
        stats = peer.stats
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                return
            stats.bytes_in += len(data)
            for frame in decoder.receive_data(data):
                stats.frames_in += 1
                await self._dispatch(peer, frame)

    async def _dispatch(self, peer: _Peer, frame: Frame) -> None:
        try:
            await self.handler.frame_received(frame)
        except Exception:
            log.exception("bus handler failed on a %s frame from shard %d",
                          frame.type.name, peer.index)

    # -- connections --------------------------------------------------------------

    async def _accept_loop(self, listener: trio.SocketListener,
                           nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: the mesh retries, so back off and go on.
                log.warning("bus accept failed: %s", exc)
                await trio.sleep(RECONNECT_MAX)
                continue
            nursery.start_soon(self._accepted, stream)

    async def _accepted(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        async with stream:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.send_all(self._hello)
                    hello, rest = await self._read_hello(stream, decoder)
            except (trio.TooSlowError, FrameError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                log.warning("bus: refused a connection: %s", exc or type(exc).__name__)
                return
            peer = self._peers.get(hello.source)
            if peer is None or hello.source < self.shard:
                log.warning("bus: refused a connection claiming to be shard %d", hello.source)
                return
            await self._connected(peer, stream, decoder, rest)

    async def _dial_loop(self, peer: _Peer) -> None:
        delay = RECONNECT_INITIAL
        path = socket_path(self.bus_dir, peer.index)
        while True:
            try:
                stream = await trio.open_unix_socket(str(path))
            except OSError:
                # Not listening yet (starting, restarting): try again soon.
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            decoder = FrameDecoder()
            async with stream:
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        await stream.send_all(self._hello)
                        hello, rest = await self._read_hello(stream, decoder)
                    if hello.source != peer.index:
                        raise FrameError(f"shard {peer.index}'s socket answered as "
                                         f"shard {hello.source}")
                except (trio.TooSlowError, FrameError, trio.BrokenResourceError,
                        trio.ClosedResourceError, OSError) as exc:
                    log.warning("bus: connection to shard %d failed: %s",
                                peer.index, exc or type(exc).__name__)
                else:
                    delay = RECONNECT_INITIAL
                    await self._connected(peer, stream, decoder, rest)
            await trio.sleep(delay)

    async def _read_hello(self, stream: trio.SocketStream,
                          decoder: FrameDecoder) -> tuple[Frame, list[Frame]]:
        """The peer's HELLO and any frames that arrived in the same read."""
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise FrameError("closed before HELLO")
            frames = decoder.receive_data(data)
            if frames:
                hello, rest = frames[0], frames[1:]
                if hello.type is not FrameType.HELLO:
                    raise FrameError(f"expected HELLO, got {hello.type.name}")
                shards = decode_hello(hello.payload)
                if shards != self.shards:
                    raise FrameError(f"peer runs {shards} shards, this one {self.shards}")
                return hello, rest

    async def _connected(self, peer: _Peer, stream: trio.SocketStream,
                         decoder: FrameDecoder, early: list[Frame]) -> None:
        """Run one established connection until it ends, with up/down
        reported around it. A newer connection from the same peer (it
        restarted before we saw the old one end) replaces this one."""
        while peer.scope is not None and peer.closed is not None:
            # Let the old connection's task report its end first, so the
            # owner sees down-then-up, never two ups.
            peer.scope.cancel()
            await peer.closed.wait()
        scope = trio.CancelScope()
        closed = trio.Event()
        peer.scope, peer.closed = scope, closed
        peer.stream = stream
        peer.stats.connects += 1
        log.info("bus: connected to shard %d", peer.index)
        try:
            with scope:
                await self.handler.peer_up(peer.index)
                for frame in early:
                    peer.stats.frames_in += 1
                    await self._dispatch(peer, frame)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, peer, stream)
                    await self._reader(peer, stream, decoder)
                    nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("bus: connection to shard %d lost: %s", peer.index, exc)
        except FrameError as exc:
            log.warning("bus: shard %d sent a bad frame: %s; reconnecting", peer.index, exc)
        finally:
            # Frames never written: counted as dropped, as for a peer down.
            peer.stats.drops_down += peer.out.frames_queued
            peer.out.discard()
            peer.stream = None
            with trio.CancelScope(shield=True):
                try:
                    await self.handler.peer_down(peer.index)
                except Exception:
                    log.exception("bus handler failed on peer %d down", peer.index)
            if peer.scope is scope:
                peer.scope = peer.closed = None
            closed.set()


async def _listen_unix(path: Path) -> trio.SocketListener:
    """Bind shard's bus socket, replacing a stale one a dead predecessor
    left behind. Only this shard's index binds this path (the supervisor
    runs one process per index), so unlinking cannot steal a live socket."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(BUS_LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENAMETOOLONG or len(str(path)) > 107:
            raise OSError(exc.errno, f"bus socket path too long: {path}") from None
        raise
    return trio.SocketListener(sock)
