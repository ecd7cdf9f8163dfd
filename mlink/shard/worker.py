"""One shard process: `python -m mlink.shard.worker --index I --shards N
--bus-dir D --config F [--control-fd K]`, started by the supervisor.

A shard is a whole server (every listener bound with SO_REUSEPORT, its own
sessions, its own Trio loop) plus its end of the bus. It stops gracefully
on SIGTERM/SIGINT, and also when the supervisor's control channel closes:
a shard whose supervisor is gone would otherwise run on unsupervised and
hold the ports against the next start.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from mlink.config import ConfigError, load_config
from mlink.config_model import Config
from mlink.shard.bus import UnixSocketBus
from mlink.shard.control import ControlError, LineChannel, find_oserror
from mlink.util.logsetup import configure_logging

if TYPE_CHECKING:
    from mlink.util.memdebug import MemoryReporter

# The debug memory reporter's switch (mlink.util.memdebug.ENV_FILE): its
# module (tracemalloc, ctypes) is imported only when it is set, not into
# every shard's idle memory.
DEBUG_MEMORY_ENV = "MLINK_DEBUG_MEMORY"

# Run as `python -m mlink.shard.worker`, where __name__ is "__main__".
log = logging.getLogger("mlink.shard.worker" if __name__ == "__main__" else __name__)


def shard_stats(server: Any, bus: UnixSocketBus, started: float) -> dict[str, Any]:
    """What `mlink status` shows for one shard."""
    return {
        "op": "stats",
        "shard": bus.shard,
        "pid": os.getpid(),
        "uptime": time.monotonic() - started,
        "connections": len(server.connections),
        # The open client listeners (`c2s 0.0.0.0:5222`), reloads included.
        "listeners": server.listeners.listing(),
        "sessions": len(server.sessions),
        # The abuse limits at work (docs/security.md): connections refused
        # at accept, addresses and accounts with authentication penalties.
        "limits": {"refused": server.connection_limiter.refused,
                   "penalised_addresses": len(server.auth_throttle.addresses),
                   "penalised_accounts": len(server.auth_throttle.accounts)},
        "peers_up": sorted(bus.peers),
        # Event-loop stalls over 100 ms (mlink.util.watchdog): a shard can
        # answer "ready" and still have made its users wait.
        "loop": server.watchdog.stats.as_dict(),
        # Bounded caches: (entries, bound) each.
        "caches": server.cache_sizes(),
        # Heap trims after logouts (mlink.util.heaptrim) and their cost.
        "heap_trim": server.heap_trimmer.stats.as_dict(),
        "bus": {str(i): s.as_dict() for i, s in bus.stats().items()},
        # Stanzas in/out by kind, logins by mechanism (the console's /metrics).
        "traffic": server.counters.as_dict(),
    }


async def run_shard(config: Config, index: int, shards: int, bus_dir: Path,
                    control_fd: int | None = None) -> None:
    """Serve as shard `index` until told to stop, then shut down cleanly."""
    from mlink.server import Server

    started = time.monotonic()
    bus = UnixSocketBus(index, shards, bus_dir)
    server = Server(config)
    server.attach_bus(bus)
    control = None
    if control_fd is not None:
        sock = socket.socket(fileno=control_fd)
        control = LineChannel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(_watch_signals, signals, stop)
            await nursery.start(bus.run)
            await nursery.start(server.serve)
            # What start-up made (modules, configuration, the embedded
            # directory's entries) lives as long as the shard: out of the
            # cyclic collector's way, so a full collection scans only what
            # sessions made since (tens of milliseconds of loop per full
            # collection otherwise, at start and every so often under load).
            gc.collect()
            gc.freeze()
            if os.environ.get(DEBUG_MEMORY_ENV):
                from mlink.util.memdebug import MemoryReporter

                reporter = MemoryReporter.from_env()
                if reporter is not None:
                    nursery.start_soon(_memory_reports, reporter, server)
            if control is not None:
                await control.send({"op": "ready", "pid": os.getpid(),
                                    "ports": dict(server.bound_ports)})
                nursery.start_soon(_serve_control, control, server, bus, started, stop)
            await stop.wait()
            # Sessions end while the bus still runs, so their "session
            # down" announcements reach the other shards.
            await server.shutdown()
            nursery.cancel_scope.cancel()


async def _memory_reports(reporter: MemoryReporter, server: Any) -> None:
    """Debug only (MLINK_DEBUG_MEMORY set): a memory report per SIGUSR1."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            reporter.report(server)


async def _watch_signals(signals: Any, stop: trio.Event) -> None:
    async for signum in signals:
        if not stop.is_set():
            log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()


async def _serve_control(control: LineChannel, server: Any, bus: UnixSocketBus,
                         started: float, stop: trio.Event) -> None:
    """Answer the supervisor; its end closing means it is gone: stop."""
    try:
        while (message := await control.receive()) is not None:
            op = message.get("op")
            if op == "stats":
                await control.send(shard_stats(server, bus, started))
            elif op == "reload":
                from mlink.reload import reload_from_file

                result = await reload_from_file(server)
                await control.send({"op": "reloaded", **result})
            elif op == "end-user":
                server.end_user_sessions(str(message.get("jid", "")),
                                         str(message.get("text", "")))
                if message.get("removed") is True:
                    await server.account_removed(str(message.get("jid", "")))
            elif op == "invalidate":
                # A user's data changed outside the shards (the console):
                # drop the cached copies named `what` ("profile").
                changed, what = str(message.get("user", "")), str(message.get("what", ""))
                for name, invalidate in list(server.cache_invalidators.items()):
                    if name == what or name.endswith(":" + what):
                        invalidate(changed)
            elif op == "sessions":
                user = message.get("user")
                await control.send({"op": "sessions", "shard": bus.shard,
                                    "sessions": server.session_list(
                                        str(user) if user else None)})
            elif op == "kick":
                await control.send({"op": "kicked", "shard": bus.shard,
                                    "ended": server.kick_sessions(
                                        str(message.get("jid", "")),
                                        str(message.get("text", "")))})
    except (ControlError, trio.BrokenResourceError, OSError) as exc:
        log.warning("control channel failed: %s", exc)
    if not stop.is_set():
        log.warning("supervisor gone; stopping")
    stop.set()


def _setup_logging(level: str, index: int, file: Path | None) -> None:
    # The shard index in every line: which shard holds a connection, and
    # whose "listening" line is whose, must be visible in the shared log.
    configure_logging(level, f"%(asctime)s %(levelname)s shard-{index} %(name)s: %(message)s",
                      file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlink.shard.worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--bus-dir", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--control-fd", type=int)
    args = p.parse_args(argv)
    # Reloading is the supervisor's to coordinate: a SIGHUP reaching the
    # whole process group (a closed terminal) must not kill the shards.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mlink: {exc}", file=sys.stderr)
        return 1
    _setup_logging(config.log_level, args.index, config.log_file)
    try:
        trio.run(run_shard, config, args.index, args.shards, args.bus_dir, args.control_fd)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        error = find_oserror(exc)
        if error is None:
            raise
        print(f"mlink: shard {args.index}: {error}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
