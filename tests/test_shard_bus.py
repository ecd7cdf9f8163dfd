"""The Unix socket bus: several shards' buses in one Trio run."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from mlink.shard.bus import UnixSocketBus, socket_path
from mlink.shard.frames import (
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_hello,
)

# No step of these tests takes this long on a loaded machine; it bounds a hang.
TIMEOUT = 10.0


class Recorder:
    """A BusHandler that records everything and wakes waiters."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.events: list[tuple[str, int]] = []
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def frame_received(self, frame: Frame) -> None:
        self.frames.append(frame)
        self._notify()

    async def peer_up(self, shard: int) -> None:
        self.events.append(("up", shard))
        self._notify()

    async def peer_down(self, shard: int) -> None:
        self.events.append(("down", shard))
        self._notify()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(TIMEOUT):
            while not predicate():
                await self._changed.wait()


@pytest.fixture
def bus_dir() -> Iterator[Path]:
    # Short: a Unix socket path is limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bus") as d:
        yield Path(d)


async def run_bus(bus: UnixSocketBus, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    """Run one shard's bus in its own cancel scope, so a test can stop it
    as a dying shard would."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            task_status.started(scope)


async def mesh(nursery: trio.Nursery, shards: int, bus_dir: Path
               ) -> list[tuple[UnixSocketBus, Recorder, trio.CancelScope]]:
    nodes = []
    for i in range(shards):
        recorder = Recorder()
        bus = UnixSocketBus(i, shards, bus_dir, recorder)
        scope = await nursery.start(run_bus, bus)
        nodes.append((bus, recorder, scope))
    for bus, recorder, _ in nodes:
        others = frozenset(range(shards)) - {bus.shard}
        await recorder.wait(lambda b=bus, o=others: b.peers == o)
    return nodes


async def test_mesh_forms_and_delivers_frames_in_order(bus_dir):
    async with trio.open_nursery() as nursery:
        nodes = await mesh(nursery, 3, bus_dir)
        for bus, recorder, _ in nodes:
            assert sorted(recorder.events) == [("up", i) for i in range(3) if i != bus.shard]
            assert (bus.bus_dir / f"shard-{bus.shard}.sock").stat().st_mode & 0o077 == 0
        for bus, _, _ in nodes:
            for dest in range(3):
                if dest != bus.shard:
                    for n in range(5):
                        payload = f"{bus.shard}->{dest} #{n}".encode()
                        assert bus.send(dest, Frame(FrameType.STANZA, payload))
        for bus, recorder, _ in nodes:
            await recorder.wait(lambda r=recorder: len(r.frames) == 10)
            for src in range(3):
                if src != bus.shard:
                    got = [fr.payload for fr in recorder.frames if fr.source == src]
                    assert got == [f"{src}->{bus.shard} #{n}".encode() for n in range(5)]
        # broadcast reaches every other shard once
        assert nodes[1][0].broadcast(Frame(FrameType.SESSION_UP, b"hi")) == 2
        for i in (0, 2):
            recorder = nodes[i][1]
            await recorder.wait(lambda r=recorder: len(r.frames) == 11)
            assert recorder.frames[-1] == Frame(FrameType.SESSION_UP, b"hi", 0, 1)
        stats = nodes[0][0].stats()
        assert stats[1].frames_out == 5 and stats[1].frames_in == 6
        assert stats[1].bytes_out == sum(10 + len(f"0->1 #{n}") for n in range(5))
        with pytest.raises(ValueError):
            nodes[0][0].send(0, Frame(FrameType.STANZA))
        nursery.cancel_scope.cancel()


async def test_frames_sent_in_one_tick_go_out_in_one_write(bus_dir):
    async with trio.open_nursery() as nursery:
        (a, _, _), (b, rb, _) = await mesh(nursery, 2, bus_dir)
        for _ in range(1000):
            assert a.send(1, Frame(FrameType.STANZA, b"x" * 300))
        await rb.wait(lambda: len(rb.frames) == 1000)
        assert a.stats()[1].frames_out == 1000
        # The first frame is written through, the rest leave together.
        assert a.stats()[1].writes <= 2
        nursery.cancel_scope.cancel()


async def test_a_full_buffer_drops_counts_and_logs_once(bus_dir, caplog):
    """Shard 0 here is a fake that completes the handshake and then never
    reads: shard 1's writer blocks, its buffer fills, and sending must go
    on returning at once, dropping and counting."""
    caplog.set_level(logging.WARNING, "mlink.shard.bus")
    limit = 64 * 1024
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(socket_path(bus_dir, 0)))
    sock.listen(1)
    listener = trio.SocketListener(sock)
    handshake_done = trio.Event()

    async def silent_peer() -> None:
        stream = await listener.accept()
        decoder = FrameDecoder()
        while not decoder.receive_data(await stream.receive_some(1024)):
            pass
        await stream.send_all(encode_frame(FrameType.HELLO, 0, encode_hello(2)))
        handshake_done.set()
        await trio.sleep_forever()  # never reads again

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_peer)
        recorder = Recorder()
        bus = UnixSocketBus(1, 2, bus_dir, recorder, outbound_limit=limit)
        await nursery.start(bus.run)
        await recorder.wait(lambda: bus.peers == {0})
        frame = Frame(FrameType.STANZA, b"y" * 8000)
        accepted = 0
        # The kernel's socket buffer takes some; then the writer blocks.
        for _ in range(100_000):
            if not bus.send(0, frame):
                break
            accepted += 1
            await trio.testing.wait_all_tasks_blocked()
        else:
            pytest.fail("the buffer never filled")
        for _ in range(99):
            assert not bus.send(0, frame)
        stats = bus.stats()[0]
        assert stats.drops_full == 100
        assert accepted * 8010 > limit
        warnings = [r for r in caplog.records if "outbound buffer full" in r.getMessage()]
        assert len(warnings) == 1, warnings
        nursery.cancel_scope.cancel()


async def test_peer_down_and_back_up_is_reported_and_traffic_resumes(bus_dir):
    async with trio.open_nursery() as nursery:
        nodes = await mesh(nursery, 3, bus_dir)
        # Shard 1 dies: 0 (which it dialled) and 2 (which dialled it) notice.
        nodes[1][2].cancel()
        for i in (0, 2):
            rec = nodes[i][1]
            await rec.wait(lambda r=rec: ("down", 1) in r.events)
            assert nodes[i][0].peers == frozenset({0, 1, 2} - {i, 1})
        assert not nodes[0][0].send(1, Frame(FrameType.STANZA, b"lost"))
        assert nodes[0][0].stats()[1].drops_down == 1
        # It restarts: both report it up again and frames flow both ways.
        recorder = Recorder()
        bus1 = UnixSocketBus(1, 3, bus_dir, recorder)
        await nursery.start(run_bus, bus1)
        await recorder.wait(lambda: bus1.peers == {0, 2})
        for i in (0, 2):
            rec = nodes[i][1]
            await rec.wait(lambda r=rec: r.events.count(("up", 1)) == 2)
            assert nodes[i][0].send(1, Frame(FrameType.STANZA, f"again {i}".encode()))
        assert bus1.send(0, Frame(FrameType.STANZA, b"back"))
        await recorder.wait(lambda: len(recorder.frames) == 2)
        assert {fr.payload for fr in recorder.frames} == {b"again 0", b"again 2"}
        await nodes[0][1].wait(lambda: any(fr.payload == b"back" for fr in nodes[0][1].frames))
        # The lowest shard dies and returns: the higher ones redial it.
        nodes[0][2].cancel()
        await recorder.wait(lambda: ("down", 0) in recorder.events)
        rec0 = Recorder()
        bus0 = UnixSocketBus(0, 3, bus_dir, rec0)
        await nursery.start(run_bus, bus0)
        await rec0.wait(lambda: bus0.peers == {1, 2})
        await recorder.wait(lambda: recorder.events.count(("up", 0)) == 2)
        assert nodes[0][0].stats()[1].connects == 2
        nursery.cancel_scope.cancel()


async def test_a_connection_that_does_not_say_hello_is_refused(bus_dir, caplog):
    async with trio.open_nursery() as nursery:
        (a, ra, _), (b, rb, _) = await mesh(nursery, 2, bus_dir)
        for junk in (b"GET / HTTP/1.1\r\n\r\n",
                     encode_frame(FrameType.HELLO, 1, encode_hello(5)),
                     encode_frame(FrameType.STANZA, 1, b"")):
            stream = await trio.open_unix_socket(str(socket_path(bus_dir, 0)))
            await stream.send_all(junk)
            with trio.fail_after(TIMEOUT):
                while await stream.receive_some(1024):
                    pass  # our HELLO, then the bus closes the connection
            await stream.aclose()
        # The real link was not disturbed.
        assert a.peers == {1} and ra.events == [("up", 1)]
        assert b.send(0, Frame(FrameType.STANZA, b"still here"))
        await ra.wait(lambda: len(ra.frames) == 1)
        nursery.cancel_scope.cancel()
