"""Debug-only memory reports for a shard (issue 12, finding 9).

Off unless `MLINK_DEBUG_MEMORY` names a file: then the shard appends a
report to it on every SIGUSR1 — resident set size, what the C allocator
holds (glibc `mallinfo2`: in use versus free-but-kept), the server TLS
context's session cache, live objects by type and, if
`MLINK_DEBUG_TRACEMALLOC` gives a frame count, the allocations that grew
since the previous report by traceback. Comparing two reports taken after
two login/logout cycles tells Python-level retention (objects, traced
bytes grow) from allocator fragmentation or OpenSSL (RSS grows, traced
bytes do not). `MLINK_DEBUG_MALLOC_TRIM=1` also calls `malloc_trim(0)`
and reports RSS again: what that gives back was free memory the allocator
kept, not retention. `bench/rss_cycles.py --debug-memory` drives this.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

ENV_FILE = "MLINK_DEBUG_MEMORY"
ENV_TRACEMALLOC = "MLINK_DEBUG_TRACEMALLOC"
ENV_TRIM = "MLINK_DEBUG_MALLOC_TRIM"
# Lines per section of a report: enough to see every per-user structure,
# few enough to read.
TOP = 25


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def smaps_rss_kib() -> dict[str, int]:
    """Resident KiB by kind of mapping: the heap (brk), anonymous maps
    (pymalloc arenas, malloc's thread arenas and large blocks, thread
    stacks) and files (code). Tells which of them grows."""
    kinds: collections.Counter[str] = collections.Counter()
    kind = "?"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
            kind = ("heap" if name == "[heap]" else "anon" if not name
                    else "stack" if name.startswith("[stack") else
                    "ssl/crypto" if "libssl" in name or "libcrypto" in name else
                    "python" if "python" in name else "other")
        elif head[0] == "Rss:":
            kinds[kind] += int(head[1])
    return dict(kinds)


class MemoryReporter:
    """Writes one report per `report()` call; keeps the previous snapshot
    and type counts so each report shows what changed since the last."""

    def __init__(self, path: Path, frames: int, trim: bool) -> None:
        self.path = path
        self.frames = frames
        self.trim = trim
        self.libc = _libc()
        self.previous: tracemalloc.Snapshot | None = None
        self.previous_types: collections.Counter[str] = collections.Counter()
        if frames and not tracemalloc.is_tracing():
            tracemalloc.start(frames)

    @classmethod
    def from_env(cls) -> MemoryReporter | None:
        path = os.environ.get(ENV_FILE)
        if not path:
            return None
        return cls(Path(path), int(os.environ.get(ENV_TRACEMALLOC, "0") or 0),
                   os.environ.get(ENV_TRIM) == "1")

    def _mallinfo(self) -> str:
        if self.libc is None or not hasattr(self.libc, "mallinfo2"):
            return "malloc ?"
        self.libc.mallinfo2.restype = _MallInfo2
        mi = self.libc.mallinfo2()
        return (f"malloc arena_kib {mi.arena // 1024} in_use_kib {mi.uordblks // 1024} "
                f"free_kib {mi.fordblks // 1024} mmap_kib {mi.hblkhd // 1024}")

    def report(self, server: Any) -> None:
        # Before collecting: what reference cycles hold until the next
        # full collection is memory too (and the gc counts say how much).
        lines = [f"=== report at {time.time():.0f} pid {os.getpid()}",
                 f"rss_kib {rss_kib()} by mapping {smaps_rss_kib()}",
                 f"before gc.collect(): {self._mallinfo()} gc counts {gc.get_count()}"]
        found = gc.collect()
        lines.append(f"gc.collect() found {found} unreachable objects")
        lines.append(f"after gc.collect(): {self._mallinfo()}")
        tls = getattr(server, "tls", None)
        if tls is not None:
            lines.append(f"ssl session_stats {tls.context.session_stats()}")
        lines.append(f"sessions {len(server.sessions)} connections {len(server.connections)}")
        trimmer = getattr(server, "heap_trimmer", None)
        if trimmer is not None:
            lines.append(f"heap_trim {trimmer.stats.as_dict()}")
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        lines.append(f"gc objects {sum(types.values())}; growth by type:")
        growth = types.copy()
        growth.subtract(self.previous_types)
        for name, delta in growth.most_common(TOP):
            if delta > 0:
                lines.append(f"  {delta:+8d} {name} (now {types[name]})")
        self.previous_types = types
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            traced, peak = tracemalloc.get_traced_memory()
            lines.append(f"tracemalloc traced_kib {traced // 1024} peak_kib {peak // 1024}")
            if self.previous is not None:
                for key in ("lineno", "traceback"):
                    lines.append(f"growth by {key}:")
                    for stat in snap.compare_to(self.previous, key)[:TOP]:
                        if stat.size_diff <= 0:
                            continue
                        lines.append(f"  {stat.size_diff / 1024:+9.1f} KiB "
                                     f"{stat.count_diff:+7d} blocks")
                        frames = stat.traceback.format(limit=self.frames if key == "traceback"
                                                       else 1)
                        lines.extend("    " + f.strip() for f in frames if f.strip())
            self.previous = snap
        if self.trim and self.libc is not None:
            self.libc.malloc_trim(0)
            lines.append(f"after malloc_trim(0): rss_kib {rss_kib()} "
                         f"by mapping {smaps_rss_kib()}")
        with open(self.path, "a") as out:
            out.write("\n".join(lines) + "\n")
