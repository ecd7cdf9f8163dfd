"""RSS of one shard across login/logout cycles (issue 12, finding 9).

`bench/rss_cycles.py [--cycles 8] [--sessions 3000]`: starts `mlink serve
--shards 1` on a fresh embedded setup, then repeats: log SESSIONS users in
(STARTTLS, PLAIN, bind, presence), hold them, log them all out, and read the
shard's resident set size once the server is idle again. A server that
keeps per-user state after logout (caches without a bound, tables that are
never pruned) grows every cycle; a healthy one grows in the first cycle
(allocator arenas, caches warming) and then stays flat. Prints one line per
cycle; loopback only, every phase bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen.servers import Mlink  # noqa: E402
from loadgen.xmpp import client_ssl_context, login  # noqa: E402

# Logins in flight at once: enough to finish a cycle in seconds, few enough
# that the generator (one process) keeps up.
CONCURRENCY = 100
# No phase may take longer than this.
PHASE_TIMEOUT = 300.0
# After logout, the server settles (session/closed handlers, presence) for
# at most this long before RSS is read: it is polled until two readings
# agree.
SETTLE_SECONDS = 20.0
# Two readings this far apart that agree mean settled: longer than the
# shard's housekeeping period (mlink/util/heaptrim.py trims the heap a
# second or two after the last logout).
STABLE_SECONDS = 3.0
# Logged-out connections must all be closed by the server within this.
CLOSE_TIMEOUT = 120.0
# Descriptors over the idle count that still count as idle (a thread pool
# wake-up pipe, a store file opened lazily).
FD_SLACK = 4
# A memory report (gc, tracemalloc snapshot and diff) takes seconds.
REPORT_TIMEOUT = 120.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def cycle(port: int, domain: str, sessions: int, tls: bool) -> None:
    ssl_ctx = client_ssl_context()
    gate = asyncio.Semaphore(CONCURRENCY)
    conns = []

    async def one(n: int) -> None:
        async with gate:
            conns.append(await login("127.0.0.1", port, domain, f"u{n}", f"pw{n}",
                                     tls=tls, mechanism="PLAIN", resource="rss",
                                     ssl_ctx=ssl_ctx))

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(1, sessions + 1))),
                           PHASE_TIMEOUT)
    for conn in conns:
        conn.send(b"</stream:stream>")
        conn.close()
    await asyncio.sleep(0)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_connections_closed(pid: int, idle_fds: int) -> None:
    """Wait until the shard holds no more descriptors than when idle: every
    logged-out connection really closed server-side. RSS read while the
    shard is still working through the logouts (a busy machine) would
    count live sessions as retained memory."""
    deadline = time.monotonic() + CLOSE_TIMEOUT
    while (fds := open_fds(pid)) > idle_fds + FD_SLACK:
        if time.monotonic() > deadline:
            print(f"  still {fds - idle_fds} descriptors over idle after "
                  f"{CLOSE_TIMEOUT:.0f} s", file=sys.stderr)
            return
        time.sleep(0.2)


def settled_rss(pid: int) -> int:
    deadline = time.monotonic() + SETTLE_SECONDS
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(STABLE_SECONDS)
        now = rss_kib(pid)
        if abs(now - last) < 256:
            return now
        last = now
    return last


def memory_report(pid: int, path: Path) -> None:
    """Ask the shard for a memory report (mlink/util/memdebug.py) and wait
    until it is written: the next cycle must not run while it is taken."""
    size = path.stat().st_size if path.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + REPORT_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if path.exists() and path.stat().st_size > size:
            time.sleep(0.5)  # written in one go; let it land
            return
    print(f"no memory report from pid {pid} after {REPORT_TIMEOUT} s", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--sessions", type=int, default=3000)
    p.add_argument("--port", type=int, default=25322)
    p.add_argument("--no-tls", action="store_true",
                   help="log in over plain TCP (rules OpenSSL in or out)")
    p.add_argument("--debug-memory", type=Path, metavar="FILE",
                   help="append the shard's memory report after each cycle to FILE "
                        "(mlink/util/memdebug.py)")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                   help="with --debug-memory: trace allocations, FRAMES deep")
    p.add_argument("--trim", action="store_true",
                   help="with --debug-memory: report RSS again after malloc_trim(0)")
    args = p.parse_args()
    if args.debug_memory:
        args.debug_memory = args.debug_memory.resolve()
        os.environ["MLINK_DEBUG_MEMORY"] = str(args.debug_memory)
        os.environ["MLINK_DEBUG_TRACEMALLOC"] = str(args.tracemalloc)
        os.environ["MLINK_DEBUG_MALLOC_TRIM"] = "1" if args.trim else "0"
    with tempfile.TemporaryDirectory(prefix="mlink-rss-") as tmp:
        server = Mlink(Path(tmp), args.port, shards=1)
        server.setup([(f"u{n}", f"pw{n}") for n in range(1, args.sessions + 1)], None)
        server.start()
        try:
            pid = max(server.procs().pids(), key=rss_kib)  # the shard, not the supervisor
            idle = settled_rss(pid)
            idle_fds = open_fds(pid)
            print(f"idle before any login: {idle / 1024:.1f} MiB (pid {pid})")
            if args.debug_memory:
                memory_report(pid, args.debug_memory)
            readings = []
            for k in range(1, args.cycles + 1):
                t = time.monotonic()
                asyncio.run(cycle(args.port, server.domain, args.sessions, not args.no_tls))
                wait_connections_closed(pid, idle_fds)
                readings.append(settled_rss(pid))
                print(f"after cycle {k}: {readings[-1] / 1024:.1f} MiB "
                      f"({args.sessions} logins/logouts in {time.monotonic() - t:.1f} s)",
                      flush=True)
                if args.debug_memory:
                    memory_report(pid, args.debug_memory)
            growth = (readings[-1] - readings[0]) / readings[0] * 100
            print(f"last vs first cycle: {growth:+.1f}% (target: within 5%)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
